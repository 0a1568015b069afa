"""Training checkpoints in a run directory: commit, find the one to resume, prune.

Layout (tags and ``latest``: ``tags.py``)::

    <run.dir>/checkpoints/step_0000100/   one checkpoint: the layout-free record (safetensors +
                                          JSON, see reshard.py) and the RNG streams, written by
                                          training.py; DeepSpeed's native files (pickles) too
                                          only with checkpoint.native
    <run.dir>/checkpoints/step_0000100/manifest.json   size and CRC-32 of each file
    <run.dir>/checkpoints/latest          the tag of the newest COMPLETE checkpoint

``training.py`` writes a checkpoint's files; this module commits it: the manifest, then
``latest``, written last, atomically, after every rank has finished writing, so a crash while
saving leaves the previous checkpoint as the one a restart resumes from. A resume verifies the
manifest; when the newest checkpoint is damaged it says which file and falls back to the newest
intact one (``checkpoint.require_latest`` demands the newest or nothing). Which files a resume
then reads (the record; DeepSpeed's pickles only with ``checkpoint.trust_pickle``) is
``training.py``'s decision.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch.distributed as dist

from megagpt.checkpoint import manifest
from megagpt.checkpoint.canonical import CheckpointError
from megagpt.checkpoint.tags import (
    LATEST,
    checkpoint_dir,
    is_tag,
    order,
    read_latest,
    tag_for,
    write_latest,
)

__all__ = [
    "checkpoint_dir",
    "commit",
    "latest_tag",
    "resolve_load",
    "resume_tag",
    "tag_for",
    "verify_or_raise",
]

T = TypeVar("T")


def latest_tag(directory: str) -> str | None:
    """Tag named by ``directory/latest``, or None when there is no complete checkpoint.

    Raises CheckpointError when ``latest`` exists but names no checkpoint folder."""
    path = Path(directory) / LATEST
    if not path.is_file():
        return None
    tag = read_latest(directory) or ""
    if not tag or not (Path(directory) / tag).is_dir():
        raise CheckpointError(
            f"{path} names checkpoint {tag!r}, which does not exist in {directory}; "
            "remove the file to start fresh or restore the checkpoint"
        )
    return tag


def resolve_load(path: str) -> tuple[str, str]:
    """(directory, tag) for a user-given checkpoint path: a run dir, its checkpoints dir, or a
    tagged checkpoint folder."""
    p = Path(path)
    for directory in (p / "checkpoints", p):
        if (directory / LATEST).is_file():
            tag = latest_tag(str(directory))
            assert tag is not None  # the file exists: latest_tag returns a tag or raises
            return str(directory), tag
    if is_tag(p.name) and p.is_dir():
        return str(p.parent), p.name
    raise CheckpointError(f"checkpoint.load={path!r}: no 'latest' file and not a step_* folder")


def is_training_path(path: str) -> bool:
    """True when ``resolve_load`` takes ``path`` for a training checkpoint (a run or checkpoints
    directory with a ``latest`` file, or a step_* folder), even one that then fails to resolve
    (``latest`` naming a missing folder): its error is the one to show, not "unknown kind"."""
    p = Path(path)
    return (p / "checkpoints" / LATEST).is_file() or (p / LATEST).is_file() or is_tag(p.name)


def commit(directory: str, tag: str, keep_last: int) -> None:
    """After every rank saved ``tag``: write its manifest, point ``latest`` at it and drop the
    oldest extras.

    Collective: every rank calls it; the ranks share the checksums, rank 0 does the file work
    between barriers.
    """
    if dist.is_initialized():
        dist.barrier()
    manifest.write(str(Path(directory) / tag))  # collective; before `latest` names the tag
    if not dist.is_initialized() or dist.get_rank() == 0:
        write_latest(directory, tag)
        tags = sorted((d.name for d in Path(directory).iterdir() if is_tag(d.name)), key=order)
        # Folders newer than the committed tag are leftovers of a save that crashed (their step
        # was never committed); older ones beyond keep_last are pruned.
        stale = [t for t in tags if order(t) > order(tag)]
        kept = [t for t in tags if order(t) <= order(tag)]
        for old in stale + kept[:-keep_last]:
            shutil.rmtree(Path(directory) / old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()


def _summary(problems: list[str]) -> str:
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return problems[0] + more


def _shared(obj: T | None) -> T:
    """Rank 0's ``obj`` on every rank (one reading of the shared folder, so all ranks agree);
    the other ranks pass None."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        assert obj is not None, "a single process is rank 0: it passes its own object"
        return obj
    box: list[Any] = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _candidates(root: Path) -> tuple[str | None, list[str]]:
    """(the tag ``latest`` names or None, the tags a resume tries in order): ``latest``, then the
    older folders; without ``latest``, the folders with a manifest (they were complete)."""
    latest = read_latest(root)
    tags = (
        sorted(
            (d.name for d in root.iterdir() if is_tag(d.name) and d.is_dir()),
            key=order,
            reverse=True,
        )
        if root.is_dir()
        else []
    )
    if latest is None:
        return latest, [t for t in tags if manifest.has_manifest(str(root / t))]
    return latest, [latest] + [t for t in tags if order(t) < order(latest)]


def first_resume_tag(directory: str) -> str | None:
    """The checkpoint ``resume_tag`` tries first (None: the run has none), without verifying
    it or any process group: what a run checks its config against before it starts. The
    resume itself may fall back to an older one when this one is damaged."""
    candidates = _candidates(Path(directory))[1]
    return candidates[0] if candidates else None


def resume_tag(
    directory: str, *, require_latest: bool = False, log: Callable[[str], object] = print
) -> str | None:
    """The checkpoint a run resumes from: ``latest`` when it verifies, else the newest intact
    older one; None when the run has none.

    Collective (every rank calls it; the checksums are shared, see ``manifest.verify``). A
    damaged checkpoint is named with its first damaged file; after a fall-back, rank 0 renames
    the damaged folders to ``<tag>.damaged`` (kept for inspection, never resumed or pruned) and
    points ``latest`` at the one resumed. Without a ``latest`` file, only folders with a manifest
    count (they were complete). Raises CheckpointError when ``require_latest`` and the newest is
    damaged, or when no checkpoint is intact.
    """
    root = Path(directory)
    listing = _candidates(root) if not dist.is_initialized() or dist.get_rank() == 0 else None
    latest, candidates = _shared(listing)
    if not candidates:
        return None
    if latest is None:
        log(f"{root}/latest is missing; looking for the newest complete checkpoint")
    damaged: list[tuple[str, list[str]]] = []
    chosen = None
    for tag in candidates:
        problems = manifest.verify(str(root / tag))
        if not problems:
            chosen = tag
            break
        damaged.append((tag, problems))
        if require_latest:
            raise CheckpointError(
                f"checkpoint {root / tag} is damaged: {_summary(problems)}; "
                "checkpoint.require_latest=true demands the newest checkpoint: restore that "
                "file, or set checkpoint.require_latest=false to resume from the newest intact "
                "one"
            )
        log(f"checkpoint {root / tag} is damaged: {_summary(problems)}; trying the one before")
    if chosen is None:
        raise CheckpointError(
            f"no intact checkpoint in {root}: "
            + "; ".join(f"{t}: {_summary(p)}" for t, p in damaged)
            + " (restore the files, or move the folder away to start afresh)"
        )
    if damaged:
        if not dist.is_initialized() or dist.get_rank() == 0:
            for tag, _ in damaged:
                if (root / tag).is_dir():
                    aside = root / f"{tag}.damaged"
                    shutil.rmtree(aside, ignore_errors=True)
                    os.replace(root / tag, aside)
            write_latest(root, chosen)
        if dist.is_initialized():
            dist.barrier()
        log(
            f"falling back to {root / chosen}; the damaged checkpoints were renamed to "
            f"{', '.join(t + '.damaged' for t, _ in damaged)}"
        )
    return chosen


def verify_or_raise(directory: str, tag: str) -> None:
    """Verify one checkpoint named by the user (``checkpoint.load``): CheckpointError naming the
    damaged file. Never renames anything (the folder is not the run's own). Collective."""
    problems = manifest.verify(str(Path(directory) / tag))
    if problems:
        raise CheckpointError(
            f"checkpoint {Path(directory) / tag} is damaged: {_summary(problems)}; restore it "
            "or point checkpoint.load at an older step_* folder"
        )
