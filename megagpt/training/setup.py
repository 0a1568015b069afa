"""A training run's setup in one straight line: ``build_run(cfg, stop) -> RunParts``.

Order, so that bad input fails before anything expensive or collective starts:

1. the config, validated once (before any process group), the tokenizer (it fixes
   ``model.vocab_size``) and the indexed data paths;
2. the device and the process groups (``megagpt.parallel.initialize``: a ``ParallelContext``);
3. the run directory (``config.yaml``, ``checkpoints/``);
4. the host RNG seeds (named offsets below);
5. the model and its engine, the training checkpoints of the run;
6. where the weights come from: the run's own checkpoint, ``checkpoint.load``, the start weights
   given (fine-tuning's ``finetune.init_from``) or the seeded initialisation;
7. the data (pretraining: the indexed datasets; fine-tuning brings its own) and the metrics sinks.

``megagpt.training.trainer.Trainer`` loops over the parts; pretraining and fine-tuning differ
only in the datasets, start weights, batches and evaluator they hand it.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from megagpt import parallel
from megagpt.checkpoint import checkpoint_dir, resolve_load, resume_tag, verify_or_raise
from megagpt.checkpoint.training import TrainingCheckpoints
from megagpt.config import Config, ConfigError, dump_yaml, validate
from megagpt.config.schema import ModelConfig, to_dict
from megagpt.model.matmul import cpu_matmul_note
from megagpt.training import watchdog
from megagpt.training.host_memory import keep_freed_memory
from megagpt.training.metrics import MetricsWriter
from megagpt.training.precision import configure_matmul_precision
from megagpt.training.signals import StopFlag

if TYPE_CHECKING:
    from megagpt.engine import Engine
    from megagpt.parallel import ParallelContext

# -- seeds ----------------------------------------------------------------------------------
# The host generators (torch, NumPy, Python) and the TP-region dropout stream start from
# ``train.seed`` plus an offset per pipeline stage: the stages hold different layers, so their
# dropout draws must not repeat one another (Megatron's convention, kept so that a run's dropout
# masks match Megatron-style runs and megagpt runs of earlier versions). Ranks of one stage (its
# TP and DP ranks) share the host seed; the TP region's stream adds its own per-TP-rank offset
# (``megagpt.model.rng``).
PIPELINE_STAGE_SEED_STRIDE = 100
# A resume into another TP/PP layout cannot restore per-rank RNG streams (they do not map
# across layouts), so the streams are reseeded; adding a prime multiple of the step keeps a
# resumed run from replaying the draws of step 0 (and two resumes at different steps apart).
RESEED_STEP_STRIDE = 7919


def stage_seed(seed: int, pp_rank: int) -> int:
    """The host and dropout seed of pipeline stage ``pp_rank`` of a run seeded ``seed``."""
    return seed + PIPELINE_STAGE_SEED_STRIDE * pp_rank


def reseed_after_layout_change(seed: int, pp_rank: int, step: int) -> int:
    """The seed of stage ``pp_rank`` after resuming step ``step`` into another layout."""
    return stage_seed(seed, pp_rank) + RESEED_STEP_STRIDE * step


def seed_host_rngs(seed: int) -> None:
    """Seed torch (CPU and CUDA), NumPy and Python's ``random`` with ``seed``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed(seed)


def log0(msg: str) -> None:
    """Print ``msg`` once per job (global rank 0, or the lone process)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"[megagpt] {msg}", flush=True)


# -- tokenizer and data paths (before any process group) ----------------------------------
def load_tokenizer(cfg: Config, *, vocab_fixed_by: str = ""):
    """Load ``data.tokenizer``; returns the tokenizer.

    When nothing fixes the vocabulary, ``model.vocab_size`` becomes the tokenizer's size (it is
    recorded in config.yaml). ``vocab_fixed_by`` names the setting whose weights fix it (e.g.
    ``finetune.init_from``): a tokenizer of another size is then a ConfigError.
    """
    from megagpt.data import DataError, build_tokenizer

    if not cfg.data.tokenizer:
        raise ConfigError("data.tokenizer is empty: give a tokenizer file or directory")
    try:
        tok = build_tokenizer(cfg.data.tokenizer)
    except (OSError, ValueError, DataError) as e:
        raise ConfigError(f"data.tokenizer={cfg.data.tokenizer!r}: {e}") from None
    if tok.vocab_size != cfg.model.vocab_size:
        if vocab_fixed_by:
            raise ConfigError(
                f"data.tokenizer has {tok.vocab_size} tokens but the model of "
                f"{vocab_fixed_by} has a vocabulary of {cfg.model.vocab_size}; "
                "use the model's own tokenizer (leave data.tokenizer empty)"
            )
        log0(
            f"model.vocab_size {cfg.model.vocab_size} -> {tok.vocab_size} "
            f"(the size of data.tokenizer)"
        )
        cfg.model.vocab_size = tok.vocab_size
    return tok


def check_data_paths(cfg: Config) -> None:
    """Every data.paths entry must be an existing PREFIX.bin / PREFIX.idx pair whose token ids
    fit ``cfg.model.vocab_size``; ConfigError / DataError name the entry otherwise."""
    for i, prefix in enumerate(cfg.data.paths):
        for ext in (".bin", ".idx"):
            if not os.path.isfile(prefix + ext):
                raise ConfigError(
                    f"data.paths[{i}]: {prefix + ext} does not exist (give the "
                    "prefix written by `megagpt preprocess --output-prefix`)"
                )
    # Every token id must fit the model's vocabulary (set from data.tokenizer by then): an id
    # past it raises a bare IndexError at TP=1 and silently reads another rank's rows at TP>1.
    from megagpt.data.indexed import check_vocab

    for i, prefix in enumerate(cfg.data.paths):
        check_vocab(prefix, cfg.model.vocab_size, f"data.paths[{i}]")


# -- start weights ------------------------------------------------------------------------
@dataclass
class StartWeights:
    """Full canonical weights a run starts from at step 0 with a fresh optimizer.

    ``kind`` is the checkpoint kind ``megagpt.checkpoint.convert`` read ("megagpt", "training",
    "modelscope", "hf"); ``key`` the setting that named ``path`` (for messages)."""

    kind: str
    path: str
    key: str
    model: ModelConfig
    tensors: dict[str, torch.Tensor]
    tokenizer: str = ""


def read_start_weights(path: str, key: str, *, training_as_weights: bool) -> StartWeights | None:
    """Read the weights at ``path`` (named by setting ``key``) before any process group.

    A model directory, a ModelScope or a Hugging Face directory gives its weights. A training
    checkpoint gives its weights when ``training_as_weights`` (fine-tuning), else None: the
    run continues it with its optimizer and step (``checkpoint.load``). Unreadable or unknown
    checkpoints are a ConfigError naming ``key`` and the file.
    """
    from megagpt.checkpoint.canonical import CheckpointError
    from megagpt.checkpoint.convert import detect, read

    try:
        if not training_as_weights and detect(path) == "training":
            return None
        src = read(path)
    except (CheckpointError, FileNotFoundError) as e:
        raise ConfigError(f"{key}={path!r}: {e}") from None
    return StartWeights(src.kind, path, key, src.cfg, src.tensors, src.tokenizer or "")


def load_start_weights(engine: Engine, cfg: ModelConfig, start: StartWeights) -> None:
    """Load ``start`` into the engine (any layout; collective) after checking that it fits the
    model ``cfg``; ConfigError lists every model key that differs."""
    diff = [
        f"model.{k}: {getattr(cfg, k)!r} here, {getattr(start.model, k)!r} there"
        for k in (
            "num_layers",
            "num_heads",
            "hidden_size",
            "ffn",
            "max_position_embeddings",
            "vocab_size",
            "activation",
            "layernorm_eps",
        )
        if getattr(cfg, k) != getattr(start.model, k)
    ]
    if diff:
        raise ConfigError(
            f"{start.key}={start.path!r} does not fit the model: "
            + "; ".join(diff)
            + " (set those model keys)"
        )
    engine.load_weights(start.tensors, source=start.path)
    log0(f"initialised weights from {start.kind} {start.path} (step 0, fresh optimizer)")


@dataclass
class TrainState:
    """Where the run is: optimizer steps taken and global samples consumed."""

    step: int = 0
    consumed_samples: int = 0


def resume(
    cfg: Config,
    ctx: ParallelContext,
    engine: Engine,
    checkpoints: TrainingCheckpoints,
    start: StartWeights | None = None,
) -> TrainState:
    """Where the weights come from, first match wins; returns the state to continue from.

    1. The run's own newest intact checkpoint (verified against its manifest; a damaged newest
       one is named and the one before resumed, or with ``checkpoint.require_latest`` refused).
    2. ``checkpoint.load``: a training checkpoint of any TP/PP/DP/ZeRO layout (verified, then
       resharded by the engine), or pretrained weights (model directory, ModelScope or Hugging
       Face dir) that start the run at step 0.
    3. ``start``: weights given by the caller (fine-tuning's ``finetune.init_from``), step 0.
    4. Nothing: the seeded initialisation the model was built with.
    Collective.
    """
    ck = cfg.checkpoint
    directory = checkpoints.directory
    tag = resume_tag(directory, require_latest=ck.require_latest, log=log0)
    if tag is None and ck.load:
        pretrained = read_start_weights(ck.load, "checkpoint.load", training_as_weights=False)
        if pretrained is not None:
            load_start_weights(engine, cfg.model, pretrained)
            return TrainState()
        directory, tag = resolve_load(ck.load)
        verify_or_raise(directory, tag)
    if tag is None:
        if start is not None:
            load_start_weights(engine, cfg.model, start)
        return TrainState()
    loaded = checkpoints.load(directory, tag)
    state = TrainState(
        step=int(loaded.client["step"]), consumed_samples=int(loaded.client["consumed_samples"])
    )
    if not loaded.rng_restored:
        seed = reseed_after_layout_change(cfg.train.seed, ctx.pp_rank, state.step)
        seed_host_rngs(seed)
        engine.dropout_rng.seed(seed, ctx.tp_rank)
    log0(
        f"resumed from {directory}/{tag}: step {state.step}, {state.consumed_samples} samples "
        f"consumed; read the {loaded.source}"
    )
    return state


# -- pretraining data -----------------------------------------------------------------------
def indexed_sample_counts(cfg: Config, dp: int) -> tuple[int, int]:
    """(train samples, validation samples) the indexed datasets' sample index must hold.

    Training covers the planned run (the LR decay horizon of a cosine/linear schedule), not
    just this run's ``train.steps``, so stopping early and resuming with more steps sees the
    same samples. Validation: ``eval_iters`` micro-batches per DP rank, or none when
    ``eval_interval`` is 0.
    """
    t, seq = cfg.train, cfg.model.seq_length
    planned = max(
        t.steps * t.global_batch_size,
        math.ceil(cfg.optim.decay_tokens / seq)
        if cfg.optim.schedule in ("cosine", "linear")
        else 0,
    )
    n_valid = t.eval_iters * t.micro_batch_size * dp if t.eval_interval > 0 else 0
    return planned, n_valid


def build_indexed_data(cfg: Config, dp: int, run_dir: str) -> tuple[Any, Any]:
    """(train, validation or None) GPT datasets over ``data.paths`` (blended, split)."""
    from megagpt.data import build_gpt_datasets

    planned, n_valid = indexed_sample_counts(cfg, dp)
    cache = cfg.data.cache_dir or os.path.join(run_dir, "data_cache")
    train_ds, valid_ds, _ = build_gpt_datasets(
        cfg.data.paths,
        cfg.data.weights or None,
        cfg.data.split,
        cfg.model.seq_length,
        (planned, n_valid, 0),
        cfg.train.seed,
        cache,
        weights_schedule=cfg.data.weights_schedule or None,
    )
    return train_ds, (valid_ds if n_valid else None)


class IndexedBatches:
    """Pretraining's batches: this rank's micro-batches of an indexed GPT dataset, from the
    ``DistributedBatchSampler`` split of the global samples."""

    def __init__(self, micro_batch_size: int, dp_rank: int, dp_size: int):
        self.micro, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size

    def __call__(self, dataset, start_sample: int, count: int) -> list[dict]:
        """This rank's ``count`` micro-batches of the global samples from ``start_sample``."""
        from megagpt.data import DistributedBatchSampler

        sampler = DistributedBatchSampler(
            total_samples=len(dataset),
            consumed_samples=start_sample,
            micro_batch_size=self.micro,
            data_parallel_rank=self.dp_rank,
            data_parallel_size=self.dp_size,
        )
        out = []
        for indices in sampler:
            tokens = torch.from_numpy(
                np.stack([dataset[i]["tokens"] for i in indices]).astype(np.int64)
            )
            out.append(
                {
                    "tokens": tokens[:, :-1].contiguous(),
                    "labels": tokens[:, 1:].contiguous(),
                    "loss_mask": torch.ones(tokens.shape[0], tokens.shape[1] - 1),
                }
            )
            if len(out) == count:
                break
        if len(out) < count:
            raise RuntimeError(
                f"the dataset ran out of samples at {start_sample} (holds {len(dataset)})"
            )
        return out


# -- the run --------------------------------------------------------------------------------
# (dataset, first global sample, micro-batches) -> this rank's micro-batches
BatchSource = Callable[[Any, int, int], list[dict]]


@dataclass
class RunParts:
    """Everything a training loop needs, built by ``build_run``."""

    cfg: Config
    ctx: ParallelContext
    stop: StopFlag
    tokenizer: Any
    engine: Engine
    checkpoints: TrainingCheckpoints
    state: TrainState
    train_ds: Any
    valid_ds: Any  # None: no validation
    metrics: MetricsWriter
    padded_vocab: int

    @property
    def run_dir(self) -> str:
        return self.cfg.run.dir


def start_process_groups(cfg: Config) -> ParallelContext:
    """Resolve the device, set the collective timeout (and NCCL's flight recorder), start the
    process groups; returns this rank's parallel context."""
    device = parallel.resolve_device(cfg.train.device)
    configure_matmul_precision(device, cfg.train.tf32)
    backend = parallel.resolve_backend(cfg.parallel.backend, device)
    timeout_s = watchdog.collective_timeout_s(cfg.parallel.timeout_s, backend)
    watchdog.set_timeout(timeout_s)
    if backend == "nccl":  # read when the NCCL process group starts
        watchdog.enable_flight_recorder(cfg.run.dir)
    watchdog.mark("rendezvous")
    ctx = parallel.initialize(cfg.parallel, device, timeout_minutes=timeout_s / 60)
    watchdog.mark("setup")
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restart:
        log0(
            f"torchrun restart {restart} of {os.environ.get('TORCHELASTIC_MAX_RESTARTS', '?')}"
            f": resuming from the run's latest checkpoint"
        )
    return ctx


def write_run_files(cfg: Config, ctx: ParallelContext) -> None:
    """Rank 0 creates ``<run.dir>/checkpoints`` and writes the resolved ``config.yaml``."""
    if ctx.rank == 0:
        Path(checkpoint_dir(cfg.run.dir)).mkdir(parents=True, exist_ok=True)
        (Path(cfg.run.dir) / "config.yaml").write_text(dump_yaml(cfg), encoding="utf-8")
    dist.barrier()


def build_engine(cfg: Config, ctx: ParallelContext) -> Engine:
    """The local model part, seeded (layout-free initialisation, per-stage dropout stream),
    wrapped in the engine."""
    from megagpt.engine import Engine, build_model
    from megagpt.model import initialize_weights, padded_vocab_size

    dims = ctx.dims
    module = build_model(cfg, dims, ctx.device)
    initialize_weights(module, cfg.model, cfg.train.seed, ctx.tp_rank, dims.tp)
    # The TP-region dropout stream (model/rng.py): one per TP rank, from the stage's seed.
    module.dropout_rng.seed(stage_seed(cfg.train.seed, ctx.pp_rank), ctx.tp_rank)
    engine = Engine(cfg, module, ctx)
    n_local = sum(p.numel() for p in module.parameters())
    log0(
        f"model {cfg.model.name or 'custom'}: {cfg.model.num_layers} layers, "
        f"h={cfg.model.hidden_size}, heads={cfg.model.num_heads}, vocab "
        f"{cfg.model.vocab_size} (padded {padded_vocab_size(cfg.model.vocab_size, dims.tp)}); "
        f"rank 0 holds {n_local / 1e6:.2f}M parameters; world {dims.world} = TP {dims.tp} x "
        f"PP {dims.pp} x DP {dims.dp}; ZeRO {cfg.parallel.zero_stage}; "
        f"{cfg.train.precision} on {ctx.device}"
    )
    log0(engine.describe_precision())
    return engine


def build_run(
    cfg: Config,
    stop: StopFlag,
    *,
    tokenizer: Any = None,
    datasets: tuple[Any, Any] | None = None,
    start: StartWeights | None = None,
) -> RunParts:
    """Set up a training run of ``cfg``, in order (see the module docstring); returns its parts.

    ``stop`` is created by the caller before anything else, so that a stop signal during setup
    is kept. Pretraining passes nothing more. Fine-tuning has resolved ``cfg`` and read its data
    already: it passes its ``tokenizer``, ``datasets`` = (train, eval or None) and its
    ``start`` weights (used when the run has no checkpoint of its own). ``cfg`` is completed
    here (``model.vocab_size`` from the tokenizer) and written to ``<run.dir>/config.yaml``.
    """
    from megagpt.model import padded_vocab_size

    indexed = datasets is None
    validate(cfg, parallel.world_size_from_env(), cuda=torch.cuda.is_available(), need_data=indexed)
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg)
    if indexed:
        check_data_paths(cfg)
    ctx = start_process_groups(cfg)
    log0(keep_freed_memory(ctx.device, cfg.train.keep_freed_memory))
    log0(cpu_matmul_note(cfg.train.cpu_matmul, ctx.device))
    write_run_files(cfg, ctx)
    seed_host_rngs(stage_seed(cfg.train.seed, ctx.pp_rank))
    engine = build_engine(cfg, ctx)
    checkpoints = TrainingCheckpoints(
        checkpoint_dir(cfg.run.dir), cfg.checkpoint, engine.checkpoint_state()
    )
    watchdog.mark("resume")
    state = resume(cfg, ctx, engine, checkpoints, start)
    if start is not None:
        start.tensors = {}  # loaded, or superseded by a checkpoint: free the host copy
    watchdog.mark("data", state.step)
    train_ds, valid_ds = build_indexed_data(cfg, ctx.dims.dp, cfg.run.dir) if indexed else datasets
    metrics = MetricsWriter(
        cfg.run.dir,
        enabled=ctx.rank == 0,
        wandb_mode=cfg.logging.wandb,
        project=cfg.logging.wandb_project,
        run_name=cfg.run.name,
        config=to_dict(cfg),
        tensorboard=cfg.logging.tensorboard,
    )
    return RunParts(
        cfg=cfg,
        ctx=ctx,
        stop=stop,
        tokenizer=tokenizer,
        engine=engine,
        checkpoints=checkpoints,
        state=state,
        train_ds=train_ds,
        valid_ds=valid_ds,
        metrics=metrics,
        padded_vocab=padded_vocab_size(cfg.model.vocab_size, ctx.dims.tp),
    )
