"""A training run's setup in one straight line: ``build_run(cfg, stop) -> RunParts``.

Order, so that bad input fails before anything expensive or collective starts:

1. the config, validated once (before any process group), the tokenizer (it fixes
   ``model.vocab_size``), the indexed data paths (made with that tokenizer's size) and where the
   weights will come from (the run's own checkpoint or ``checkpoint.load``: it must exist and
   have been trained as this model, ``resolve_load_source``);
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
from megagpt.checkpoint.canonical import CheckpointError, model_differences
from megagpt.checkpoint.manager import first_resume_tag, is_training_path
from megagpt.checkpoint.training import TrainingCheckpoints, saved_model
from megagpt.config import Config, ConfigError, dump_yaml, validate
from megagpt.config.schema import ModelConfig, to_dict
from megagpt.model.cpu_training import cpu_kernels_note
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


def check_data_paths(cfg: Config, tokenizer: Any) -> None:
    """Every data.paths entry must be an existing PREFIX.bin / PREFIX.idx pair made with
    ``tokenizer`` (data.tokenizer, loaded): of its size, with its fingerprint where the dataset
    records one, and with token ids that fit it; ConfigError / DataError name the entry
    otherwise."""
    for i, prefix in enumerate(cfg.data.paths):
        for ext in (".bin", ".idx"):
            if not os.path.isfile(prefix + ext):
                raise ConfigError(
                    f"data.paths[{i}]: {prefix + ext} does not exist (give the "
                    "prefix written by `megagpt preprocess --output-prefix`)"
                )
    # The data must be data.tokenizer's ids: a dataset recorded with another tokenizer (another
    # size, or another fingerprint at the same size) means other tokens by the same ids, and an
    # id past the vocabulary raises a bare IndexError at TP=1 and silently reads another rank's
    # rows at TP>1. (The tokenizer's size, not the model's padded vocabulary, which is larger
    # by design.)
    from megagpt.data.indexed import TokenizerRecord, check_vocab

    record = TokenizerRecord.of(tokenizer)
    name = f"data.tokenizer={cfg.data.tokenizer}"
    for i, prefix in enumerate(cfg.data.paths):
        check_vocab(prefix, tokenizer.vocab_size, f"data.paths[{i}]", record, name)


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


def check_start_weights(cfg: ModelConfig, start: StartWeights) -> None:
    """ConfigError listing every model key (``canonical.WEIGHT_KEYS``) on which the weights
    ``start`` do not fit the model ``cfg``; no process group needed."""
    diff = [
        f"model.{k}: {here!r} here, {there!r} there"
        for k, here, there in model_differences(cfg, start.model)
    ]
    if diff:
        raise ConfigError(
            f"{start.key}={start.path!r} does not fit the model: "
            + "; ".join(diff)
            + " (set those model keys)"
        )


def load_start_weights(engine: Engine, cfg: ModelConfig, start: StartWeights) -> None:
    """Load ``start`` into the engine (any layout; collective) after checking that it fits the
    model ``cfg``; ConfigError lists every model key that differs."""
    check_start_weights(cfg, start)
    engine.load_weights(start.tensors, source=start.path)
    log0(f"initialised weights from {start.kind} {start.path} (step 0, fresh optimizer)")


# A training checkpoint continues under another parallel layout (resharded), dropout or sequence
# length, never under another model: these say what to do instead.
_OWN_HINT = "set those model keys back, or give another run.dir to train a new model"
_LOAD_HINT = (
    "set those model keys to the checkpoint's (the parallel layout, dropout and seq_length "
    "may differ: the checkpoint is resharded on load)"
)


def check_checkpoint_model(
    cfg: Config, directory: str, tag: str, where: str, hint: str, *, unreadable_ok: bool = False
) -> None:
    """ConfigError when training checkpoint ``directory/tag`` was trained as another model than
    ``cfg.model``: ``where`` (e.g. ``checkpoint.load=runs/n (step_0000003)``), then every model
    key that differs, then ``hint``. Also refuses a checkpoint with nothing ``load`` could read,
    unless ``unreadable_ok`` (the run's own newest: ``resume_tag`` names the damage and falls
    back to an older one). Reads the record's meta.json only; no process group needed."""
    try:
        saved = saved_model(directory, tag, trust_pickle=cfg.checkpoint.trust_pickle)
    except CheckpointError as e:
        if unreadable_ok:
            return
        raise ConfigError(f"{where}: {e}") from None
    if saved is None:  # DeepSpeed's native files: no config to compare without unpickling
        return
    diff = model_differences(cfg.model, saved)
    if diff:
        tokenizer = " (the size of data.tokenizer)"
        raise ConfigError(
            f"{where}: "
            + "; ".join(
                f"model.{k}={here}{tokenizer if k == 'vocab_size' else ''} but the checkpoint "
                f"was trained with {there}"
                for k, here, there in diff
            )
            + f"; {hint}"
        )


@dataclass
class LoadSource:
    """``checkpoint.load`` resolved before any process group (``resolve_load_source``): a
    training checkpoint ``directory``/``tag`` the run continues with its optimizer and step, or
    the pretrained ``weights`` it starts from at step 0."""

    directory: str = ""
    tag: str = ""
    weights: StartWeights | None = None


def resolve_load_source(cfg: Config) -> LoadSource | None:
    """Check where the run's weights will come from, before any process group or file of the
    run; returns ``checkpoint.load`` resolved when the run will read it, else None.

    The run's own newest checkpoint comes first (``resume`` picks it; ``checkpoint.load`` is then
    not read, so a restart never depends on it): it must have been trained as ``cfg.model``.
    Otherwise ``checkpoint.load``, when set, must exist and be a training checkpoint (``latest``
    naming an existing step_* folder that ``load`` can read) of the same model, or a model,
    ModelScope or Hugging Face directory whose weights fit it. ConfigError names the key, the
    checkpoint and each model key that differs. Comparing configs needs the final
    ``model.vocab_size``: call after ``load_tokenizer``.
    """
    own_dir = checkpoint_dir(cfg.run.dir)
    own = first_resume_tag(own_dir)
    if own is not None:
        where = f"run.dir={cfg.run.dir} (checkpoints/{own})"
        check_checkpoint_model(cfg, own_dir, own, where, _OWN_HINT, unreadable_ok=True)
        return None
    path = cfg.checkpoint.load
    if not path:
        return None
    if not os.path.exists(path):
        raise ConfigError(f"checkpoint.load={path}: {path} does not exist")
    if not is_training_path(path):
        weights = read_start_weights(path, "checkpoint.load", training_as_weights=True)
        assert weights is not None  # training_as_weights: every kind gives weights
        check_start_weights(cfg.model, weights)
        return LoadSource(weights=weights)
    try:
        directory, tag = resolve_load(path)
    except CheckpointError as e:
        raise ConfigError(f"checkpoint.load={path}: {e}") from None
    check_checkpoint_model(cfg, directory, tag, f"checkpoint.load={path} ({tag})", _LOAD_HINT)
    return LoadSource(directory, tag)


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
    load: LoadSource | None = None,
) -> TrainState:
    """Where the weights come from, first match wins; returns the state to continue from.

    1. The run's own newest intact checkpoint (verified against its manifest; a damaged newest
       one is named and the one before resumed, or with ``checkpoint.require_latest`` refused).
    2. ``checkpoint.load``: a training checkpoint of any TP/PP/DP/ZeRO layout (verified, then
       resharded by the engine), or pretrained weights (model directory, ModelScope or Hugging
       Face dir) that start the run at step 0.
    3. ``start``: weights given by the caller (fine-tuning's ``finetune.init_from``), step 0.
    4. Nothing: the seeded initialisation the model was built with.
    ``load`` is ``checkpoint.load`` as ``resolve_load_source`` resolved it before the process
    groups (None: resolved here). A training checkpoint is checked against ``cfg.model`` again
    once chosen: a resume may fall back past the one checked then. Collective.
    """
    ck = cfg.checkpoint
    directory = checkpoints.directory
    tag = resume_tag(directory, require_latest=ck.require_latest, log=log0)
    where, hint = f"run.dir={cfg.run.dir} (checkpoints/{tag})", _OWN_HINT
    if tag is None and ck.load:
        if load is None:
            load = LoadSource()
            pretrained = read_start_weights(ck.load, "checkpoint.load", training_as_weights=False)
            if pretrained is not None:
                load.weights = pretrained
            else:
                load.directory, load.tag = resolve_load(ck.load)
        if load.weights is not None:
            load_start_weights(engine, cfg.model, load.weights)
            load.weights = None  # loaded: free the host copy
            return TrainState()
        directory, tag = load.directory, load.tag
        where, hint = f"checkpoint.load={ck.load} ({tag})", _LOAD_HINT
        verify_or_raise(directory, tag)
    if tag is None:
        if start is not None:
            load_start_weights(engine, cfg.model, start)
        return TrainState()
    check_checkpoint_model(cfg, directory, tag, where, hint)
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

    from megagpt.data.gpt_dataset import IndexMemoryError

    planned, n_valid = indexed_sample_counts(cfg, dp)
    cache = cfg.data.cache_dir or os.path.join(run_dir, "data_cache")
    try:
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
    except IndexMemoryError as e:
        hint = (
            "One pass over the dataset is what the index must cover: build it once on a "
            "machine with more memory into a data.cache_dir this one shares (it is then "
            "memory-mapped), or split the dataset"
            if e.whole_epoch
            else _planned_samples_hint(cfg)
        )
        raise IndexMemoryError(f"{e}. {hint}", e.whole_epoch) from None
    return train_ds, (valid_ds if n_valid else None)


def _planned_samples_hint(cfg: Config) -> str:
    """Where the training sample count comes from, for an index too large to build."""
    t, o, seq = cfg.train, cfg.optim, cfg.model.seq_length
    run = t.steps * t.global_batch_size
    if o.schedule not in ("cosine", "linear"):
        return (
            f"The training samples are train.steps x train.global_batch_size = {run:,}: lower them"
        )
    return (
        f"The training samples cover the LR schedule's horizon: the larger of "
        f"train.steps x train.global_batch_size = {run:,} and optim.decay_tokens / "
        f"model.seq_length = {o.decay_tokens:g} / {seq} = {math.ceil(o.decay_tokens / seq):,}; "
        f"set optim.decay_tokens to the tokens the run is planned for (this run's "
        f"{run * seq:,} tokens: optim.decay_tokens={run * seq}), or build the index once on a "
        "machine with more memory into a shared data.cache_dir"
    )


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
        check_data_paths(cfg, tokenizer)
    load = resolve_load_source(cfg)
    ctx = start_process_groups(cfg)
    log0(keep_freed_memory(ctx.device, cfg.train.keep_freed_memory))
    log0(cpu_matmul_note(cfg.train.cpu_matmul, ctx.device))
    log0(cpu_kernels_note(cfg.train.cpu_kernels, ctx.device))
    write_run_files(cfg, ctx)
    seed_host_rngs(stage_seed(cfg.train.seed, ctx.pp_rank))
    engine = build_engine(cfg, ctx)
    checkpoints = TrainingCheckpoints(
        checkpoint_dir(cfg.run.dir), cfg.checkpoint, engine.checkpoint_state()
    )
    watchdog.mark("resume")
    state = resume(cfg, ctx, engine, checkpoints, start, load)
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
