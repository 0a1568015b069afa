"""Freed host memory kept in the process between training steps (``train.keep_freed_memory``).

glibc's malloc serves large blocks (its threshold adapts up to 32 MiB; at least one [V, h] or
[tokens, V] tensor per step is larger) with fresh ``mmap`` s and returns them with ``munmap``,
and gives the top of its heap back to the system once more than its trim threshold is free.
A CPU training step allocates and frees the same activations and gradients every step, so each
step pays a page fault per 4 KiB page it touches again: measured on the 2-core test machine,
~6,000 faults and 5-8 % of a step at ``bench/trainer_e2e.py``'s shape (4 layers, h 256), ~40,000
and ~5 % at gpt3-base. Raising both thresholds keeps that memory in the process for the next
step, as a caching allocator does on a GPU; the process's resident memory stays at the step's
peak instead of falling between steps.

Process-wide, set once by the trainer on a CPU device. Left alone where it cannot or should
not apply: another libc, another allocator preloaded (jemalloc, tcmalloc, mimalloc), or the
user's own glibc malloc settings in the environment.
"""

from __future__ import annotations

import ctypes
import os
import platform

import torch

THRESHOLD_BYTES = 1 << 30  # blocks up to 1 GiB from the heap; 1 GiB free at its top kept
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def why_not(device: torch.device, enabled: bool) -> str | None:
    """Why freed memory is not kept for ``device`` (None: it can be). Pure but for the
    environment and the libc it asks about."""
    if not enabled:
        return "train.keep_freed_memory=false"
    if device.type != "cpu":
        return f"the device is {device.type} (its allocator caches already)"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc's malloc"
    preload = os.environ.get("LD_PRELOAD", "")
    other = next((name for name in _OTHER_ALLOCATORS if name in preload), None)
    if other:
        return f"{other} is preloaded (LD_PRELOAD)"
    user = [k for k in _USER_SETTINGS if k in os.environ]
    if user or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return f"glibc malloc is set in the environment ({', '.join(user) or 'GLIBC_TUNABLES'})"
    return None


def keep_freed_memory(device: torch.device, enabled: bool) -> str:
    """Raise glibc's mmap and trim thresholds to ``THRESHOLD_BYTES`` when ``why_not`` says
    nothing against it; returns a line saying what was done."""
    reason = why_not(device, enabled)
    if reason is not None:
        return f"host memory: the system allocator's defaults ({reason})"
    libc = ctypes.CDLL(None)
    ok = libc.mallopt(_M_MMAP_THRESHOLD, THRESHOLD_BYTES) == 1
    ok = libc.mallopt(_M_TRIM_THRESHOLD, THRESHOLD_BYTES) == 1 and ok
    if not ok:
        return "host memory: the system allocator's defaults (glibc refused mallopt)"
    return (
        "host memory: freed memory kept in the process between steps (glibc mmap and trim "
        f"thresholds {THRESHOLD_BYTES >> 20} MiB; train.keep_freed_memory=false to return it)"
    )
