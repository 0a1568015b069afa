"""Training checkpoints in a run directory: save, find the latest, prune.

Layout::

    <run.dir>/checkpoints/step_0000100/   one DeepSpeed checkpoint (every rank's shards)
    <run.dir>/checkpoints/latest          the tag of the newest COMPLETE checkpoint

``latest`` is written last, atomically, after every rank has finished writing: a crash while
saving leaves the previous checkpoint as the one a restart resumes from.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch.distributed as dist

_TAG = re.compile(r"^step_(\d{7,})$")


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def latest_tag(directory: str) -> str | None:
    """Tag named by ``directory/latest``, or None when there is no complete checkpoint."""
    path = Path(directory) / "latest"
    if not path.is_file():
        return None
    tag = path.read_text(encoding="utf-8").strip()
    if not tag or not (Path(directory) / tag).is_dir():
        raise FileNotFoundError(
            f"{path} names checkpoint {tag!r}, which does not exist in {directory}; "
            "remove the file to start fresh or restore the checkpoint")
    return tag


def resolve_load(path: str) -> tuple[str, str]:
    """(directory, tag) for a user-given checkpoint path: a run dir, its checkpoints dir, or a
    tagged checkpoint folder."""
    p = Path(path)
    for directory in (p / "checkpoints", p):
        if (directory / "latest").is_file():
            return str(directory), latest_tag(str(directory))
    if _TAG.match(p.name) and p.is_dir():
        return str(p.parent), p.name
    raise FileNotFoundError(f"checkpoint.load={path!r}: no 'latest' file and not a step_* folder")


def commit(directory: str, tag: str, keep_last: int) -> None:
    """After every rank saved ``tag``: point ``latest`` at it and drop the oldest extras.

    Collective: every rank calls it; rank 0 does the file work between barriers.
    """
    if dist.is_initialized():
        dist.barrier()
    if not dist.is_initialized() or dist.get_rank() == 0:
        tmp = Path(directory) / "latest.tmp"
        tmp.write_text(tag + "\n", encoding="utf-8")
        os.replace(tmp, Path(directory) / "latest")
        tags = sorted(d.name for d in Path(directory).iterdir() if _TAG.match(d.name))
        # Folders newer than the committed tag are leftovers of a save that crashed (their step
        # was never committed); older ones beyond keep_last are pruned.
        stale = [t for t in tags if t > tag]
        kept = [t for t in tags if t <= tag]
        for old in stale + kept[:-keep_last]:
            shutil.rmtree(Path(directory) / old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
