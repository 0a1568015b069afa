"""Step time of a training layout: compute (FLOPs over peak x efficiency), the 1F1B pipeline
schedule, and tensor-, pipeline- and data-parallel communication on stated link bandwidths.

Model FLOPs use ``megagpt.training.metrics.flops_per_token`` (the trainer's MFU numerator), so
the predicted MFU is comparable with what a run logs. Every simplification is in ``ASSUMPTIONS``.
"""

from __future__ import annotations

from dataclasses import dataclass

from megagpt.config.schema import ModelConfig
from megagpt.planner.hardware import LINK_EFFICIENCY, ClusterShape
from megagpt.planner.memory import (
    BYTES,
    GRAD_BYTES,
    ZERO3_BUCKET_ELEMENTS,
    ZERO_BUCKET_ELEMENTS,
    Layout,
    deepspeed_stage,
    padded_vocab_size,
    stage_parameters,
)
from megagpt.training.metrics import flops_per_token

DEFAULT_EFFICIENCY = 0.55
# Fraction of its own duration by which communication overlapped with compute still slows that
# compute: NCCL's channels run as thread blocks on the same SMs and share HBM bandwidth (an
# assumption of the order of the SM share NCCL takes on NVLink, not measured here).
OVERLAP_INTERFERENCE = 0.2

ASSUMPTIONS = [
    (
        "compute: hardware FLOPs (model FLOPs of megagpt.training.metrics.flops_per_token, plus "
        "the recomputed forward: full = the layers' forward again, selective = the attention "
        "scores' forward) at peak dense TFLOP/s x --efficiency (the matmul efficiency the kernels "
        "reach; 0.55 by default)."
    ),
    (
        "pipeline: 1F1B; a step takes (micro-batches + PP - 1) x the slowest stage's forward + "
        "backward of one micro-batch (the bubble is the PP - 1 extra slots)."
    ),
    (
        "tensor parallel: per layer and micro-batch 4 all-reduces of s*b*h activations (2 forward, "
        "2 backward; 6 with full recompute), ring cost 2(t-1)/t x bytes / link bandwidth, NOT "
        "overlapped with compute (megagpt has no TP communication overlap); sequence parallelism "
        "moves the same bytes (all-gather + reduce-scatter)."
    ),
    (
        "pipeline parallel: per micro-batch and stage boundary one activation send forward and one "
        "gradient send backward of s*b*h/t bytes (DeepSpeed partitions them over TP), not "
        "overlapped."
    ),
    (
        "data parallel (gradients reduced in fp32 for bf16, in the training dtype otherwise; "
        "ring costs (d-1)/d x bytes per reduce-scatter or all-gather, twice that per all-reduce): "
        "ZeRO 0 one all-reduce after the last micro-batch; ZeRO 1 one reduce-scatter after the "
        "last micro-batch plus one all-gather of the updated 16-bit weights, neither overlapped "
        "(DeepSpeed's pipeline engine reduces after the flush); ZeRO 2 a reduce-scatter after "
        "EVERY micro-batch (its gradients live only as DP shards) overlapped with that "
        "micro-batch's backward (2/3 of its compute; overlap_comm), of which at least the last "
        "bucket is exposed, plus the weight all-gather per step; ZeRO 3 also all-gathers the "
        "weights for the forward and the backward of every micro-batch, overlapped with its "
        f"whole compute. Overlapped communication still costs {OVERLAP_INTERFERENCE:g} x its "
        "duration (NCCL shares the SMs and memory bandwidth with the kernels it hides behind)."
    ),
    (
        f"links: a group inside one node uses NVLink, a group spanning nodes InfiniBand (one NIC "
        f"per GPU), each at {LINK_EFFICIENCY:.0%} of nominal; rank order is TP fastest, then DP, "
        "then PP (megagpt.parallel.dims)."
    ),
    (
        "not modelled: optimizer step, data loading, the tied-embedding all-reduce between first "
        "and last stage, kernel launch gaps, stragglers."
    ),
]


@dataclass
class StepTime:
    compute_s: float  # slowest stage's compute for the whole step, without bubble
    bubble_s: float
    tp_comm_s: float
    pp_comm_s: float
    dp_comm_s: float
    step_s: float
    tokens_per_s: float
    model_tflops_per_gpu: float
    mfu: float


def _ring(bytes_: float, n: int, bandwidth: float) -> float:
    """Seconds of a ring all-reduce of ``bytes_`` over ``n`` ranks."""
    if n <= 1:
        return 0.0
    return 2.0 * (n - 1) / n * bytes_ / bandwidth


def _half_ring(bytes_: float, n: int, bandwidth: float) -> float:
    """Seconds of a ring reduce-scatter (or all-gather) of ``bytes_`` over ``n`` ranks."""
    return _ring(bytes_, n, bandwidth) / 2.0


def _exposed(comm_s: float, window_s: float, tail_s: float) -> float:
    """Step time ``comm_s`` of communication adds when it overlaps ``window_s`` of compute:
    the excess, at least ``tail_s`` (the last bucket, ready only when the compute ends), plus
    ``OVERLAP_INTERFERENCE`` of the hidden part."""
    visible = max(comm_s - window_s, min(tail_s, comm_s))
    return visible + OVERLAP_INTERFERENCE * (comm_s - visible)


def data_parallel_time(
    precision: str,
    zero_stage: int,
    params: int,
    dp: int,
    bandwidth: float,
    micro_batches: int,
    micro_compute_s: float,
) -> float:
    """Seconds per step of data-parallel communication not hidden behind compute, for a
    stage of ``params`` parameters per GPU (see ``ASSUMPTIONS``; ``micro_compute_s`` is one
    micro-batch's forward + backward on that stage).

    What separates the stages: ZeRO 1 reduces the accumulated gradients once per step, ZeRO 2
    reduce-scatters every micro-batch's gradients, so its cost grows with the accumulation
    steps; overlap_comm hides it only while it fits in the backward.
    """
    if dp <= 1:
        return 0.0
    z = deepspeed_stage(precision, zero_stage, dp)
    grads = params * GRAD_BYTES[precision]
    weights = params * BYTES[precision]
    if z == 0:
        return _ring(grads, dp, bandwidth)
    gather = _half_ring(weights, dp, bandwidth)
    scatter = _half_ring(grads, dp, bandwidth)
    if z == 1:
        return scatter + gather
    if z == 2:
        tail = scatter * min(1.0, ZERO_BUCKET_ELEMENTS / params)
        per_micro = _exposed(scatter, micro_compute_s * 2.0 / 3.0, tail)
        return micro_batches * per_micro + gather
    comm = scatter + 2.0 * gather
    tail = comm * min(1.0, ZERO3_BUCKET_ELEMENTS / params)
    return micro_batches * _exposed(comm, micro_compute_s, tail)


def step_time(
    m: ModelConfig,
    layout: Layout,
    shape: ClusterShape,
    *,
    precision: str,
    global_batch: int,
    efficiency: float = DEFAULT_EFFICIENCY,
    seq: int | None = None,
    tf32: bool = True,
) -> StepTime:
    """Predicted seconds per optimizer step of ``layout`` on ``shape`` (global batch in
    sequences) and the resulting throughput, model TFLOP/s per GPU and MFU (``tf32``:
    train.tf32, which decides the fp32 peak)."""
    if not 0 < efficiency <= 1:
        raise ValueError(f"--efficiency must be in (0, 1], got {efficiency}")
    seq = seq or m.seq_length
    t, pp, d, b = layout.tp, layout.pp, layout.dp, layout.micro_batch
    p = BYTES[precision]
    peak = shape.gpu.peak_tflops(precision, tf32=tf32) * 1e12
    rate = peak * efficiency
    padded = padded_vocab_size(m.vocab_size, t)
    h, L = m.hidden_size, m.num_layers
    micro_batches = global_batch // (b * d)
    tokens_micro = seq * b

    # Per-token training FLOPs of one layer and of the output layer (model FLOPs), plus the
    # recomputed forward (hardware FLOPs).
    model_fpt = flops_per_token(m, padded, seq)
    head_fpt = 6.0 * h * padded
    layer_fpt = (model_fpt - head_fpt) / L
    if layout.recompute == "full":
        layer_hw = layer_fpt * 4.0 / 3.0
    elif layout.recompute == "selective":
        layer_hw = layer_fpt + 2.0 * seq * h  # forward of the attention scores again
    else:
        layer_hw = layer_fpt

    tp_bw = shape.group_bandwidth(t)
    act = tokens_micro * h * p  # one [s, b, h] activation
    n_ar = 6 if layout.recompute == "full" else 4
    stages = stage_parameters(m, t, pp)
    slowest, slowest_tp = 0.0, 0.0
    for st in stages:
        fl = len(st.layers) * layer_hw + (head_fpt if st.head else 0.0)
        compute = fl * tokens_micro / t / rate
        tp_comm = len(st.layers) * n_ar * _ring(act, t, tp_bw)
        if compute + tp_comm > slowest + slowest_tp:
            slowest, slowest_tp = compute, tp_comm
    pp_micro = 0.0
    if pp > 1:
        # Neighbouring stages are TP x DP ranks apart.
        pp_micro = 2.0 * (act / t) / shape.group_bandwidth(t * d + 1)
    slot = slowest + slowest_tp + pp_micro
    pipeline_s = (micro_batches + pp - 1) * slot
    dp_s = data_parallel_time(
        precision,
        layout.zero_stage,
        max(st.params for st in stages),
        d,
        shape.group_bandwidth(t * d),
        micro_batches,
        slowest,
    )
    step = pipeline_s + dp_s
    tokens = global_batch * seq
    tps = tokens / step
    tflops = model_fpt * tps / shape.world / 1e12
    return StepTime(
        compute_s=micro_batches * slowest,
        bubble_s=(pp - 1) * slot,
        tp_comm_s=micro_batches * slowest_tp,
        pp_comm_s=micro_batches * pp_micro,
        dp_comm_s=dp_s,
        step_s=step,
        tokens_per_s=tps,
        model_tflops_per_gpu=tflops,
        mfu=tflops * 1e12 / peak,
    )
