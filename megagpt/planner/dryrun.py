"""``megagpt train --dry-run``: everything a launch would decide, without starting anything.

Resolves and validates the config for a world size, builds the rank layout, the per-stage layer
split and each stage's parameters from the real model blocks on the meta device (no memory, no
process group), cross-checks them against the planner's analytic counts and prints the memory
estimate per stage. Seconds for 175B on any world size.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

from megagpt.config import Config, ConfigError, grad_accumulation_steps, parameter_count
from megagpt.config.validate import problems
from megagpt.parallel.dims import ParallelDims
from megagpt.planner.memory import (
    Layout,
    memory_per_stage,
    padded_vocab_size,
    stage_parameters,
)


@dataclass
class StageReport:
    stage: int
    layers: range
    params_meta: int  # per TP rank, counted on the real blocks (meta device)
    params_analytic: int  # per TP rank, the planner's formula
    embedding: bool
    head: bool


def _per_rank(module, tp: int) -> int:
    """Parameters of ``module`` (built with TP=1 shapes) that one of ``tp`` ranks holds: tensors
    megatron-core marks as partitioned are split, the rest replicated."""
    n = 0
    for p in module.parameters():
        n += p.numel() // tp if getattr(p, "tensor_model_parallel", False) else p.numel()
    return n


def meta_stage_params(cfg: Config, tp: int, pp: int) -> list[int]:
    """Per-stage parameters on one TP rank, counted on the real blocks built on the meta device
    with TP=1 shapes (megatron-core needs no process group for those) and the TP-padded vocab.
    """
    import torch

    from megagpt.config.schema import ParallelConfig
    from megagpt.model.layers import DecoderLayer, FinalNorm, PositionEmbedding, WordEmbedding
    from megagpt.model.mcore import megatron_config

    m = cfg.model
    mp = megatron_config(m, ParallelConfig())
    padded = padded_vocab_size(m.vocab_size, tp)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        word = _per_rank(WordEmbedding(m, mp, padded), tp)
        position = _per_rank(PositionEmbedding(m, mp), tp)
        layer = _per_rank(DecoderLayer(m, mp, 0, cfg.parallel.recompute), tp)
        final = _per_rank(FinalNorm(m, mp), tp)
    out = []
    for st in stage_parameters(m, tp, pp):
        n = len(st.layers) * layer
        if st.embedding:
            n += word + position
        if st.head:
            n += final + (word if not st.embedding else 0)
        out.append(n)
    return out


def dry_run(cfg: Config, world_size: int) -> tuple[list[StageReport], list[str], bool]:
    """Validate ``cfg`` for ``world_size`` ranks and compute the per-stage report.

    Returns the stage reports, the printable lines and whether the meta-device counts agree
    with the analytic model and ``parameter_count`` (False is a megagpt bug); raises
    ConfigError listing every config problem (data paths are not checked: a dry run needs no data).
    """
    if world_size < 1:
        raise ConfigError(f"--world-size must be >= 1, got {world_size}")
    found = problems(cfg, world_size, cuda=None, need_data=False)
    if found:
        raise ConfigError(
            f"invalid config for world size {world_size}:\n  - " + "\n  - ".join(found)
        )
    m, p, t = cfg.model, cfg.parallel, cfg.train
    dims = ParallelDims.from_world(p.tensor, p.pipeline, world_size)
    analytic = stage_parameters(m, dims.tp, dims.pp)
    meta = meta_stage_params(cfg, dims.tp, dims.pp)
    reports = [
        StageReport(a.stage, a.layers, n, a.params, a.embedding, a.head)
        for a, n in zip(analytic, meta)
    ]
    gas = grad_accumulation_steps(cfg, world_size)
    total = parameter_count(m)
    # Unique parameters: the same stages counted at TP=1, less the tied embedding's second copy
    # (last stage when PP > 1) and the vocabulary padding rows; must equal parameter_count.
    padded = padded_vocab_size(m.vocab_size, dims.tp)
    padded1 = padded_vocab_size(m.vocab_size, 1)
    unique = sum(meta_stage_params(cfg, 1, dims.pp))
    unique -= padded1 * m.hidden_size if dims.pp > 1 else 0
    unique -= (padded1 - m.vocab_size) * m.hidden_size
    layout = Layout.from_config(cfg, world_size)
    mem = memory_per_stage(
        m, layout, precision=t.precision, global_batch=t.global_batch_size, flash=True, cuda=False
    )
    lines = [
        (
            f"dry run: {m.name or 'custom model'} on {world_size} ranks = TP {dims.tp} x PP "
            f"{dims.pp} x DP {dims.dp} (rank = tp + TP*(dp + DP*pp))"
        ),
        (
            f"model: {m.num_layers} layers, h={m.hidden_size}, heads={m.num_heads}, ffn={m.ffn}, "
            f"vocab {m.vocab_size} (padded {padded}), seq {m.seq_length}; "
            f"{total:,} parameters ({total / 1e9:.3f}B)"
        ),
        (
            f"batch: global {t.global_batch_size} sequences = "
            f"{t.global_batch_size * m.seq_length:,} tokens = micro {t.micro_batch_size} "
            f"x accumulation {gas} x DP {dims.dp}; "
            f"{t.precision}; ZeRO {p.zero_stage}; recompute {p.recompute}; sequence parallel "
            f"{p.sequence_parallel}"
        ),
        (
            f"groups of rank 0: TP {_short(dims.tp_group(0))} DP {_short(dims.dp_group(0))} "
            f"PP {_short(dims.pp_group(0))}"
        ),
        (
            f"groups of rank {world_size - 1}: TP {_short(dims.tp_group(world_size - 1))} "
            f"DP {_short(dims.dp_group(world_size - 1))} PP {_short(dims.pp_group(world_size - 1))}"
        ),
        "",
        (
            f"{'stage':>5} {'layers':>11} {'params/GPU (meta)':>18} {'analytic':>14} "
            f"{'weights+grads+optim':>20} {'activations':>12} {'logits':>9} {'total':>9}"
        ),
    ]
    for r, b in zip(reports, mem):
        extra = ("+embedding" if r.embedding else "") + ("+head" if r.head else "")
        rng = f"{r.layers.start}-{r.layers.stop - 1}"
        g = b.as_gib()
        state = g["weights"] + g["grads"] + g["optimizer"] + g["flat"]
        lines.append(
            f"{r.stage:>5} {rng:>11} {r.params_meta:>18,} {r.params_analytic:>14,} "
            f"{state:>16.2f} GiB {g['activations']:>8.2f} "
            f"GiB {g['logits']:>5.2f} GiB {g['total']:>5.2f} GiB {extra}"
        )
    ok = all(r.params_meta == r.params_analytic for r in reports) and unique == total
    lines += [
        "",
        (
            f"check: per-stage counts on the meta device "
            f"{'match' if ok else 'DO NOT match'} the analytic model; unique parameters over all "
            f"shards {unique:,} vs parameter_count {total:,}"
        ),
        (
            "memory: planner estimate per GPU without the CUDA/NCCL reserve (see `megagpt plan` "
            "for the assumptions); activations assume flash attention"
        ),
    ]
    return reports, lines, ok


def _short(ranks: list[int]) -> str:
    if len(ranks) <= 6:
        return str(ranks)
    step = ranks[1] - ranks[0]
    return f"[{ranks[0]}, {ranks[1]}, ..., {ranks[-1]}] ({len(ranks)}, stride {step})"


def world_size_default(cfg: Config, given: int | None) -> int:
    """--world-size, else the launcher's WORLD_SIZE, else TP x PP (one data-parallel rank)."""
    if given is not None:
        return given
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return cfg.parallel.tensor * cfg.parallel.pipeline
