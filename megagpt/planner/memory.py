"""Memory per GPU of a training layout, analytically: parameters, gradients, optimizer states
(per ZeRO stage), activations (Korthikanti et al. 2022), pipeline in-flight micro-batches,
logits and buffers.

Everything is per pipeline stage and per tensor-parallel rank; ``memory_per_stage`` returns one
breakdown per stage and ``peak_stage`` the largest. Every constant below is an assumption the
planner prints (``ASSUMPTIONS``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from megagpt.config.schema import ModelConfig
from megagpt.engine.ds_config import effective_zero_stage
from megagpt.parallel.dims import split_layers

GIB = 2**30
# CUDA context, NCCL channels and caching-allocator slack per GPU (0 on CPU).
CUDA_RESERVE_BYTES = 2 * GIB
# Elements of one ZeRO 1/2 gradient bucket: megagpt.engine.ds_config.BUCKET_ELEMENTS, restated
# (the engine package imports DeepSpeed; tests/unit/planner checks the two agree).
ZERO_BUCKET_ELEMENTS = 50_000_000
# DeepSpeed's own default, which ZeRO 3 keeps (megagpt sets buckets for stages 1 and 2 only).
ZERO3_BUCKET_ELEMENTS = 500_000_000

ASSUMPTIONS = [
    ("params/grads/optimizer: mixed precision keeps 16-bit weights (2 B) and 12 B of fp32 master "
    "weights + Adam m, v per parameter; fp32 training keeps 4 B weights and 12 B of optimizer "
    "state (Adam m, v + the fp32 partition DeepSpeed's ZeRO optimizer copies; 8 B at ZeRO 0). "
    "Gradients are accumulated over micro-batches in fp32 for bf16 (4 B; megagpt.engine), in "
    "the training dtype otherwise. ZeRO 1 divides optimizer state by DP, ZeRO 2 also the "
    "gradient accumulator, ZeRO 3 also weights; bf16 at ZeRO 0 runs as DeepSpeed stage 1."),
    ("activations per layer and micro-batch (Korthikanti et al. 2022, arXiv 2205.05198 eq. 1-3, "
    "written for any activation width p bytes): s*b*h*[(4p + 2m)/(t if SP else 1) + "
    "(4p + 2p*ffn/h)/t] + a*s^2*b*(p + m_a*(1 + p))/t, with m = 1 B dropout masks (0 when "
    "dropout is 0) and m_a likewise for attention dropout; p=2, ffn=4h gives 34sbh + 5as^2b."),
    ("flash attention (GPUs: PyTorch SDPA's flash/memory-efficient kernels) keeps no s^2 scores; "
    "the CPU math kernel materialises them (the a*s^2*b term counts)."),
    ("recompute: selective drops the s^2 term; full keeps only each layer's input (p*s*b*h, /t "
    "with SP) plus one layer's full activations during its backward."),
    ("pipeline: DeepSpeed's 1F1B schedule keeps min(PP - stage, micro-batches) micro-batches of "
    "activations in flight on each stage; without pipelining one micro-batch is live."),
    "logits on the last stage: s*b*V_padded/t * (p + 4 fp32 softmax + 4 fp32 upcast if p < 4).",
    (f"buffers: {CUDA_RESERVE_BYTES / GIB:.0f} GiB per GPU for CUDA context, NCCL and allocator "
    f"slack; DeepSpeed's contiguous gradient buckets of {ZERO_BUCKET_ELEMENTS:.0e} elements "
    "(allocated whole on a GPU): ZeRO 1 one in the accumulation dtype, ZeRO 2 two 16-bit ones "
    "(overlap_comm double-buffers) plus the fp32 copy of one that bf16 reduces; ZeRO 3 "
    f"min({ZERO3_BUCKET_ELEMENTS:.0e}, stage params)."),
]

BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# Bytes per gradient element as accumulated over micro-batches and reduced over data parallel
# (DeepSpeed's grad_accum_dtype / communication_data_type as megagpt.engine sets them).
GRAD_BYTES = {"bf16": 4, "fp16": 2, "fp32": 4}


def deepspeed_stage(precision: str, zero_stage: int, dp: int) -> int:
    """The ZeRO stage DeepSpeed runs for ``parallel.zero_stage`` at data-parallel size ``dp``
    (bf16 at 0 runs 1; DP=1 runs 0, or 1 for bf16): the engine's own rule, which imports
    neither DeepSpeed nor megatron-core."""
    return effective_zero_stage(precision, zero_stage, dp)


def zero_buffer_bytes(precision: str, zero_stage: int, params: int, *, cuda: bool,
                      dp: int) -> float:
    """DeepSpeed's gradient bucket bytes on a GPU holding ``params`` parameters.

    ZeRO 1/2 allocate ``ZERO_BUCKET_ELEMENTS`` per buffer whatever the model size (on a GPU
    the caching allocator holds all of it; on CPU only the touched ``params`` elements become
    resident). ZeRO 1 reduces once per step from one bucket in the accumulation dtype; ZeRO 2
    reduces every micro-batch from two 16-bit buckets (one filling while the other is reduced,
    ``overlap_comm``) and, for bf16, casts the bucket in flight to fp32 for the reduction.
    """
    z = deepspeed_stage(precision, zero_stage, dp)
    if z == 0:
        return 0.0
    if z == 3:
        return min(ZERO3_BUCKET_ELEMENTS, params) * BYTES[precision]
    bucket = ZERO_BUCKET_ELEMENTS if cuda else min(ZERO_BUCKET_ELEMENTS, params)
    if z == 1:
        return bucket * GRAD_BYTES[precision]
    out = 2 * bucket * BYTES[precision]
    if GRAD_BYTES[precision] != BYTES[precision]:
        out += bucket * GRAD_BYTES[precision]
    return out


def padded_vocab_size(vocab: int, tp: int, multiple: int = 128) -> int:
    """The embedding's rows: the rule of ``megagpt.model.gpt.padded_vocab_size``, restated
    because that module imports megatron-core (seconds) and the planner must start instantly;
    tests/unit/planner checks that the two agree."""
    step = multiple * tp
    return ((vocab + step - 1) // step) * step


@dataclass(frozen=True)
class Layout:
    """One parallel layout of a training run (what configs/cluster files set)."""

    tp: int
    pp: int
    dp: int
    micro_batch: int
    zero_stage: int = 1
    recompute: str = "none"
    sequence_parallel: bool = False

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    def overrides(self) -> dict[str, Any]:
        """The dotted config keys that select this layout."""
        return {"parallel.tensor": self.tp, "parallel.pipeline": self.pp,
                "parallel.zero_stage": self.zero_stage, "parallel.recompute": self.recompute,
                "parallel.sequence_parallel": self.sequence_parallel,
                "train.micro_batch_size": self.micro_batch}

    def describe(self) -> str:
        sp = " SP" if self.sequence_parallel else ""
        return (f"TP{self.tp} PP{self.pp} DP{self.dp} micro {self.micro_batch} "
                f"ZeRO{self.zero_stage} recompute={self.recompute}{sp}")

    @classmethod
    def from_config(cls, cfg, world: int) -> Layout:
        """The layout a Config describes on ``world`` ranks (DP derived)."""
        p = cfg.parallel
        return cls(tp=p.tensor, pp=p.pipeline, dp=world // (p.tensor * p.pipeline),
                   micro_batch=cfg.train.micro_batch_size, zero_stage=p.zero_stage,
                   recompute=p.recompute, sequence_parallel=p.sequence_parallel)


# -- parameters -------------------------------------------------------------------------------

def layer_params_per_rank(m: ModelConfig, tp: int) -> int:
    """Parameters of one decoder layer on one TP rank (column-parallel weights and biases and
    row-parallel weights split; LayerNorms and row-parallel biases replicated)."""
    h, f = m.hidden_size, m.ffn
    split = 3 * h * h + 3 * h + h * h + h * f + f + f * h
    replicated = 2 * 2 * h + h + h
    return split // tp + replicated


def embedding_params_per_rank(m: ModelConfig, tp: int) -> int:
    """Word embedding (vocab-parallel, padded) + learned positions (replicated)."""
    return padded_vocab_size(m.vocab_size, tp) * m.hidden_size // tp + \
        m.max_position_embeddings * m.hidden_size


@dataclass(frozen=True)
class StageParams:
    stage: int
    layers: range
    params: int  # on one TP rank of this stage
    embedding: bool
    head: bool


def stage_parameters(m: ModelConfig, tp: int, pp: int) -> list[StageParams]:
    """Per-stage layers and parameters on one TP rank, as DeepSpeed's pipeline places them:
    embeddings on the first stage, final norm + the tied output embedding on the last (a second
    copy of the word embedding when PP > 1). Layers split as ``megagpt.parallel.split_layers``
    (parallel.pipeline_partition=uniform)."""
    out = []
    for s, layers in enumerate(split_layers(m.num_layers, pp)):
        n = len(layers) * layer_params_per_rank(m, tp)
        first, last = s == 0, s == pp - 1
        if first:
            n += embedding_params_per_rank(m, tp)
        if last:
            n += 2 * m.hidden_size
            if not first:
                n += padded_vocab_size(m.vocab_size, tp) * m.hidden_size // tp
        out.append(StageParams(s, layers, n, first, last))
    return out


# -- activations ------------------------------------------------------------------------------

def activation_bytes_per_layer(m: ModelConfig, seq: int, micro: int, tp: int, *, sp: bool,
                               recompute: str, act_bytes: int, flash: bool) -> float:
    """Bytes one decoder layer keeps for backward, for one micro-batch on one TP rank
    (stored, i.e. what stays live between its forward and its backward)."""
    s, b, h, a, p = seq, micro, m.hidden_size, m.num_heads, act_bytes
    sbh = s * b * h
    if recompute == "full":
        return p * sbh / (tp if sp else 1)
    mask = 1 if m.dropout > 0 else 0
    amask = 1 if m.attention_dropout > 0 else 0
    replicated = 4 * p + 2 * mask
    split = 4 * p + 2 * p * m.ffn / h
    total = sbh * (replicated / (tp if sp else 1) + split / tp)
    if recompute != "selective" and not flash:
        total += a * s * s * b * (p + amask * (1 + p)) / tp
    return total


def full_layer_bytes(m: ModelConfig, seq: int, micro: int, tp: int, *, sp: bool,
                     act_bytes: int, flash: bool) -> float:
    """One layer's activations without recompute (the working set recompute rebuilds)."""
    return activation_bytes_per_layer(m, seq, micro, tp, sp=sp, recompute="none",
                                      act_bytes=act_bytes, flash=flash)


def in_flight(pp: int, stage: int, micro_batches: int) -> int:
    """Micro-batches whose activations stage ``stage`` holds at once under 1F1B."""
    if pp == 1:
        return 1
    return max(1, min(pp - stage, micro_batches))


# -- the breakdown ----------------------------------------------------------------------------

@dataclass
class MemoryBreakdown:
    stage: int
    params: int  # parameters on this GPU (one TP rank of the stage, before ZeRO-3 sharding)
    weights: float
    grads: float
    optimizer: float
    activations: float
    logits: float
    buffers: float

    @property
    def total(self) -> float:
        return (self.weights + self.grads + self.optimizer + self.activations + self.logits
                + self.buffers)

    def as_gib(self) -> dict[str, float]:
        out = {f.name: getattr(self, f.name) / GIB for f in fields(self)
               if f.name not in ("stage", "params")}
        out["total"] = self.total / GIB
        return out


def memory_per_stage(m: ModelConfig, layout: Layout, *, precision: str, global_batch: int,
                     seq: int | None = None, flash: bool = True, cuda: bool = True
                     ) -> list[MemoryBreakdown]:
    """Bytes per GPU on each pipeline stage for ``layout`` training ``m``.

    ``global_batch`` is in sequences (it sets the micro-batches per step, hence the pipeline's
    in-flight count); ``flash`` says whether attention scores are never materialised; ``cuda``
    adds the per-GPU CUDA/NCCL reserve.
    """
    if precision not in BYTES:
        raise ValueError(f"train.precision={precision!r}: expected one of {list(BYTES)}")
    seq = seq or m.seq_length
    t, d = layout.tp, layout.dp
    p = BYTES[precision]
    z = deepspeed_stage(precision, layout.zero_stage, d)
    w_b, g_b = p, GRAD_BYTES[precision]
    o_b = 12 if (p < 4 or z >= 1) else 8
    micro_batches = global_batch // (layout.micro_batch * d)
    padded = padded_vocab_size(m.vocab_size, t)
    out = []
    for st in stage_parameters(m, t, layout.pp):
        n = st.params
        weights = n * w_b / (d if z >= 3 else 1)
        grads = n * g_b / (d if z >= 2 else 1)
        optimizer = n * o_b / (d if z >= 1 else 1)
        per_layer = activation_bytes_per_layer(
            m, seq, layout.micro_batch, t, sp=layout.sequence_parallel,
            recompute=layout.recompute, act_bytes=p, flash=flash)
        live = in_flight(layout.pp, st.stage, micro_batches)
        acts = len(st.layers) * per_layer * live
        if layout.recompute == "full":
            acts += full_layer_bytes(m, seq, layout.micro_batch, t,
                                     sp=layout.sequence_parallel, act_bytes=p, flash=flash)
        if st.embedding:  # embedding output (+ its dropout mask), per in-flight micro-batch
            acts += live * seq * layout.micro_batch * m.hidden_size * (
                p + (1 if m.dropout > 0 else 0)) / (t if layout.sequence_parallel else 1)
        logits = 0.0
        if st.head:
            logits = seq * layout.micro_batch * padded / t * (p + 4 + (4 if p < 4 else 0))
        buffers = (CUDA_RESERVE_BYTES if cuda else 0.0) + zero_buffer_bytes(
            precision, layout.zero_stage, n, cuda=cuda, dp=d)
        out.append(MemoryBreakdown(st.stage, n, weights, grads, optimizer, acts, logits,
                                   buffers))
    return out


def peak_stage(stages: list[MemoryBreakdown]) -> MemoryBreakdown:
    """The stage needing the most memory (the one that decides whether a layout fits)."""
    return max(stages, key=lambda b: b.total)
