"""Checkpoint tags and the ``latest`` file: the naming of ``<run.dir>/checkpoints/``.

::

    <run.dir>/checkpoints/step_0000100/    one checkpoint, tag ``step_`` + the step, 7+ digits
    <run.dir>/checkpoints/latest           the tag of the newest committed checkpoint, one line

Torch-free on purpose (it imports only the standard library): ``megagpt.planner.run_state``
reads ``latest`` at every Slurm job start and end, where importing torch and megatron-core costs
10+ s on a login node. ``manager.py`` decides what a tag means for a resume; this module only
names, parses, reads and writes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

LATEST = "latest"
# A folder megagpt wrote: ``step_`` and at least 7 digits (``order`` sorts them by step). `latest`
# itself is parsed leniently (any digit count): a hand-written tag still reports its step.
_FOLDER = re.compile(r"^step_(\d{7,})$")
_TAG = re.compile(r"^step_(\d+)$")


def checkpoint_dir(run_dir: str) -> str:
    """The checkpoints folder of a run directory (``<run_dir>/checkpoints``)."""
    return os.path.join(run_dir, "checkpoints")


def tag_for(step: int) -> str:
    """The tag of the checkpoint of ``step`` (``step_0000100``)."""
    return f"step_{step:07d}"


def is_tag(name: str) -> bool:
    """True when ``name`` is a checkpoint folder name megagpt writes (``step_`` + 7+ digits);
    ``step_0000100.damaged``, ``latest`` and temp files are not."""
    return _FOLDER.match(name) is not None


def step_of(tag: str) -> int | None:
    """The step a tag names (``step_0000100`` -> 100), or None when ``tag`` is no step tag."""
    m = _TAG.match(tag.strip())
    return int(m.group(1)) if m else None


def order(tag: str) -> tuple[int, str]:
    """Sort key of a tag: by step, numerically (``step_10000000`` after ``step_9999999``, which
    a string sort gets wrong); a tag without a step sorts first."""
    step = step_of(tag)
    return (-1 if step is None else step, tag)


def read_latest(directory: str | Path) -> str | None:
    """The tag written in ``directory/latest``; None when the file is missing or empty. Does not
    check that the tag's folder exists (``manager.latest_tag`` does)."""
    path = Path(directory) / LATEST
    if not path.is_file():
        return None
    return path.read_text(encoding="utf-8").strip() or None


def latest_step(directory: str | Path) -> int:
    """The step of the checkpoint ``directory/latest`` names; 0 when there is none or the file
    holds no step tag (a launcher then treats the run as not started)."""
    tag = read_latest(directory)
    step = step_of(tag) if tag is not None else None
    return 0 if step is None else step


def write_latest(directory: str | Path, tag: str) -> None:
    """Point ``directory/latest`` at ``tag`` atomically (a temp file, then a rename): a crash
    leaves the old pointer or the new one, never half a line."""
    tmp = Path(directory) / (LATEST + ".tmp")
    tmp.write_text(tag + "\n", encoding="utf-8")
    os.replace(tmp, Path(directory) / LATEST)
