"""The manifest of a training checkpoint: every file's size and CRC-32, written before ``latest``.

``step_XXXXXXX/manifest.json``::

    {"format": "megagpt-manifest", "version": 1, "checksum": "crc32",
     "files": {"layout_free/meta.json": {"size": 2113, "crc32": "5f0c1a2b"}, ...}}

It lists every file of the checkpoint folder (the layout-free record, the RNG streams, DeepSpeed's
native files when ``checkpoint.native``); ``manager.commit`` writes it after every rank has saved
and before ``latest`` names the checkpoint, so a committed checkpoint always has one.

Why CRC-32: it finds what actually happens to checkpoints (a truncated copy, a file lost or
overwritten, flipped bytes) at ~3.8 GB/s per core here (zlib, streamed; blake2b ran 0.9 GB/s,
sha256 1.7). It is not a signature: whoever can write the folder can rewrite the manifest, which
is why pickles stay unread without ``checkpoint.trust_pickle``. Cost: the files are shared round
robin over the ranks, so each rank reads back 1/world of the checkpoint once at save and once at
resume -- for gpt3-1.3b (fp32 master + two Adam moments, ~15.6 GB) ~4 s on one rank, ~0.5 s
per rank on 8, plus the filesystem's read time.

A checkpoint without a manifest (written by an older megagpt, or by hand) is checked for
structure only: ``layout_free/meta.json`` parses and every safetensors file is exactly as long as
its header says (which finds truncation, not flipped bytes). A folder of DeepSpeed native files
only is left to the engine, which refuses it unless ``checkpoint.trust_pickle``.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any, TypeVar

import torch.distributed as dist

FORMAT = "megagpt-manifest"
VERSION = 1
MANIFEST = "manifest.json"
META = "layout_free/meta.json"
_BLOCK = 8 << 20

T = TypeVar("T")
# A file to check: (path relative to the checkpoint, its manifest entry or None: structure only)
Entry = tuple[str, "dict | None"]


def crc32(path: str | Path) -> str:
    """CRC-32 of a file, read in 8 MiB blocks, as 8 hex digits."""
    value = 0
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            value = zlib.crc32(block, value)
    return f"{value:08x}"


def _distributed(flag: bool | None) -> bool:
    if flag is None:
        flag = dist.is_initialized()
    return flag and dist.is_initialized() and dist.get_world_size() > 1


def _broadcast(obj: T | None, distributed: bool) -> T:
    """Rank 0's ``obj`` on every rank (one listing of a shared folder, so all ranks agree); the
    other ranks pass None."""
    if not distributed:
        assert obj is not None, "a single process is rank 0: it passes its own object"
        return obj
    box: list[Any] = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(items: list, distributed: bool) -> list:
    """Every rank's ``items`` concatenated, on every rank."""
    if not distributed:
        return items
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, items)
    return [x for part in out for x in part]


def _share(items: list, distributed: bool) -> list:
    """This rank's round-robin share of ``items`` (all of them in one process)."""
    if not distributed:
        return items
    return items[dist.get_rank() :: dist.get_world_size()]


def _listing(checkpoint: Path) -> list[str]:
    """Files of a checkpoint folder, relative POSIX paths, without the manifest and temp files."""
    return sorted(
        p.relative_to(checkpoint).as_posix()
        for p in checkpoint.rglob("*")
        if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp")
    )


def write(checkpoint: str, distributed: bool | None = None) -> None:
    """Write ``checkpoint/manifest.json`` for the files now in the folder.

    Collective when a process group runs (``distributed`` None) or ``distributed`` is True:
    every rank hashes its share, rank 0 writes. Call it once every rank has finished writing.
    """
    distributed = _distributed(distributed)
    root = Path(checkpoint)
    files = _broadcast(
        _listing(root) if not distributed or dist.get_rank() == 0 else None, distributed
    )
    mine = [
        (rel, os.path.getsize(root / rel), crc32(root / rel)) for rel in _share(files, distributed)
    ]
    entries = _gather(mine, distributed)
    if distributed and dist.get_rank() != 0:
        return
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "checksum": "crc32",
        "files": {rel: {"size": size, "crc32": crc} for rel, size, crc in sorted(entries)},
    }
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, root / MANIFEST)


def has_manifest(checkpoint: str) -> bool:
    return (Path(checkpoint) / MANIFEST).is_file()


def safetensors_problem(path: str | Path) -> str | None:
    """Why a safetensors file is unreadable (short, bad header, truncated), or None when its
    length is exactly what its header describes."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{path}: {size} bytes, too short for a safetensors file"
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            return f"{path}: truncated ({size} bytes; its header alone needs {8 + n})"
        try:
            header = json.loads(f.read(n))
            end = max(
                (v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0
            )
        except (ValueError, KeyError, TypeError, IndexError):
            return f"{path}: not a safetensors file (unreadable header)"
    if size != 8 + n + end:
        return f"{path}: truncated or padded: {size} bytes, its header describes {8 + n + end}"
    return None


def _check_entry(root: Path, rel: str, entry: dict | None) -> str | None:
    path = root / rel
    if not path.is_file():
        return f"{path} is missing"
    if entry is None:  # structure-only check
        if rel == META:
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except ValueError:
                return f"{path}: not valid JSON"
        return safetensors_problem(path) if rel.endswith(".safetensors") else None
    size = path.stat().st_size
    if size != entry["size"]:
        return f"{path}: {size} bytes, the manifest recorded {entry['size']}"
    crc = crc32(path)
    if crc != entry["crc32"]:
        return f"{path}: checksum {crc} != {entry['crc32']} recorded (the bytes changed)"
    return None


def verify(checkpoint: str, distributed: bool | None = None) -> list[str]:
    """Problems of a checkpoint folder, one line each naming the file; [] when intact.

    With a manifest: every listed file must exist with its size and CRC-32 (files not listed are
    ignored: nothing reads them). Without: structure only (see the module doc). Collective like
    ``write``: every rank checks its share and all ranks return the same list.
    """
    distributed = _distributed(distributed)
    root = Path(checkpoint)
    plan = _plan(root) if not distributed or dist.get_rank() == 0 else None
    problems, entries = _broadcast(plan, distributed)
    if problems:
        return problems
    mine = [
        p
        for rel, entry in _share(entries, distributed)
        if (p := _check_entry(root, rel, entry)) is not None
    ]
    return sorted(_gather(mine, distributed))


def _plan(root: Path) -> tuple[list[str], list[Entry]]:
    """(problems found before reading any file, the files to check) of a checkpoint folder."""
    if not root.is_dir():
        return [f"{root} does not exist"], []
    if has_manifest(str(root)):
        try:
            m = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
            if m.get("format") != FORMAT:
                raise ValueError(f"format {m.get('format')!r}, expected {FORMAT!r}")
            return [], sorted(m["files"].items())
        except (ValueError, KeyError, AttributeError) as e:
            return [f"{root / MANIFEST}: unreadable ({e})"], []
    files = set(_listing(root))
    # Without a record, DeepSpeed's native files may be all there is: whether those may
    # be read (checkpoint.trust_pickle) is the engine's decision, not a damage.
    native_only = any("/" not in rel and rel.endswith(".pt") for rel in files)
    if not native_only:
        files.add(META)
    return [], [(rel, None) for rel in sorted(files) if rel == META or rel.endswith(".safetensors")]
