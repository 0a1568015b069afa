"""Config checks that run before any process group starts, and the layout arithmetic they check.

Every problem names the config keys involved; all problems are reported at once. The batch
arithmetic (global batch = micro x accumulation x DP) is ``accumulation_steps``; the checks here
and the DeepSpeed config (``engine/ds_config.py``) use it.
"""

from __future__ import annotations

from megagpt.config.loader import ConfigError
from megagpt.config.schema import Config, ParallelConfig, TrainConfig


def data_parallel_size(cfg: Config, world_size: int) -> int:
    """world = TP x PP x DP; returns DP (validate() has checked divisibility)."""
    return world_size // (cfg.parallel.tensor * cfg.parallel.pipeline)


def _splits(batch: int, micro_batch: int, dp: int) -> bool:
    """Whether ``batch`` sequences split into whole micro-batches on every data-parallel rank."""
    return batch > 0 and batch % (micro_batch * dp) == 0


def accumulation_steps(global_batch: int, micro_batch: int, dp: int) -> int:
    """Micro-batches each data-parallel rank runs per optimizer step.

    global batch = micro x accumulation x DP. Takes sequences per step, per micro-batch and the
    data-parallel size; for code that has these numbers without a Config (a batch ramp, a
    layout being planned). Raises ConfigError when the global batch is not a positive multiple
    of micro x DP, which a bare ``//`` would silently round down.
    """
    if micro_batch < 1 or dp < 1 or not _splits(global_batch, micro_batch, dp):
        raise ConfigError(
            f"a global batch of {global_batch} sequences does not split into "
            f"micro-batches of {micro_batch} on {dp} data-parallel ranks "
            "(it must be a positive multiple of micro x DP)"
        )
    return global_batch // (micro_batch * dp)


def grad_accumulation_steps(cfg: Config, world_size: int, global_batch: int | None = None) -> int:
    """``accumulation_steps`` for ``cfg`` on ``world_size`` ranks.

    ``global_batch`` defaults to ``train.global_batch_size`` (pass the ramp's current batch).
    """
    gb = global_batch if global_batch is not None else cfg.train.global_batch_size
    return accumulation_steps(gb, cfg.train.micro_batch_size, data_parallel_size(cfg, world_size))


def problems(
    cfg: Config, world_size: int, *, cuda: bool | None = None, need_data: bool = True
) -> list[str]:
    """All problems of ``cfg`` for ``world_size`` processes, each naming its keys."""
    m, p, t, o = cfg.model, cfg.parallel, cfg.train, cfg.optim
    out: list[str] = []
    for key in (
        "num_layers",
        "num_heads",
        "hidden_size",
        "vocab_size",
        "seq_length",
        "max_position_embeddings",
    ):
        if getattr(m, key) <= 0:
            out.append(f"model.{key} must be > 0 (set model.name to a registered size or give it)")
    if out:
        return out
    if m.hidden_size % m.num_heads:
        out.append(
            f"model.hidden_size ({m.hidden_size}) must be divisible by model.num_heads "
            f"({m.num_heads})"
        )
    if m.seq_length > m.max_position_embeddings:
        out.append(
            f"model.seq_length ({m.seq_length}) exceeds model.max_position_embeddings "
            f"({m.max_position_embeddings})"
        )
    for key in ("dropout", "attention_dropout"):
        if not 0.0 <= getattr(m, key) < 1.0:
            out.append(f"model.{key} must be in [0, 1)")
    if p.tensor < 1 or p.pipeline < 1:
        out.append("parallel.tensor and parallel.pipeline must be >= 1")
        return out
    if m.num_heads % p.tensor:
        out.append(
            f"model.num_heads ({m.num_heads}) must be divisible by parallel.tensor ({p.tensor})"
        )
    if m.ffn % p.tensor:
        out.append(
            f"model.ffn_hidden_size ({m.ffn}) must be divisible by parallel.tensor ({p.tensor})"
        )
    if m.num_layers < p.pipeline:
        out.append(
            f"model.num_layers ({m.num_layers}) must be >= parallel.pipeline "
            f"({p.pipeline}): every stage needs a layer"
        )
    elif p.pipeline_partition == "uniform" and m.num_layers % p.pipeline:
        out.append(
            f"model.num_layers ({m.num_layers}) must be divisible by parallel.pipeline "
            f"({p.pipeline}) with parallel.pipeline_partition=uniform"
        )
    if p.pipeline > 1 and p.zero_stage > 1:
        out.append(
            f"parallel.zero_stage={p.zero_stage} cannot be combined with parallel.pipeline="
            f"{p.pipeline}: DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 only"
        )
    if world_size % (p.tensor * p.pipeline):
        out.append(
            f"world size {world_size} is not divisible by parallel.tensor x "
            f"parallel.pipeline = {p.tensor} x {p.pipeline}"
        )
        return out
    dp = data_parallel_size(cfg, world_size)
    if p.sequence_parallel:
        if p.tensor == 1:
            out.append("parallel.sequence_parallel needs parallel.tensor > 1")
        if m.seq_length % p.tensor:
            out.append(
                f"model.seq_length ({m.seq_length}) must be divisible by parallel.tensor "
                "with sequence parallelism"
            )
    if t.micro_batch_size < 1:
        out.append("train.micro_batch_size must be >= 1")
    elif t.global_batch_size <= 0:
        out.append("train.global_batch_size must be > 0 (or set model.name to take the size's)")
    elif not _splits(t.global_batch_size, t.micro_batch_size, dp):
        out.append(
            f"train.global_batch_size ({t.global_batch_size}) must be divisible by "
            f"train.micro_batch_size ({t.micro_batch_size}) x data-parallel size ({dp}) "
            f"[world {world_size} = TP {p.tensor} x PP {p.pipeline} x DP {dp}]"
        )
    if t.rampup_batch_size:
        r = t.rampup_batch_size
        if len(r) != 3 or not all(isinstance(v, int) and v > 0 for v in r):
            out.append(
                "train.rampup_batch_size must be [start, increment, ramp_samples], "
                "positive integers"
            )
        elif t.micro_batch_size >= 1 and (  # micro < 1 is reported above
            not _splits(r[0], t.micro_batch_size, dp)
            or not _splits(r[1], t.micro_batch_size, dp)
            or (t.global_batch_size - r[0]) % r[1]
        ):
            out.append(
                "train.rampup_batch_size: start and increment must be multiples of "
                "micro x DP, and (global - start) a multiple of increment"
            )
    if t.steps < 0:
        out.append("train.steps must be >= 0")
    if t.log_interval < 1:
        out.append("train.log_interval must be >= 1")
    if t.device == "cuda" and cuda is False:
        out.append("train.device=cuda but CUDA is not available")
    on_cpu = t.device == "cpu" or (t.device == "auto" and cuda is False)
    if t.precision == "fp16" and on_cpu:
        out.append("train.precision=fp16 is not supported on CPU; use bf16 or fp32")
    if p.backend == "nccl" and cuda is False:
        out.append("parallel.backend=nccl needs CUDA")
    if p.timeout_s < 0:
        out.append(
            f"parallel.timeout_s must be >= 0 seconds (0 = the backend's default), got "
            f"{p.timeout_s}"
        )
    if o.lr <= 0 and o.schedule != "constant":
        out.append("optim.lr must be > 0")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        out.append("optim.min_lr_ratio must be in [0, 1]")
    if o.schedule in ("cosine", "linear") and o.decay_tokens <= o.warmup_tokens:
        out.append(
            f"optim.decay_tokens ({o.decay_tokens:g}) must exceed optim.warmup_tokens "
            f"({o.warmup_tokens:g})"
        )
    if need_data:
        if not cfg.data.paths:
            out.append(
                "data.paths is empty: give indexed dataset prefixes (made by `megagpt preprocess`)"
            )
        if cfg.data.weights and len(cfg.data.weights) != len(cfg.data.paths):
            out.append(
                f"data.weights has {len(cfg.data.weights)} entries for "
                f"{len(cfg.data.paths)} data.paths"
            )
        if cfg.data.weights_schedule:
            from megagpt.data.blending import parse_weights_schedule
            from megagpt.data.errors import DataError

            if cfg.data.weights:
                out.append("set data.weights or data.weights_schedule, not both")
            try:
                parse_weights_schedule(
                    cfg.data.weights_schedule, len(cfg.data.paths), cfg.model.seq_length
                )
            except DataError as e:
                out.append(str(e))
        if not cfg.data.tokenizer:
            out.append("data.tokenizer is empty")
    if cfg.checkpoint.keep_last < 1:
        out.append("checkpoint.keep_last must be >= 1")
    if t.compile == "always" and cuda is False:
        import os
        import shutil

        # On CPU, inductor compiles the decoder layer to C++: without a compiler the first
        # step would fail deep inside torch.compile.
        if not (os.environ.get("CXX") or any(shutil.which(c) for c in ("g++", "c++", "clang++"))):
            out.append(
                "train.compile=always on CPU needs a C++ compiler (torch.compile's "
                "inductor generates C++): install g++ or set CXX, or set "
                "train.compile=never"
            )
    if t.cpu_matmul == "onednn" and on_cpu:
        from megagpt.model.matmul import onednn_unavailable

        why = onednn_unavailable()
        if why is not None:
            out.append(f"train.cpu_matmul=onednn: {why}; set train.cpu_matmul=auto or blas")
    out += _eval_task_problems(t, p)
    return out


def _eval_task_problems(t: TrainConfig, p: ParallelConfig) -> list[str]:
    """train.eval_tasks: names, a pipeline size of 1, eval_interval > 0, lm-eval installed."""
    import importlib.util

    if not t.eval_tasks:
        return []
    out = []
    if not all(isinstance(n, str) and n.strip() for n in t.eval_tasks):
        out.append(f"train.eval_tasks must be a list of lm-eval task names, got {t.eval_tasks!r}")
    if t.eval_interval <= 0:
        out.append("train.eval_tasks needs train.eval_interval > 0 (tasks run at validation)")
    if t.eval_tasks_limit < 0:
        out.append("train.eval_tasks_limit must be >= 0 (0 = every document)")
    if p.pipeline > 1:
        out.append(
            f"train.eval_tasks cannot run with parallel.pipeline={p.pipeline}: task "
            "evaluation runs the whole model on each rank; evaluate the model directory "
            "afterwards with `megagpt eval --tasks` instead"
        )
    if p.sequence_parallel:
        out.append(
            "train.eval_tasks cannot run with parallel.sequence_parallel=true (scoring "
            "takes sequences of any length); evaluate the model directory afterwards "
            "with `megagpt eval --tasks` instead"
        )
    if importlib.util.find_spec("lm_eval") is None:
        out.append('train.eval_tasks needs lm-evaluation-harness: pip install -e ".[eval]"')
    return out


def validate(
    cfg: Config, world_size: int, *, cuda: bool | None = None, need_data: bool = True
) -> None:
    """Raise ConfigError listing every problem of ``cfg`` for ``world_size`` processes."""
    found = problems(cfg, world_size, cuda=cuda, need_data=need_data)
    if found:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(found))
