"""DeepSpeed's accelerator, chosen from megagpt's resolved device: the one place that does it.

DeepSpeed picks its accelerator once, when it is first imported (``DS_ACCELERATOR`` or its own
detection of an installed CUDA). Left to itself it gets both directions wrong: ``train.device=cpu``
on a CUDA host gets the CUDA accelerator (the engine then moves the model to a GPU while batches
stay on the CPU), and an inherited ``DS_ACCELERATOR=cpu`` moves a CUDA model back to the CPU. So
every deepspeed import in megagpt goes through ``import_deepspeed(device)``, which sets the
accelerator from the device before the first import and refuses a mismatch after it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
from collections.abc import Iterator
from types import ModuleType

import torch

log = logging.getLogger(__name__)


def accelerator_name(device: torch.device) -> str:
    """DeepSpeed's accelerator name for a resolved megagpt device: "cuda" or "cpu"."""
    if device.type == "cuda":
        return "cuda"
    if device.type == "cpu":
        return "cpu"
    raise ValueError(f"megagpt trains on cpu or cuda devices, not {device}")


def current_accelerator() -> str | None:
    """The accelerator an already imported deepspeed uses; None before deepspeed is imported."""
    if "deepspeed.accelerator.real_accelerator" not in sys.modules:
        return None
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def import_deepspeed(device: torch.device) -> ModuleType:
    """Import deepspeed with the accelerator that matches ``device``; returns the module.

    Raises RuntimeError when deepspeed was already imported (by other code in this process)
    with a different accelerator: a half-switched DeepSpeed places tensors on the wrong device.
    """
    want = accelerator_name(device)
    have = current_accelerator()
    if have is None:
        # Overwrite, not setdefault: an inherited DS_ACCELERATOR (a test harness, a launcher)
        # must not override the device this run resolved.
        os.environ["DS_ACCELERATOR"] = want
    elif have != want:
        raise RuntimeError(
            f"deepspeed is already imported in this process with its {have!r} accelerator, but "
            f"this run trains on {device} (train.device); DeepSpeed keeps one accelerator per "
            f"process: run it in a new process, or set DS_ACCELERATOR={want} before anything "
            "imports deepspeed"
        )
    import deepspeed

    return deepspeed


# DeepSpeed's BF16_Optimizer calls ``see_memory_usage(..., force=True)`` six times while it is
# built: a message line, then "MA ... GB  Max_MA ...", then "CPU Virtual Memory: ...", each with
# print(). These are not warnings and not in its logger; a bf16 run would start with 18 lines of
# them on every rank-0 console.
_MEMORY_REPORT = re.compile(r"^\s*MA [\d.]+ GB\s+Max_MA [\d.]+ GB")
_VM_REPORT = re.compile(r"^CPU Virtual Memory:\s+used = ")


def drop_memory_reports(text: str) -> tuple[str, list[str]]:
    """(what to show, what was dropped) of what DeepSpeed printed: each ``see_memory_usage``
    block (message, the "MA ... GB" line, the "CPU Virtual Memory" line) is dropped; any other
    line is kept as printed."""
    lines = text.splitlines(keepends=True)
    drop = set()
    for i, line in enumerate(lines):
        if _MEMORY_REPORT.match(line):
            drop.add(i)
            if i > 0:
                drop.add(i - 1)  # the message see_memory_usage was called with
            if i + 1 < len(lines) and _VM_REPORT.match(lines[i + 1]):
                drop.add(i + 1)
    kept = "".join(x for i, x in enumerate(lines) if i not in drop)
    return kept, [lines[i].rstrip("\n") for i in sorted(drop)]


@contextlib.contextmanager
def quiet_memory_reports() -> Iterator[None]:
    """Run a DeepSpeed call with its forced memory reports (above) moved from stdout to this
    module's debug log; everything else it prints reaches stdout unchanged, once it returns."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        kept, dropped = drop_memory_reports(buffer.getvalue())
        if kept:
            sys.stdout.write(kept)
            sys.stdout.flush()
        if dropped:
            log.debug("DeepSpeed memory reports:\n%s", "\n".join(dropped))
