"""Config checks that run before any process group starts, and the layout arithmetic they check.

Every problem names the config keys involved; all problems are reported at once. The batch
arithmetic (global batch = micro x accumulation x DP) is ``accumulation_steps``; the checks here
and the DeepSpeed config (``engine/ds_config.py``) use it.
"""

from __future__ import annotations

import functools
import math

from megagpt.config.loader import ConfigError
from megagpt.config.schema import Config, DataConfig, ParallelConfig, TrainConfig


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


def _finite(value: float) -> bool:
    # An int is finite (math.isfinite would overflow on one past float's range).
    return isinstance(value, int) or math.isfinite(value)


def _at_least(key: str, value: float, low: float, *, strict: bool = False, when: str = "") -> list:
    """[] when ``value`` is finite and >= ``low`` (> with ``strict``), else the problem, naming
    ``key`` and the value; ``when`` names the setting that makes the bound apply."""
    if _finite(value) and (value > low if strict else value >= low):
        return []
    number = "a finite number " if isinstance(value, float) else ""
    return [f"{key} must be {number}{'>' if strict else '>='} {low:g}{when}, got {value!r}"]


def _within(key: str, value: float, low: float, high: float, *, closed: bool = False) -> list:
    """[] when ``low <= value < high`` (``<= high`` when ``closed``), else the problem."""
    if _finite(value) and low <= value and (value <= high if closed else value < high):
        return []
    return [f"{key} must be in [{low:g}, {high:g}{']' if closed else ')'}, got {value!r}"]


def _range_problems(cfg: Config) -> list[str]:
    """Numbers out of their documented range (schema.py), NaN and infinity included.

    Without these, torch's optimizer raises a bare ValueError after the process groups exist
    (a NaN LR, beta2 >= 1), or the run goes on with a meaningless value (a negative init std,
    a negative checkpoint interval saving every step).
    """
    m, o, t = cfg.model, cfg.optim, cfg.train
    out: list[str] = []
    out += _at_least("model.ffn_hidden_size", m.ffn_hidden_size, 0)  # 0 = 4 * hidden_size
    out += _at_least("model.layernorm_eps", m.layernorm_eps, 0, strict=True)
    for key in ("dropout", "attention_dropout"):
        out += _within(f"model.{key}", getattr(m, key), 0, 1)
    out += _at_least("model.init_std", m.init_std, 0, strict=True)
    if o.schedule == "constant":  # the LR never moves: 0 trains nothing, but is no error
        out += _at_least("optim.lr", o.lr, 0, when=" with optim.schedule=constant")
    else:
        out += _at_least("optim.lr", o.lr, 0, strict=True)
    out += _within("optim.min_lr_ratio", o.min_lr_ratio, 0, 1, closed=True)
    out += _at_least("optim.warmup_tokens", o.warmup_tokens, 0)  # 0 = no warmup
    out += _at_least("optim.decay_tokens", o.decay_tokens, 0, strict=True)
    if o.schedule == "noam":  # min(s^-0.5, s * W^-1.5): W = 0 divides by zero
        out += _at_least("optim.warmup_steps", o.warmup_steps, 1, when=" with optim.schedule=noam")
    else:
        out += _at_least("optim.warmup_steps", o.warmup_steps, 0)
    for key in ("beta1", "beta2"):
        out += _within(f"optim.{key}", getattr(o, key), 0, 1)
    out += _at_least("optim.eps", o.eps, 0, strict=True)
    out += _at_least("optim.weight_decay", o.weight_decay, 0)
    out += _at_least("optim.clip_grad", o.clip_grad, 0)  # 0 = no clipping
    out += _at_least("train.steps", t.steps, 0)
    out += _at_least("train.seed", t.seed, 0)  # NumPy's generators take no negative seed
    out += _at_least("train.log_interval", t.log_interval, 1)
    out += _at_least("train.eval_interval", t.eval_interval, 0)  # 0 = no validation
    out += _at_least("train.eval_iters", t.eval_iters, 0)
    out += _at_least("train.initial_loss_scale", t.initial_loss_scale, 0, strict=True)
    out += _at_least("train.loss_scale_window", t.loss_scale_window, 1)
    out += _at_least("train.max_bad_steps", t.max_bad_steps, 1)
    out += _at_least("train.rewind_on_bad_steps", t.rewind_on_bad_steps, 0)  # 0 = stop
    k = t.loss_spike_factor
    if not (_finite(k) and (k == 0 or k > 1)):
        # k <= 1 would call about every other ordinary step a spike.
        out.append(f"train.loss_spike_factor must be 0 (off) or > 1, got {k!r}")
    out += _at_least("checkpoint.interval", cfg.checkpoint.interval, 0)  # 0 = only at the end
    out += _at_least("checkpoint.keep_last", cfg.checkpoint.keep_last, 1)
    out += _at_least("logging.peak_tflops", cfg.logging.peak_tflops, 0)  # 0 = look it up
    return out


def _data_problems(d: DataConfig, t: TrainConfig, seq_length: int) -> list[str]:
    """data.paths, data.weights (or data.weights_schedule), data.split and the validation
    they feed, checked by the same rules as the data code (megagpt/data) applies later."""
    from megagpt.data.blending import normalize_weights, parse_weights_schedule
    from megagpt.data.errors import DataError
    from megagpt.data.gpt_dataset import parse_split

    out: list[str] = []
    if not d.paths:
        out.append(
            "data.paths is empty: give indexed dataset prefixes (made by `megagpt preprocess`)"
        )
    for i, prefix in enumerate(d.paths):
        if not isinstance(prefix, str) or not prefix:
            out.append(
                f"data.paths[{i}] must be a dataset prefix (PREFIX of PREFIX.bin/.idx), got "
                f"{prefix!r}"
                + (
                    "; Megatron-style [weight, prefix, ...] lists are not read here: put "
                    "the weights in data.weights"
                    if isinstance(prefix, (int, float))
                    else ""
                )
            )
    if d.weights:
        if len(d.weights) != len(d.paths):
            out.append(f"data.weights has {len(d.weights)} entries for {len(d.paths)} data.paths")
        not_numbers = False
        for i, w in enumerate(d.weights):
            if isinstance(w, bool) or not isinstance(w, (int, float)):
                not_numbers = True
                out.append(f"data.weights[{i}] must be a number, got {w!r}{_yaml_text_hint(w)}")
        if not not_numbers:
            try:  # the builder's own rule: finite, non-negative, a positive sum
                normalize_weights(list(d.weights), "data.weights")
            except DataError as e:
                out.append(str(e))
    if d.weights_schedule:
        if d.weights:
            out.append("set data.weights or data.weights_schedule, not both")
        try:
            parse_weights_schedule(d.weights_schedule, len(d.paths), seq_length)
        except DataError as e:
            out.append(str(e))
    try:
        split = parse_split(d.split)  # the parser build_gpt_datasets uses
    except DataError as e:
        out.append(f"data.split: {e}")
    else:
        if not all(math.isfinite(v) for v in split):  # "inf,1" parses, then divides inf/inf
            out.append(f"data.split {d.split!r}: every part must be a finite number")
        elif split[1] == 0 and t.eval_interval > 0 and t.eval_iters > 0:
            out.append(
                f"data.split {d.split!r} has no validation part (its second number is 0) but "
                f"train.eval_interval={t.eval_interval} asks for validation: give it one "
                "(e.g. '969,30,1') or set train.eval_interval=0"
            )
    if t.eval_interval > 0 and t.eval_iters == 0:
        out.append(
            f"train.eval_iters=0 with train.eval_interval={t.eval_interval}: validation would "
            "run no batches; set train.eval_iters >= 1, or train.eval_interval=0 for no "
            "validation"
        )
    if not d.tokenizer:
        out.append("data.tokenizer is empty")
    return out


def _yaml_text_hint(value: object) -> str:
    """For a number YAML read as text (``1e-1``: YAML 1.1 wants a dot), how to write it."""
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return ""
        return " (YAML reads a number without a dot such as 1e-1 as text: write 1.0e-1 or 0.1)"
    return ""


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
    out += _range_problems(cfg)
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
    if o.schedule in ("cosine", "linear") and o.decay_tokens <= o.warmup_tokens:
        out.append(
            f"optim.decay_tokens ({o.decay_tokens:g}) must exceed optim.warmup_tokens "
            f"({o.warmup_tokens:g})"
        )
    if need_data:
        out += _data_problems(cfg.data, t, m.seq_length)
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
    if t.cpu_kernels == "megagpt" and on_cpu:
        from megagpt.model import cpu_kernels

        if not cpu_kernels.available():
            out.append(
                f"train.cpu_kernels=megagpt: {cpu_kernels.unavailable_reason()}; set "
                "train.cpu_kernels=auto or torch"
            )
    out += _eval_task_problems(t, p)
    return out


def _eval_task_problems(t: TrainConfig, p: ParallelConfig) -> list[str]:
    """train.eval_tasks: names, a pipeline size of 1, eval_interval > 0, lm-eval installed."""
    import importlib.util

    if not t.eval_tasks:
        return []
    out = []
    names_ok = all(isinstance(n, str) and n.strip() for n in t.eval_tasks)
    if not names_ok:
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
    elif names_ok:
        unknown = list(_unknown_eval_tasks(tuple(t.eval_tasks)))
        if unknown:
            out.append(
                f"train.eval_tasks: unknown lm-eval task(s) {unknown}; list lm-eval's with "
                "`lm_eval ls tasks` (megagpt's own are in megagpt/evaluation/tasks)"
            )
    return out


@functools.lru_cache(maxsize=16)  # the planner calls problems() once per candidate layout
def _unknown_eval_tasks(names: tuple[str, ...]) -> tuple[str, ...]:
    """The ``names`` that training's evaluation would not find (``harness.find_tasks``, the
    lookup its ``task_manager`` raises from, worded there for ``megagpt eval``'s flags)."""
    from megagpt.evaluation.harness import find_tasks

    return tuple(find_tasks(list(names))[1])


def validate(
    cfg: Config, world_size: int, *, cuda: bool | None = None, need_data: bool = True
) -> None:
    """Raise ConfigError listing every problem of ``cfg`` for ``world_size`` processes."""
    found = problems(cfg, world_size, cuda=cuda, need_data=need_data)
    if found:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(found))
