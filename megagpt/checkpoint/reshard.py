"""The layout-free record inside every training checkpoint: resume under any TP / PP / DP / ZeRO.

Every checkpoint is this record (safetensors and JSON, no pickle): it is the whole of the
model and optimizer state a resume needs. ``megagpt.checkpoint.training`` writes it in
``<run.dir>/checkpoints/step_XXXXXXX/``, beside ``rng/`` (the per-rank RNG streams) and, only
when ``checkpoint.native`` is set, DeepSpeed's own files::

    layout_free/meta.json                              saved layout, model config, Adam step,
                                                       engine counters, client state (JSON)
    layout_free/tp00-pp00.param.safetensors            fp32 master of this (tp, pp) rank
    layout_free/tp00-pp00.exp_avg.safetensors          Adam first moment
    layout_free/tp00-pp00.exp_avg_sq.safetensors       Adam second moment
    ...                                                one set per (tp, pp) rank

Each file is written by the data-parallel rank 0 of its (tp, pp) rank and holds that rank's
local TENSOR-PARALLEL shard of every parameter of its pipeline stage, by canonical name (so ZeRO
partitions are already gathered); its safetensors metadata records each tensor's partition dim.
Reading gathers the TP shards of a tensor (whatever TP saved them), cuts the word embedding
to the true vocabulary, and cuts out the reader's own shard: the reader's layout never needs to
match the writer's. Which pipeline stage held a tensor does not matter either: the reader indexes
every file by tensor name. The padding, splitting and gathering rules are ``canonical.py``'s.

DeepSpeed's native files (``checkpoint.native``, off by default) are pickles, and this module
never reads them. ``training.py`` hands them to DeepSpeed instead of this record only with
``checkpoint.trust_pickle`` and when the record is absent or was saved with the very layout
(TP, PP, DP, ZeRO stage, precision) of the resuming run. Writing them costs disk: the
checkpoint then holds the model and optimizer state twice.
This module never imports deepspeed; ``training.py`` passes the engine's accessors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megagpt.checkpoint.canonical import (
    CheckpointError,
    expected_shapes,
    gather_shards,
    local_shard,
    pad_vocab,
    partition_dim,
    split_for_tp,
    unpad_vocab,
)
from megagpt.config.schema import ModelConfig
from megagpt.model.gpt import padded_vocab_size
from megagpt.parallel.dims import split_layers

FORMAT = "megagpt-reshard"
VERSION = 1
RECORD = "layout_free"
KINDS = ("param", "exp_avg", "exp_avg_sq")
OPTIMIZER_KINDS = KINDS[1:]


def record_path(checkpoint: str) -> Path:
    """The record folder of a tagged checkpoint folder."""
    return Path(checkpoint) / RECORD


def _file(tp_rank: int, pp_rank: int, kind: str) -> str:
    return f"tp{tp_rank:02d}-pp{pp_rank:02d}.{kind}.safetensors"


def _write(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={k: json.dumps(v) for k, v in meta.items()})
    os.replace(tmp, path)


def _write_meta(folder: Path, meta: dict) -> None:
    tmp = folder / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, folder / "meta.json")


def json_client_state(client: dict) -> dict:
    """The JSON-safe part of a trainer client state (step, samples, config; not RNG tensors)."""
    out = {}
    for k, v in client.items():
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            continue
        out[k] = v
    return out


# -- writing ------------------------------------------------------------------------------


def save_shards(
    checkpoint: str,
    params: list[tuple[str, torch.nn.Parameter, int | None]],
    get: Callable[[torch.nn.Parameter, str], torch.Tensor],
    *,
    tp_rank: int,
    tp: int,
    pp_rank: int,
    pp: int,
    write: bool,
) -> None:
    """Write this (tp, pp) rank's shard files of the record (a running job; ``training.py``
    passes the engine's parameters and optimizer accessors).

    ``params`` are (canonical name, parameter, partition dim); ``get(p, kind)`` returns the local
    TP shard of kind ``param``/``exp_avg``/``exp_avg_sq``. ``get`` may be collective over data
    parallel (ZeRO): every DP rank calls this with the same params; only ``write`` ranks write.
    """
    folder = record_path(checkpoint)
    if write:
        folder.mkdir(parents=True, exist_ok=True)
    partition = {name: (-1 if dim is None else dim) for name, _, dim in params}
    for kind in KINDS:
        tensors = {}
        for name, p, _ in params:
            t = get(p, kind)
            if write:
                tensors[name] = t.detach().float().cpu().contiguous()
        if write:
            _write(
                folder / _file(tp_rank, pp_rank, kind),
                tensors,
                {
                    "format": FORMAT,
                    "kind": kind,
                    "tp_rank": tp_rank,
                    "tp": tp,
                    "pp_rank": pp_rank,
                    "pp": pp,
                    "partition": partition,
                },
            )


def save_meta(
    checkpoint: str,
    *,
    layout: dict,
    model: ModelConfig,
    adam_step: int,
    engine: dict,
    client: dict,
    kinds: Iterable[str] = KINDS,
) -> None:
    """Write ``meta.json`` of the record (one rank)."""
    folder = record_path(checkpoint)
    folder.mkdir(parents=True, exist_ok=True)
    _write_meta(
        folder,
        {
            "format": FORMAT,
            "version": VERSION,
            "layout": layout,
            "model": dataclasses.asdict(model),
            "adam_step": int(adam_step),
            "engine": engine,
            "client": json_client_state(client),
            "kinds": list(kinds),
        },
    )


def stage_names(cfg: ModelConfig, stage: int, stages: int) -> list[str]:
    """Canonical tensors a pipeline stage writes (the tied word embedding only on stage 0)."""
    layers = split_layers(cfg.num_layers, stages)[stage]
    out = []
    for name in expected_shapes(cfg):
        if name.startswith("embedding."):
            keep = stage == 0
        elif name.startswith("layers."):
            keep = int(name.split(".")[1]) in layers
        else:
            keep = stage == stages - 1
        if keep:
            out.append(name)
    return out


def write_record(
    checkpoint: str,
    states: dict[str, dict[str, torch.Tensor]],
    cfg: ModelConfig,
    *,
    tp: int,
    pp: int,
    adam_step: int = 0,
    client: dict | None = None,
    engine: dict | None = None,
) -> None:
    """Write a whole record offline for layout (tp, pp) from full canonical tensors.

    ``states`` maps kind -> canonical state; ``param`` is required, the Adam moments optional
    (absent: a resume starts them at zero, as for fresh weights).
    """
    folder = record_path(checkpoint)
    folder.mkdir(parents=True, exist_ok=True)
    padded = padded_vocab_size(cfg.vocab_size, tp)
    for kind, state in states.items():
        for stage in range(pp):
            names = stage_names(cfg, stage, pp)
            per_rank: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
            for name in names:
                t = pad_vocab(name, state[name].float(), padded, checkpoint)
                for r, shard in enumerate(split_for_tp(name, t, tp, checkpoint)):
                    per_rank[r][name] = shard.contiguous()  # safetensors saves no views
            partition = {n: (-1 if partition_dim(n) is None else partition_dim(n)) for n in names}
            for r in range(tp):
                _write(
                    folder / _file(r, stage, kind),
                    per_rank[r],
                    {
                        "format": FORMAT,
                        "kind": kind,
                        "tp_rank": r,
                        "tp": tp,
                        "pp_rank": stage,
                        "pp": pp,
                        "partition": partition,
                    },
                )
    save_meta(
        checkpoint,
        layout={"tp": tp, "pp": pp, "dp": None, "zero_stage": None, "precision": "fp32"},
        model=cfg,
        adam_step=adam_step,
        engine=engine or {},
        client=client or {},
        kinds=list(states),
    )


# -- reading ------------------------------------------------------------------------------


@contextlib.contextmanager
def _open(path: Path) -> Iterator[Any]:
    """``safe_open`` whose failures (truncated or foreign file) name the file."""
    from megagpt.checkpoint.manifest import safetensors_problem

    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as e:  # SafetensorError, OSError: say which file, and why when we can
        why = safetensors_problem(path) if path.is_file() else None
        raise CheckpointError(why or f"{path}: not a readable safetensors file ({e})") from None
    with handle as h:
        yield h


def read_meta(checkpoint: str) -> dict | None:
    """The record's meta.json, or None when the checkpoint has no record (older format)."""
    path = record_path(checkpoint) / "meta.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def model_config(meta: dict, checkpoint: str) -> ModelConfig:
    """The model config recorded in ``meta`` (``read_meta`` of the tagged folder ``checkpoint``);
    CheckpointError names meta.json when it holds none this megagpt reads."""
    try:
        return ModelConfig(**meta["model"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(
            f"{record_path(checkpoint) / 'meta.json'}: no model config this megagpt reads ({e})"
        ) from None


class Record:
    """Read access to a record: full tensors by (canonical name, kind), TP shards merged."""

    def __init__(self, checkpoint: str):
        meta = read_meta(checkpoint)
        if meta is None:
            native = sorted(Path(checkpoint).glob("*.pt")) if Path(checkpoint).is_dir() else []
            hint = (
                f"; {native[0].name} is a DeepSpeed native file (a pickle, which megagpt "
                "reads only to resume a run with checkpoint.trust_pickle=true)"
                if native
                else ""
            )
            raise CheckpointError(
                f"{checkpoint}: no layout-free record ({RECORD}/meta.json)" + hint
            )
        self.meta = meta
        self.folder = record_path(checkpoint)
        self.model = model_config(meta, checkpoint)
        lay = meta["layout"]
        self.kinds = list(meta.get("kinds", KINDS))
        # name -> kind -> pp stage -> {tp_rank: (file, dim)}
        self._index: dict[str, dict[str, dict[int, dict[int, tuple[Path, int | None]]]]] = {}
        for kind in self.kinds:
            for stage in range(lay["pp"]):
                for r in range(lay["tp"]):
                    f = self.folder / _file(r, stage, kind)
                    if not f.is_file():
                        raise CheckpointError(
                            f"{f} is missing: the record of {checkpoint} was "
                            f"saved with TP={lay['tp']} PP={lay['pp']} and "
                            "needs one file per (tp, pp) rank"
                        )
                    with _open(f) as h:
                        part = json.loads(h.metadata()["partition"])
                        stored = h.keys()  # safe_open handles are not iterable
                        for name in stored:
                            dim = part.get(name, -1)
                            self._index.setdefault(name, {}).setdefault(kind, {}).setdefault(
                                stage, {}
                            )[r] = (f, None if dim < 0 else dim)

    @property
    def names(self) -> list[str]:
        return list(self._index)

    def file_of(self, name: str) -> Path:
        """A file of the record that holds tensor ``name`` (for messages)."""
        stages = next(iter(self._index[name].values()))
        return next(iter(stages[min(stages)].values()))[0]

    def has(self, kind: str) -> bool:
        return kind in self.kinds

    def full(self, name: str, kind: str = "param") -> torch.Tensor:
        """The full tensor ``name`` of ``kind`` (word embedding cut to the true vocabulary)."""
        stages = self._index.get(name, {}).get(kind)
        if not stages:
            raise CheckpointError(f"{self.folder}: missing tensor {name!r} ({kind})")
        shards = stages[min(stages)]
        parts = []
        dim = None
        for r in sorted(shards):
            f, dim = shards[r]
            with _open(f) as h:
                try:
                    parts.append(h.get_tensor(name))
                except Exception as e:  # safetensors raises its own error types
                    raise CheckpointError(f"{f}: cannot read tensor {name!r} ({e})") from None
            if dim is None:
                break
        # The dim recorded in the files, not today's rule: the files say how they were cut.
        t = gather_shards(name, parts, dim, f"{self.folder} ({kind})")
        return unpad_vocab(name, t, self.model.vocab_size)

    def state(self, kind: str = "param") -> dict[str, torch.Tensor]:
        """Every full tensor of ``kind``, by canonical name."""
        return {name: self.full(name, kind) for name in self.names}


def load_shards(
    record: Record,
    params: list[tuple[str, torch.nn.Parameter, list[int], int | None]],
    set_: Callable[[torch.nn.Parameter, str, torch.Tensor], None],
    *,
    model: ModelConfig,
    tp_rank: int,
    tp: int,
    kinds: Iterable[str] = KINDS,
) -> None:
    """Set every local parameter (and Adam moments present in the record) from ``record``.

    ``params`` are (canonical name, parameter, full shape, partition dim) of this rank; ``model``
    the config of the whole model (every pipeline stage). CheckpointError names the tensor when
    one of ``params`` is missing from the record, or when the record holds a tensor the model
    has no place for (a record of more layers would otherwise lose them without a word).
    """
    wanted = set(record.names)
    for name, _, shape, _ in params:
        if name not in wanted:
            raise CheckpointError(
                f"{record.folder}: missing tensor {name!r} (the model expects shape {shape})"
            )
    # Against the whole model, not this rank's params: the other stages' tensors are expected.
    extra = sorted(wanted - set(expected_shapes(model)))
    if extra:
        raise CheckpointError(
            f"{record.file_of(extra[0])}: tensor {extra[0]!r} of the checkpoint, but the model "
            f"has no place for it ({len(extra)} such tensors in all; the checkpoint was saved "
            f"with {record.model.num_layers} layers, the model has {model.num_layers}): load it "
            "into the model it was trained as"
        )
    for kind in kinds:
        if not record.has(kind):
            continue
        for name, p, shape, dim in params:
            full = record.full(name, kind)
            set_(
                p,
                kind,
                local_shard(
                    name,
                    full,
                    shape,
                    dim,
                    model.vocab_size,
                    tp_rank,
                    tp,
                    f"{record.folder} ({kind})",
                ),
            )
