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

from megagpt.config import accumulation_steps
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
# Elements of fp32 work per chunk of megagpt.model.fused's vocab cross entropy, restated (the
# model package imports torch and megatron-core; tests/unit/planner checks the two agree).
LOSS_CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 25}

ASSUMPTIONS = [
    (
        "model state per DeepSpeed 0.19 optimizer wrapper (the one the engine runs: bf16 at ZeRO 0 "
        "and any DP=1 run follow megagpt.engine.ds_config's rule), B per parameter n of a stage: "
        "plain fp32 (stage 0, torch AdamW) 4 weights + 4 grads + 8 Adam m, v (its all-reduce "
        "copies come after the backward's peak); BF16_Optimizer (bf16 at stage 1) 2 flat bf16 "
        "weights + 2 bf16 .grad + a full flat fp32 gradient accumulator (4) + fp32 master and "
        "m, v over DP (12/DP); ZeRO 1 (stage_1_and_2) weights + .grad in the accumulation dtype "
        "+ a fp32 averaged-gradient partition, master, m, v (16/DP); ZeRO 2 the same without "
        ".grad; ZeRO 3 weights, fp32 gradient partition, master, m, v all over DP."
    ),
    (
        "activations per layer and micro-batch (Korthikanti et al. 2022, arXiv 2205.05198 eq. 1-3, "
        "written for any activation width p bytes): s*b*h*[(4p + 2m)/(t if SP else 1) + "
        "(4p + 2p*ffn/h)/t] + a*s^2*b*(p + m_a*(1 + p))/t, with m = 1 B dropout masks (0 when "
        "dropout is 0) and m_a likewise for attention dropout; p=2, ffn=4h gives 34sbh + 5as^2b."
    ),
    (
        "flash attention (GPUs: PyTorch SDPA's flash/memory-efficient kernels) keeps no s^2 "
        "scores; the CPU math kernel materialises them (the a*s^2*b term counts)."
    ),
    (
        "recompute: selective drops the s^2 term; full keeps only each layer's input (p*s*b*h, /t "
        "with SP) plus one layer's full activations during its backward."
    ),
    (
        "pipeline: DeepSpeed's 1F1B schedule keeps min(PP - stage, micro-batches) micro-batches of "
        "activations in flight on each stage; without pipelining one micro-batch is live. The last "
        "stage also keeps the previous micro-batch's logits until the next step replaces them."
    ),
    (
        "output layer and loss (megagpt.model.fused): without a pipeline the fused "
        "linear_cross_entropy keeps no logits, only the gradients it made in the forward "
        "(s*b*h + V_padded/t*h, times p) and one fp32 chunk of rows (plus an fp32 V/t*h sum for "
        "16-bit weights in several chunks); a pipeline's last stage keeps s*b*V_padded/t * 2p "
        f"(saved logits + their gradient) + one fp32 chunk of {LOSS_CHUNK_ELEMENTS['cuda']:.0e} "
        "elements on a GPU (two for 16-bit logits: the upcast copy and the softmax)."
    ),
    (
        f"buffers: {CUDA_RESERVE_BYTES / GIB:.0f} GiB per GPU for CUDA context, NCCL and allocator "
        f"slack; DeepSpeed's reduce buckets, allocated whole whatever the model size (on CPU too): "
        f"ZeRO 1 one of {ZERO_BUCKET_ELEMENTS:.0e} elements in the accumulation dtype (two under "
        "the pipeline engine), ZeRO 2 two "
        "in the parameter dtype (overlap_comm), ZeRO 3 DeepSpeed's default "
        f"{ZERO3_BUCKET_ELEMENTS:.0e} in the accumulation dtype (megagpt.engine sets no stage-3 "
        "bucket size)."
    ),
    (
        "checked on CPU against torch's allocator peak (tools/probe_memory.py, "
        "bench/planner_memory.py: tiny and mini sizes, ZeRO 0-3, PP 1-2, TP 1-2, fp32 and bf16, "
        "BENCHMARKS-planner.md), on a GPU against torch.cuda.max_memory_allocated "
        "(bench/train_step.py)."
    ),
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
        return {
            "parallel.tensor": self.tp,
            "parallel.pipeline": self.pp,
            "parallel.zero_stage": self.zero_stage,
            "parallel.recompute": self.recompute,
            "parallel.sequence_parallel": self.sequence_parallel,
            "train.micro_batch_size": self.micro_batch,
        }

    def describe(self) -> str:
        sp = " SP" if self.sequence_parallel else ""
        return (
            f"TP{self.tp} PP{self.pp} DP{self.dp} micro {self.micro_batch} "
            f"ZeRO{self.zero_stage} recompute={self.recompute}{sp}"
        )

    @classmethod
    def from_config(cls, cfg, world: int) -> Layout:
        """The layout a Config describes on ``world`` ranks (DP derived)."""
        p = cfg.parallel
        return cls(
            tp=p.tensor,
            pp=p.pipeline,
            dp=world // (p.tensor * p.pipeline),
            micro_batch=cfg.train.micro_batch_size,
            zero_stage=p.zero_stage,
            recompute=p.recompute,
            sequence_parallel=p.sequence_parallel,
        )


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
    return (
        padded_vocab_size(m.vocab_size, tp) * m.hidden_size // tp
        + m.max_position_embeddings * m.hidden_size
    )


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


def activation_bytes_per_layer(
    m: ModelConfig,
    seq: int,
    micro: int,
    tp: int,
    *,
    sp: bool,
    recompute: str,
    act_bytes: int,
    flash: bool,
) -> float:
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


def full_layer_bytes(
    m: ModelConfig, seq: int, micro: int, tp: int, *, sp: bool, act_bytes: int, flash: bool
) -> float:
    """One layer's activations without recompute (the working set recompute rebuilds)."""
    return activation_bytes_per_layer(
        m, seq, micro, tp, sp=sp, recompute="none", act_bytes=act_bytes, flash=flash
    )


def in_flight(pp: int, stage: int, micro_batches: int) -> int:
    """Micro-batches whose activations stage ``stage`` holds at once under 1F1B."""
    if pp == 1:
        return 1
    return max(1, min(pp - stage, micro_batches))


# -- model state per DeepSpeed optimizer wrapper ---------------------------------------------


def optimizer_wrapper(precision: str, zero_stage: int, dp: int) -> str:
    """Which DeepSpeed optimizer path runs (``deepspeed_stage`` first): "plain" (stage 0: torch's
    AdamW stepped on the parameters), "fp16" (stage 0 fp16: DeepSpeed's FP16_Optimizer),
    "bf16" (stage 1 bf16: BF16_Optimizer, which DeepSpeed picks for fp32 accumulation),
    "zero12" (stage_1_and_2.py's DeepSpeedZeroOptimizer) or "zero3" (stage3.py)."""
    z = deepspeed_stage(precision, zero_stage, dp)
    if z == 0:
        return "fp16" if precision == "fp16" else "plain"
    if z == 1 and precision == "bf16":
        return "bf16"
    return "zero12" if z in (1, 2) else "zero3"


@dataclass(frozen=True)
class ModelState:
    """Bytes of one rank's model state under one optimizer wrapper (see ``model_state``)."""

    weights: float  # the parameters the forward reads (16-bit or fp32; ZeRO 3: a DP shard)
    grads: float  # gradients as the backward writes them (param.grad or DeepSpeed's partition)
    optimizer: float  # Adam's two fp32 moments
    flat: float  # DeepSpeed's own copies: fp32 master partition, flat fp32 gradient buffers
    buffers: float  # communication buckets (reduce / all-gather), allocated whole
    workspace: float  # transient at the step's peak: flattened all-reduce copies, gathers


def model_state(precision: str, zero_stage: int, n: int, dp: int, *, pipeline: bool) -> ModelState:
    """Model-state bytes of a rank holding ``n`` parameters, read from DeepSpeed 0.19's code
    (``ASSUMPTIONS``) and checked against allocator peaks (tools/probe_memory.py):

    - plain: weights and fp32 grads (4 B), Adam m, v (8 B); with DP > 1 DeepSpeed's
      flattened all-reduce copies (``buffered_allreduce_fallback``) come after the backward,
      when the activations are gone, so they do not raise the peak.
    - bf16 (BF16_Optimizer): the parameters become views of one flat bf16 buffer (2 B), the
      backward writes bf16 ``.grad`` (2 B) that it adds into a full flat fp32 accumulator
      (``fp32_groups_gradients_flat``, 4 B), the fp32 master is this rank's DP partition
      (4 B / DP), the moments likewise (8 B / DP).
    - zero12: flat 16-bit (or fp32) weights; ZeRO 1 keeps ``.grad`` (the accumulation dtype)
      and a fp32 partition of the averaged gradients (4 B / DP), ZeRO 2 only the partition;
      the fp32 master partition (4 B / DP, a copy even in fp32), moments 8 B / DP; buckets of
      ``ZERO_BUCKET_ELEMENTS``: ZeRO 1 one in the accumulation dtype (two under the pipeline
      engine), ZeRO 2 two (``overlap_comm``) in the parameter dtype.
    - zero3: weights, fp32 gradient partition (``grad_partitions_flat_buffer``), master and
      moments all / DP; DeepSpeed's default 5e8-element reduce bucket in the accumulation dtype
      (megagpt sets bucket sizes for stages 1 and 2 only).
    """
    d = dp
    p, g = BYTES[precision], GRAD_BYTES[precision]
    wrapper = optimizer_wrapper(precision, zero_stage, dp)
    if wrapper == "plain":
        return ModelState(p * n, g * n, 8 * n, 0.0, 0.0, 0.0)
    if wrapper == "fp16":  # FP16_Optimizer: fp32 master and fp32 gradients of every parameter
        return ModelState(p * n, p * n, 8 * n, 8 * n, 0.0, 0.0)
    if wrapper == "bf16":
        return ModelState(p * n, p * n, 8 * n / d, 4 * n / d + g * n, 0.0, 0.0)
    if wrapper == "zero12":
        z = deepspeed_stage(precision, zero_stage, dp)
        grads = (g * n + 4 * n / d) if z == 1 else 4 * n / d
        # ZeRO 1 under the pipeline engine: its reduce_gradients(pipeline_parallel=True) adds
        # a second bucket, since the backward runs outside the ZeRO optimizer's hooks.
        bucket = ZERO_BUCKET_ELEMENTS * (g * (2 if pipeline else 1) if z == 1 else 2 * p)
        return ModelState(p * n, grads, 8 * n / d, 4 * n / d, bucket, 0.0)
    return ModelState(p * n / d, g * n / d, 8 * n / d, 4 * n / d, ZERO3_BUCKET_ELEMENTS * g, 0.0)


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
    buffers: float  # communication buckets + the CUDA reserve
    flat: float = 0.0  # DeepSpeed's fp32 master partition and flat gradient buffers
    workspace: float = 0.0  # transients at the peak: all-reduce copies, kept pipeline outputs

    @property
    def total(self) -> float:
        return (
            self.weights
            + self.grads
            + self.optimizer
            + self.flat
            + self.activations
            + self.logits
            + self.buffers
            + self.workspace
        )

    def as_gib(self) -> dict[str, float]:
        out = {
            f.name: getattr(self, f.name) / GIB
            for f in fields(self)
            if f.name not in ("stage", "params")
        }
        out["total"] = self.total / GIB
        return out


# Fewest rows per chunk of the fused output layer + loss (megagpt.model.fused._MIN_FUSED_ROWS).
FUSED_MIN_ROWS = {4: 256, 2: 1024}


def logits_bytes(
    m: ModelConfig,
    seq: int,
    micro: int,
    tp: int,
    precision: str,
    *,
    cuda: bool = True,
    fused: bool = False,
) -> float:
    """Peak bytes of one micro-batch's output layer and loss on one TP rank.

    ``fused`` (pipeline size 1: ``megagpt.model.fused.linear_cross_entropy``): no logits are
    kept; the gradients made in the forward wait for the backward, the hidden state's
    [s*b, h] and the weight's [V_padded/t, h] in the training dtype, plus one chunk of rows of
    fp32 logits (and their 16-bit copy and gradient for 16-bit weights), plus an fp32 [V/t, h]
    sum of the chunks' weight gradients for 16-bit weights in more than one chunk.
    Otherwise (a pipeline's last stage: ``vocab_cross_entropy`` on the logits): the logits the
    loss saved and their gradient, s*b*V_padded/t elements each in the training dtype, plus one
    chunk of rows worked in fp32 (the upcast copy of 16-bit logits and the softmax)."""
    p = BYTES[precision]
    vocab = padded_vocab_size(m.vocab_size, tp) // tp
    rows = seq * micro
    per_chunk = LOSS_CHUNK_ELEMENTS["cuda" if cuda else "cpu"] // vocab
    if fused:
        chunk_rows = min(rows, max(FUSED_MIN_ROWS.get(p, 1024), per_chunk))
        chunk = chunk_rows * vocab * (4 if p == 4 else 4 + 2 * p)
        acc = vocab * m.hidden_size * 4 if p != 4 and chunk_rows < rows else 0
        return (rows + vocab) * m.hidden_size * p + chunk + acc
    chunk_rows = min(rows, max(1, per_chunk))
    chunk = chunk_rows * vocab * 4 * (1 if p == 4 else 2)
    return rows * vocab * 2 * p + chunk


def memory_per_stage(
    m: ModelConfig,
    layout: Layout,
    *,
    precision: str,
    global_batch: int,
    seq: int | None = None,
    flash: bool = True,
    cuda: bool = True,
) -> list[MemoryBreakdown]:
    """Bytes per GPU on each pipeline stage for ``layout`` training ``m``.

    ``global_batch`` is in sequences (it sets the micro-batches per step, hence the pipeline's
    in-flight count); ``flash`` says whether attention scores are never materialised; ``cuda``
    adds the per-GPU CUDA/NCCL reserve. Raises ConfigError when ``global_batch`` is not a
    multiple of the layout's micro-batch x DP.
    """
    if precision not in BYTES:
        raise ValueError(f"train.precision={precision!r}: expected one of {list(BYTES)}")
    seq = seq or m.seq_length
    t, d = layout.tp, layout.dp
    p = BYTES[precision]
    micro_batches = accumulation_steps(global_batch, layout.micro_batch, d)
    out = []
    for st in stage_parameters(m, t, layout.pp):
        n = st.params
        state = model_state(precision, layout.zero_stage, n, d, pipeline=layout.pp > 1)
        per_layer = activation_bytes_per_layer(
            m,
            seq,
            layout.micro_batch,
            t,
            sp=layout.sequence_parallel,
            recompute=layout.recompute,
            act_bytes=p,
            flash=flash,
        )
        live = in_flight(layout.pp, st.stage, micro_batches)
        acts = len(st.layers) * per_layer * live
        if layout.recompute == "full":
            acts += full_layer_bytes(
                m, seq, layout.micro_batch, t, sp=layout.sequence_parallel, act_bytes=p, flash=flash
            )
        if st.embedding:  # embedding output (+ its dropout mask), per in-flight micro-batch
            acts += (
                live
                * seq
                * layout.micro_batch
                * m.hidden_size
                * (p + (1 if m.dropout > 0 else 0))
                / (t if layout.sequence_parallel else 1)
            )
        logits = (
            logits_bytes(m, seq, layout.micro_batch, t, precision, cuda=cuda, fused=layout.pp == 1)
            if st.head
            else 0.0
        )
        workspace = state.workspace
        if st.head and layout.pp > 1:
            # DeepSpeed's pipeline engine keeps the last stage's last loss (``engine.loss``)
            # and with it the logits its graph saved, until the next step replaces it
            # (measured: one more set of logits live at the next step's peak, whatever the
            # micro-batch count).
            workspace += seq * layout.micro_batch * padded_vocab_size(m.vocab_size, t) / t * p
        buffers = (CUDA_RESERVE_BYTES if cuda else 0.0) + state.buffers
        out.append(
            MemoryBreakdown(
                st.stage,
                n,
                state.weights,
                state.grads,
                state.optimizer,
                acts,
                logits,
                buffers,
                state.flat,
                workspace,
            )
        )
    return out


def peak_stage(stages: list[MemoryBreakdown]) -> MemoryBreakdown:
    """The stage needing the most memory (the one that decides whether a layout fits)."""
    return max(stages, key=lambda b: b.total)
