"""DeepSpeed's accelerator, chosen from megagpt's resolved device: the one place that does it.

DeepSpeed picks its accelerator once, when it is first imported (``DS_ACCELERATOR`` or its own
detection of an installed CUDA). Left to itself it gets both directions wrong: ``train.device=cpu``
on a CUDA host gets the CUDA accelerator (the engine then moves the model to a GPU while batches
stay on the CPU), and an inherited ``DS_ACCELERATOR=cpu`` moves a CUDA model back to the CPU. So
every deepspeed import in megagpt goes through ``import_deepspeed(device)``, which sets the
accelerator from the device before the first import and refuses a mismatch after it.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType

import torch


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
