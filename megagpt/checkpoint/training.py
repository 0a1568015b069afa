"""The training checkpoint: the one module that writes it, verifies it and reads it back.

Layout of ``<run.dir>/checkpoints/``::

    step_0000100/layout_free/...        model, fp32 master, Adam moments by canonical name and
                                        TP shard, and meta.json (layout, counters, client
                                        state): see reshard.py
    step_0000100/rng/pp000-tp000.pt     the RNG streams of each (pp, tp) position: torch, numpy,
                                        python, CUDA and the TP-region dropout stream (plain
                                        tensors and lists, read with weights_only=True)
    step_0000100/mp_rank_00_*.pt ...    DeepSpeed's native files, only with checkpoint.native
    step_0000100/manifest.json          size and CRC-32 of every file (manifest.py)
    latest                              the newest committed tag (manager.py)

Each piece is written once, by this module: the engine hands it tensors through
``EngineState`` (its local parameters, the optimizer-state adapter of ``engine/optim_state.py``,
its counters, DeepSpeed's native save/load) and the trainer says ``save(step, client)`` /
``load(directory, tag)``. The RNG streams live only in ``rng/``; older DeepSpeed native files
that carried them in their client state (key ``"rng"``) are still read.

DeepSpeed's native files are pickles: they are read (by DeepSpeed, through the engine) only with
``checkpoint.trust_pickle`` and when the layout-free record is absent or has this very layout.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
import torch.distributed as dist

from megagpt.checkpoint import reshard
from megagpt.checkpoint.canonical import CheckpointError
from megagpt.checkpoint.manager import commit, tag_for
from megagpt.checkpoint.tags import read_latest
from megagpt.config.schema import CheckpointConfig, ModelConfig
from megagpt.parallel.context import ParallelContext

if TYPE_CHECKING:  # the engine's types, named here only for the checker
    from megagpt.engine.optim_state import OptimizerState
    from megagpt.model.rng import TensorParallelRNG

# (canonical name, parameter, full TP-unsharded shape, partition dim) of this rank
LocalParam = tuple[str, torch.nn.Parameter, list[int], "int | None"]


@dataclass
class EngineState:
    """What the engine hands the checkpoint format (``Engine.checkpoint_state()``).

    ``params(skip_tied_copy)`` yields this rank's parameters (``skip_tied_copy``: the last
    pipeline stage's copy of the tied word embedding is left out, stage 0 stores it);
    ``optim`` is the engine's ``OptimizerState`` adapter (``materialize``, ``get``, ``set``,
    ``refresh_low_precision``, ``adam_step``, ``set_adam_step``); ``counters`` / ``set_counters``
    the DeepSpeed step counters and loss scale; ``dropout_rng`` the TP-region dropout stream;
    ``save_native`` / ``load_native`` DeepSpeed's own checkpoint files (pickles); ``parallel``
    this rank's place in the layout (which shards and RNG file it writes and reads)."""

    params: Callable[[bool], Iterable[LocalParam]]
    optim: OptimizerState
    counters: Callable[[], dict]
    set_counters: Callable[[dict], None]
    layout: dict
    model: ModelConfig
    dropout_rng: TensorParallelRNG
    save_native: Callable[[str, str, dict], None]
    load_native: Callable[[str, str], "dict | None"]
    parallel: ParallelContext


# -- RNG streams ----------------------------------------------------------------------------


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _rng_file(checkpoint: str, pp: int, tp: int) -> str:
    return os.path.join(checkpoint, "rng", f"pp{pp:03d}-tp{tp:03d}.pt")


def _save_rng(checkpoint: str, tp_region: torch.Tensor, ctx: ParallelContext) -> None:
    """This rank's RNG streams, as plain tensors and lists (readable with weights_only=True).

    Every data-parallel rank of a (pp, tp) position draws the same streams (same seed, same
    dropout shapes), so DP rank 0 writes them and any DP size can read them back."""
    if not ctx.writes_shards:
        return
    # legacy=True (the default) returns the tuple form; numpy's stubs also allow a dict.
    kind, keys, pos, has_gauss, gauss = cast(
        "tuple[str, np.ndarray, int, int, float]", np.random.get_state(legacy=True)
    )
    version, state, gauss_next = random.getstate()
    blob = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": [version, list(state), gauss_next],
        "tp_region": tp_region,
    }
    if torch.cuda.is_available():
        blob["cuda"] = torch.cuda.get_rng_state()
    path = _rng_file(checkpoint, ctx.pp_rank, ctx.tp_rank)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(blob, path + ".tmp")
    os.replace(path + ".tmp", path)


def _load_rng(checkpoint: str, tp_region: TensorParallelRNG, ctx: ParallelContext) -> bool:
    """Restore this rank's RNG streams saved by ``_save_rng`` (the TP-region dropout stream into
    ``tp_region``); False when none fit (another TP/PP layout, or an older checkpoint)."""
    path = _rng_file(checkpoint, ctx.pp_rank, ctx.tp_rank)
    if not os.path.isfile(path):
        return False
    try:
        blob = torch.load(path, weights_only=True)
    except Exception as e:  # a truncated zip, or a pickle that weights_only refuses
        raise CheckpointError(f"{path}: cannot read the RNG streams ({e})") from None
    if "tp_region" in blob:
        tp_region.set_state(blob["tp_region"])
    kind, keys, pos, has_gauss, gauss = blob["numpy"]
    _set_rng_state(
        {
            "torch": blob["torch"],
            "numpy": (kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss),
            "python": (blob["python"][0], tuple(blob["python"][1]), blob["python"][2]),
            **({"cuda": blob["cuda"]} if "cuda" in blob else {}),
        }
    )
    return True


# -- the checkpoint -------------------------------------------------------------------------


def _native_files(path: str) -> list[str]:
    # DeepSpeed writes its files (mp_rank_XX_model_states.pt, *_optim_states.pt, ...) at the
    # top of the tag folder; megagpt's own .pt files (rng/) are one level down.
    return sorted(f for f in os.listdir(path) if f.endswith(".pt")) if os.path.isdir(path) else []


def _check_readable(path: str, meta: dict | None, native: list[str], trust: bool) -> None:
    """CheckpointError naming the file when ``load`` could read nothing of ``path``: no record,
    and no DeepSpeed native files it may read (``checkpoint.trust_pickle``)."""
    if meta is None and not (native and trust):
        if native:
            raise CheckpointError(
                f"{os.path.join(path, native[0])}: a DeepSpeed native checkpoint (a pickle) "
                f"and no layout-free record ({reshard.RECORD}/meta.json). Reading it can run "
                "code stored in the file; megagpt reads weights only with safetensors or "
                "torch.load(weights_only=True). If you wrote this checkpoint yourself, set "
                "checkpoint.trust_pickle=true to load it with DeepSpeed"
            )
        raise CheckpointError(
            f"{path}: no layout-free record ({reshard.RECORD}/meta.json is missing)"
        )


def saved_model(directory: str, tag: str, *, trust_pickle: bool) -> ModelConfig | None:
    """The model config checkpoint ``directory/tag`` was trained with, read from its record's
    meta.json alone; None for DeepSpeed native files without a record (readable only with
    ``trust_pickle``; they carry no config megagpt reads without unpickling). Reads no tensor
    and needs no process group, so a run checks what it will load before starting any.

    CheckpointError naming the file when ``load`` would refuse the checkpoint (no record and
    no native files it may read; an unreadable meta.json)."""
    path = os.path.join(directory, tag)
    meta = reshard.read_meta(path)
    _check_readable(path, meta, _native_files(path), trust_pickle)
    return None if meta is None else reshard.model_config(meta, path)


@dataclass
class Loaded:
    """What ``TrainingCheckpoints.load`` read: the client state saved with it, whether this
    rank's RNG streams came back (False: another TP/PP layout, the caller reseeds), and which
    files the weights came from."""

    client: dict
    rng_restored: bool
    source: str


class TrainingCheckpoints:
    """The training checkpoints of one run directory's ``checkpoints/`` folder."""

    def __init__(self, directory: str, cfg: CheckpointConfig, engine: EngineState):
        self.directory, self.cfg, self.engine = directory, cfg, engine
        self.loaded_from: str | None = None

    # -- writing --------------------------------------------------------------------------
    def save(self, step: int, client: dict) -> str:
        """Write checkpoint ``step`` (shards, meta, RNG streams, native files when asked), then
        commit it (manifest, ``latest``, pruning). Collective; returns the tag.

        ``client`` is the JSON-safe state of the caller (step, samples consumed, config)."""
        e = self.engine
        tag = tag_for(step)
        folder = os.path.join(self.directory, tag)
        # A folder of this tag that `latest` does not name is a leftover (a save that crashed
        # before its commit): start it empty, so the manifest lists exactly this save's files.
        committed = read_latest(self.directory) == tag
        if e.parallel.rank == 0 and Path(folder).exists() and not committed:
            shutil.rmtree(folder)
        dist.barrier()
        if self.cfg.native:
            e.save_native(self.directory, tag, client)
        os.makedirs(folder, exist_ok=True)
        e.optim.materialize()
        reshard.save_shards(
            folder,
            [(n, p, d) for n, p, _, d in e.params(True)],
            e.optim.get,
            tp_rank=e.parallel.tp_rank,
            tp=e.layout["tp"],
            pp_rank=e.parallel.pp_rank,
            pp=e.layout["pp"],
            write=e.parallel.writes_shards,
        )
        if e.parallel.rank == 0:
            reshard.save_meta(
                folder,
                layout=e.layout,
                model=e.model,
                adam_step=e.optim.adam_step(),
                engine=e.counters(),
                client=client,
            )
        dist.barrier()
        _save_rng(folder, e.dropout_rng.get_state(), e.parallel)
        commit(self.directory, tag, self.cfg.keep_last)
        return tag

    # -- reading --------------------------------------------------------------------------
    def load(self, directory: str, tag: str) -> Loaded:
        """Load ``directory/tag`` (verified by the caller through ``manager.resume_tag`` or
        ``verify_or_raise``) into the engine and this rank's RNG streams. Collective.

        The layout-free record (safetensors + JSON): weights, fp32 master, Adam moments and
        step, re-cut for this layout. DeepSpeed's native files are pickles (``torch.load`` with
        ``weights_only=False`` runs any code they hold), so DeepSpeed's own load is used only
        with ``checkpoint.trust_pickle`` and when the record is absent or has this very layout;
        without it they are never opened, and a folder with nothing else is refused with a
        CheckpointError naming the file.
        """
        e = self.engine
        path = os.path.join(directory, tag)
        meta = reshard.read_meta(path)
        native = _native_files(path)
        trust = self.cfg.trust_pickle
        _check_readable(path, meta, native, trust)
        if native and trust and (meta is None or meta["layout"] == e.layout):
            source = "DeepSpeed native files (checkpoint.trust_pickle)"
            client = e.load_native(directory, tag)
            if client is None:
                raise CheckpointError(f"{path}: DeepSpeed found no checkpoint to load")
        else:
            source = "layout-free record" + (
                f" (DeepSpeed's {', '.join(native)} not read: checkpoint.trust_pickle is off)"
                if native and not trust
                else ""
            )
            assert meta is not None  # no record and no trusted native files raised above
            record = reshard.Record(path)
            e.optim.materialize()
            reshard.load_shards(
                record,
                list(e.params(False)),
                e.optim.set,
                model=e.model,
                tp_rank=e.parallel.tp_rank,
                tp=e.layout["tp"],
            )
            e.optim.refresh_low_precision()
            e.optim.set_adam_step(int(meta["adam_step"]))
            e.set_counters(meta.get("engine", {}))
            dist.barrier()
            client = dict(meta.get("client", {}))
        self.loaded_from = source
        restored = _load_rng(path, e.dropout_rng, e.parallel)
        if not restored and "rng" in client:
            # DeepSpeed native files of an older megagpt carried the streams in their client
            # state (saved before the rng/ files existed).
            _set_rng_state(client["rng"])
            restored = True
        return Loaded(client=client, rng_restored=restored, source=source)
