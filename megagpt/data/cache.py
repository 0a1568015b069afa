"""On-disk cache of sample-index arrays, built once and shared by all ranks.

Arrays are stored as ``.npy`` under ``cache_dir``, named by a hash of a description of
everything they depend on (dataset content fingerprint, document range, sequence length,
sample count, seed, index version), plus a ``-description.json`` written last as the commit
marker. Every file is written under a temporary name and renamed, so a crash never leaves a
cache entry that looks complete.

Who builds: without a process group, the caller builds directly. With ``torch.distributed``
initialised, global rank 0 builds (the cache directory is assumed to be on a filesystem every
node sees); with ``node_local=True`` local rank 0 of every node builds (for node-local disks,
``LOCAL_RANK`` from the launcher). The other ranks wait in an ``all_gather_object`` that also
carries the builder's error, if any, so a failed build raises on every rank instead of leaving
them blocked at a barrier. Everything that can be validated without building (split sizes) is
checked on all ranks *before* this point.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable

import numpy as np

from megagpt.data.errors import DataError

INDEX_VERSION = 1


def _dist():
    """``torch.distributed`` when a process group is up; None otherwise (torch not imported)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist
    return None


def _is_builder(dist, node_local: bool) -> bool:
    if node_local:
        return int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0
    return dist.get_rank() == 0


def describe_key(description: dict) -> str:
    blob = json.dumps({**description, "index_version": INDEX_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def cached_arrays(
    cache_dir: str | None,
    kind: str,
    description: dict,
    names: tuple[str, ...],
    build: Callable[[], dict[str, np.ndarray]],
    node_local: bool = False,
    info: dict | None = None,
) -> dict[str, np.ndarray]:
    """Load the arrays ``names`` for ``description`` from the cache, building them if needed.

    Args:
        cache_dir: directory for the cache; None builds in memory on every rank.
        kind: a file-name prefix (``gpt-index``, ``blend-index``).
        description: JSON-serialisable dict that determines the arrays.
        names: the keys ``build()`` returns.
        build: computes ``{name: array}``; must be deterministic.
        node_local: the cache directory is per node (see module docstring).
        info: written into the description file for humans, not part of the key.

    Returns:
        ``{name: array}``; arrays loaded from disk are read-only memory maps.
    """
    if cache_dir is None:
        return build()
    base = os.path.join(cache_dir, f"{kind}-{describe_key(description)}")
    paths = {n: f"{base}-{n}.npy" for n in names}
    marker = f"{base}-description.json"

    def complete() -> bool:
        return os.path.isfile(marker) and all(os.path.isfile(p) for p in paths.values())

    dist = _dist()
    failure: Exception | None = None
    if (dist is None or _is_builder(dist, node_local)) and not complete():
        try:
            _write_entry(cache_dir, paths, marker, {**description, **(info or {})}, build())
        except Exception as exc:
            if dist is None:
                raise
            failure = exc  # re-raised after the other ranks have been told
    if dist is not None:
        status = None if failure is None else f"{type(failure).__name__}: {failure}"
        statuses: list = [None] * dist.get_world_size()
        dist.all_gather_object(statuses, (dist.get_rank(), status))
        if failure is not None:
            raise failure
        failed = [(r, e) for r, e in statuses if e is not None]
        if failed:
            rank, message = failed[0]
            raise DataError(
                f"rank {rank} failed to build the {kind} cache in {cache_dir}: {message}"
            )
    if not complete():
        raise DataError(
            f"{marker}: sample-index cache missing after it was built; is {cache_dir} shared by "
            "all nodes? If it is node-local, build with node_local=True"
        )
    return {n: np.load(p, mmap_mode="r") for n, p in paths.items()}


def _write_entry(
    cache_dir: str,
    paths: dict[str, str],
    marker: str,
    description: dict,
    arrays: dict[str, np.ndarray],
) -> None:
    os.makedirs(cache_dir, exist_ok=True)
    tag = f".tmp.{os.getpid()}"
    for name, path in paths.items():
        with open(path + tag, "wb") as f:
            np.save(f, np.ascontiguousarray(arrays[name]))
        os.replace(path + tag, path)
    with open(marker + tag, "w", encoding="utf-8") as f:
        json.dump(description, f, indent=2, sort_keys=True)
    os.replace(marker + tag, marker)


class MappedArraysPickleMixin:
    """Pickle memory-mapped cache arrays as their file names, not as copies of their data.

    DataLoader workers started with ``spawn`` receive the dataset by pickling; a multi-GB
    sample index would otherwise be copied into every worker.
    """

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for key, value in state.items():
            if isinstance(value, np.memmap) and value.filename is not None:
                state[key] = _MappedFile(value.filename)
        return state

    def __setstate__(self, state: dict) -> None:
        for key, value in state.items():
            if isinstance(value, _MappedFile):
                state[key] = np.load(value.path, mmap_mode="r")
        self.__dict__.update(state)


class _MappedFile:
    def __init__(self, path: str) -> None:
        self.path = path
