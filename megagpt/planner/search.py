"""Layout search: every valid (TP, PP, DP, micro-batch, ZeRO, recompute, SP) for a model on a
cluster shape, checked by megagpt's own config validation, sized by the memory model, ranked by
the step-time model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from megagpt.config.schema import Config
from megagpt.config.validate import problems
from megagpt.planner.hardware import GIB, ClusterShape
from megagpt.planner.memory import (
    Layout,
    MemoryBreakdown,
    deepspeed_stage,
    memory_per_stage,
    peak_stage,
)
from megagpt.planner.timing import DEFAULT_EFFICIENCY, StepTime, step_time

# Fraction of the GPU's memory a plan may fill: the rest absorbs allocator fragmentation and
# transient buffers the model does not itemise.
DEFAULT_MEMORY_FRACTION = 0.9
MICRO_BATCHES = (1, 2, 4, 8)
RECOMPUTE = ("none", "selective", "full")


@dataclass
class Plan:
    layout: Layout
    memory: list[MemoryBreakdown]
    time: StepTime
    fits: bool
    problems: list[str]

    @property
    def peak(self) -> MemoryBreakdown:
        return peak_stage(self.memory)


def with_layout(cfg: Config, layout: Layout) -> Config:
    """A copy of ``cfg`` with the layout's parallel and micro-batch keys set."""
    out = copy.deepcopy(cfg)
    p = out.parallel
    p.tensor, p.pipeline, p.zero_stage = layout.tp, layout.pp, layout.zero_stage
    p.recompute, p.sequence_parallel = layout.recompute, layout.sequence_parallel
    out.train.micro_batch_size = layout.micro_batch
    return out


def evaluate(
    cfg: Config,
    layout: Layout,
    shape: ClusterShape,
    *,
    efficiency: float = DEFAULT_EFFICIENCY,
    memory_fraction: float = DEFAULT_MEMORY_FRACTION,
) -> Plan:
    """Memory, step time and validity of ``layout`` for the model and batch of ``cfg``.

    ``problems`` lists why megagpt would reject it (config validation on the cluster's world
    size, with CUDA) or why it does not fit (memory above ``memory_fraction`` of the GPU).
    """
    if layout.world != shape.world:
        return Plan(
            layout,
            [],
            None,
            False,  # type: ignore[arg-type]
            [f"layout uses {layout.world} GPUs, the cluster has {shape.world}"],
        )
    found = problems(with_layout(cfg, layout), shape.world, cuda=True, need_data=False)
    if found:
        return Plan(layout, [], None, False, found)  # type: ignore[arg-type]
    m, t = cfg.model, cfg.train
    mem = memory_per_stage(
        m, layout, precision=t.precision, global_batch=t.global_batch_size, flash=True, cuda=True
    )
    tm = step_time(
        m,
        layout,
        shape,
        precision=t.precision,
        global_batch=t.global_batch_size,
        efficiency=efficiency,
        tf32=t.tf32,
    )
    budget = shape.gpu.memory_gib * GIB * memory_fraction
    peak = peak_stage(mem)
    issues = []
    if peak.total > budget:
        issues.append(
            f"needs {peak.total / GIB:.1f} GiB on stage {peak.stage}, above "
            f"{memory_fraction:.0%} of {shape.gpu.memory_gib:g} GiB"
        )
    return Plan(layout, mem, tm, not issues, issues)


def candidate_layouts(cfg: Config, shape: ClusterShape) -> list[Layout]:
    """Every layout of the search space on ``shape`` (not yet validated): TP within a node,
    PP dividing the layers, micro-batches 1-8, ZeRO 0-3, the three recompute modes, SP on or
    off. ZeRO 0 is left out where DeepSpeed would run it as stage 1 (bf16): it is the ZeRO 1
    layout under another name; so is every ZeRO stage but the one DeepSpeed runs at DP=1."""
    world, m = shape.world, cfg.model
    out = []
    for tp in range(1, shape.gpus_per_node + 1):
        if shape.gpus_per_node % tp or world % tp:
            continue
        for pp in range(1, m.num_layers + 1):
            if m.num_layers % pp or world % (tp * pp):
                continue
            dp = world // (tp * pp)
            zeros = [z for z in (0, 1, 2, 3) if deepspeed_stage(cfg.train.precision, z, dp) == z]
            for micro in MICRO_BATCHES:
                for zero in zeros:
                    for rc in RECOMPUTE:
                        for sp in (False, True) if tp > 1 else (False,):
                            out.append(Layout(tp, pp, dp, micro, zero, rc, sp))
    return out


def search(
    cfg: Config,
    shape: ClusterShape,
    *,
    efficiency: float = DEFAULT_EFFICIENCY,
    memory_fraction: float = DEFAULT_MEMORY_FRACTION,
) -> tuple[list[Plan], int]:
    """Valid layouts that fit, fastest first (ties: less memory); and how many were rejected.

    Raises ValueError naming the flags when nothing fits.
    """
    plans, rejected = [], 0
    for layout in candidate_layouts(cfg, shape):
        plan = evaluate(cfg, layout, shape, efficiency=efficiency, memory_fraction=memory_fraction)
        if plan.fits:
            plans.append(plan)
        else:
            rejected += 1
    if not plans:
        raise ValueError(
            f"no layout of {cfg.model.name or 'this model'} fits --nodes {shape.nodes} x "
            f"--gpus-per-node {shape.gpus_per_node} --gpu {shape.gpu.name} with global batch "
            f"{cfg.train.global_batch_size} (tried {rejected}); use more nodes or a GPU with "
            "more memory"
        )
    plans.sort(key=lambda p: (p.time.step_s, p.peak.total))
    return plans, rejected
