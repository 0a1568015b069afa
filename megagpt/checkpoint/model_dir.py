"""The megagpt model directory: a consolidated, layout-free model anyone can load.

Layout::

    DIR/config.json                     {"format": "megagpt-model", "version": 1, "model": {...}}
    DIR/model.safetensors               one file, or, for models saved from pipeline stages,
    DIR/model-00001-of-00004.safetensors ... plus DIR/model.safetensors.index.json
    DIR/tokenizer/                      the tokenizer files (tokenizer.json, vocab.txt or .model)

Tensors are keyed by canonical parameter names (``layers.3.mlp.dense_h_to_4h.weight``, see
``megagpt.model.init.canonical_parameters``), unsharded, with the word embedding cut to the true
vocabulary. Loading pads and slices them for any TP/PP layout (the rules of ``canonical.py``).
Every fault raises ``CheckpointError`` (also importable as ``ModelDirError``) naming the file or
tensor.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from megagpt.checkpoint.canonical import CheckpointError, gather_shards, local_shard, unpad_vocab
from megagpt.config.schema import ModelConfig
from megagpt.model.init import canonical_parameters, full_shape

if TYPE_CHECKING:
    from megagpt.inference.sampling import GenerationDefaults

FORMAT = "megagpt-model"
VERSION = 1

# The one checkpoint error class; the old name stays for code that catches it.
ModelDirError = CheckpointError


def is_model_dir(path: str) -> bool:
    """True when ``path`` holds a ``config.json`` of format ``megagpt-model``."""
    p = Path(path) / "config.json"
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text(encoding="utf-8")).get("format") == FORMAT
    except (ValueError, OSError):
        return False


def read_config(directory: str) -> ModelConfig:
    """The ModelConfig stored in ``directory/config.json``."""
    path = Path(directory) / "config.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist: not a megagpt model directory") from None
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = set(meta["model"]) - known
    if unknown:
        raise CheckpointError(f"{path}: unknown model keys {sorted(unknown)}")
    return ModelConfig(**meta["model"])


def read_generation(directory: str) -> GenerationDefaults:
    """The directory's decoding defaults (``config.json``'s ``generation``, ModelScope's
    names, written when it was converted from a checkpoint that had them); the original's
    when it has none."""
    from megagpt.inference.sampling import GenerationDefaults

    path = Path(directory) / "config.json"
    meta = json.loads(path.read_text(encoding="utf-8"))
    settings = meta.get("generation") or {}
    vocab = int(meta["model"]["vocab_size"])
    return GenerationDefaults.from_config(settings, f"{path} (generation)", vocab)


def tokenizer_path(directory: str) -> str | None:
    """The tokenizer folder inside a model directory, or None when none was saved."""
    p = Path(directory) / "tokenizer"
    return str(p) if p.is_dir() and any(p.iterdir()) else None


def write_config(directory: str, cfg: ModelConfig, extra: dict | None = None) -> None:
    """Write ``directory/config.json`` for ``cfg`` (plus the keys of ``extra``)."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "version": VERSION, "model": dataclasses.asdict(cfg)}
    meta.update(extra or {})
    (Path(directory) / "config.json").write_text(
        json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )


def copy_tokenizer(directory: str, source: str) -> None:
    """Copy a tokenizer (a folder's files, or one file) into ``directory/tokenizer/``, where
    ``build_tokenizer`` of that folder loads the same tokenizer (the same ids).

    A single file goes with the settings file beside it (``megagpt_tokenizer.json``: e.g. a
    vocabulary trained with the ``jieba`` segmenter encodes with it), under the name a folder
    is searched for: ``x.json`` as ``tokenizer.json``, ``x.txt`` as ``vocab.txt`` (a
    SentencePiece ``*.model`` keeps its name). A segmenter the source's folder implies
    without a settings file (ModelScope's jieba, from its configuration.json) is recorded in
    one."""
    from megagpt.data.tokenizer import SIDECAR_NAME, recorded_segmenter

    dest = Path(directory) / "tokenizer"
    dest.mkdir(parents=True, exist_ok=True)
    src = Path(source)
    folder = src if src.is_dir() else src.parent
    if src.is_dir():
        for f in src.iterdir():
            if f.is_file():
                shutil.copy2(f, dest / f.name)
    else:
        name = {".json": "tokenizer.json", ".txt": "vocab.txt"}.get(src.suffix, src.name)
        shutil.copy2(src, dest / name)
        sidecar = src.parent / SIDECAR_NAME
        if sidecar.is_file() and src.name != SIDECAR_NAME:
            shutil.copy2(sidecar, dest / SIDECAR_NAME)
    segmenter = recorded_segmenter(str(folder))
    if segmenter is not None and not (dest / SIDECAR_NAME).exists():
        (dest / SIDECAR_NAME).write_text(
            json.dumps({"segmenter": segmenter}, indent=2) + "\n",
            encoding="utf-8",
        )


@torch.no_grad()
def full_tensors(
    module: torch.nn.Module,
    cfg: ModelConfig,
    tp_group: dist.ProcessGroup | None = None,
    tp_size: int = 1,
    getter: Callable[[torch.nn.Parameter], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Unsharded CPU copies of this stage's parameters, by canonical name.

    ``getter(p)`` returns the value to save for parameter ``p`` (the engine passes one that
    reads the fp32 master copy, gathered across ZeRO partitions). Collective over the
    tensor-parallel group (all-gathers each partitioned tensor), and over data parallel when
    the getter is.
    """
    out: dict[str, torch.Tensor] = {}
    for name, p in canonical_parameters(module):
        t = (getter(p) if getter is not None else p).detach()
        _, dim = full_shape(p, tp_size)
        if dim is not None:
            parts = [torch.empty_like(t) for _ in range(tp_size)]
            dist.all_gather(parts, t.contiguous(), group=tp_group)
            t = gather_shards(name, parts, dim, "this model")
        t = unpad_vocab(name, t, cfg.vocab_size)
        out[name] = t.float().cpu().contiguous() if t.dtype != torch.float32 else t.cpu().clone()
    return out


def save_tensors(
    directory: str, tensors: dict[str, torch.Tensor], shard: int = 0, num_shards: int = 1
) -> str:
    """Write one shard of the weights (``num_shards`` = pipeline stages); returns its file."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    name = (
        "model.safetensors"
        if num_shards == 1
        else f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
    )
    tmp = Path(directory) / (name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, Path(directory) / name)
    return name


def write_index(directory: str, num_shards: int) -> None:
    """For sharded weights: model.safetensors.index.json mapping tensor -> file."""
    from safetensors import safe_open

    weight_map = {}
    for s in range(num_shards):
        name = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
        with safe_open(str(Path(directory) / name), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                weight_map[key] = name
    (Path(directory) / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": weight_map}, indent=1) + "\n", encoding="utf-8"
    )


def load_tensors(directory: str) -> dict[str, torch.Tensor]:
    """All weights of a model directory (single file or sharded), by canonical name."""
    d = Path(directory)
    if (d / "model.safetensors").is_file():
        return _load_file(d / "model.safetensors")
    index = d / "model.safetensors.index.json"
    if not index.is_file():
        raise CheckpointError(f"{d}: no model.safetensors or model.safetensors.index.json")
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(_load_file(d / f))
    return out


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    """One safetensors file; a truncated or foreign file raises CheckpointError naming it (weights
    are only ever read as safetensors here: no pickle is opened)."""
    from megagpt.checkpoint.manifest import safetensors_problem

    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError and friends carry no file name
        raise CheckpointError(
            safetensors_problem(path) or f"{path}: not a readable safetensors file ({e})"
        ) from None


@torch.no_grad()
def load_into(
    module: torch.nn.Module,
    tensors: dict[str, torch.Tensor],
    cfg: ModelConfig,
    tp_rank: int = 0,
    tp_size: int = 1,
    *,
    source: str = "weights",
) -> None:
    """Copy full tensors into a (possibly sharded) model or pipeline stage.

    Every local parameter must be present with the right full shape; a mismatch raises
    CheckpointError naming the tensor, ``source`` and both shapes. Extra tensors belonging to
    other pipeline stages are ignored.
    """
    for name, p in canonical_parameters(module):
        shape, dim = full_shape(p, tp_size)
        if name not in tensors:
            raise CheckpointError(f"{source}: missing tensor {name!r} (expected shape {shape})")
        t = local_shard(name, tensors[name], shape, dim, cfg.vocab_size, tp_rank, tp_size, source)
        p.copy_(t.to(dtype=p.dtype, device=p.device))
