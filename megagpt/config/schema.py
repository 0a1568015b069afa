"""The typed config tree: one dataclass per concern.

Every field carries a one-line description in its metadata (``doc``); the user-facing config
reference is generated from these: ``megagpt config-docs`` prints it as Markdown (``docs.py``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from megagpt.config.fields import doc
from megagpt.config.finetune import FinetuneConfig


@dataclass
class ModelConfig:
    name: str = doc("", "Registered size (`megagpt models`); its values fill every key left unset.")
    num_layers: int = doc(0, "Decoder layers.")
    num_heads: int = doc(0, "Attention heads.")
    hidden_size: int = doc(0, "Model width d_model.")
    ffn_hidden_size: int = doc(0, "MLP inner width; 0 means 4 * hidden_size.")
    max_position_embeddings: int = doc(2048, "Learned absolute positions.")
    seq_length: int = doc(2048, "Training sequence length (<= max_position_embeddings).")
    vocab_size: int = doc(25600, "True vocabulary size; the embedding is padded to 128 * TP.")
    activation: str = doc(
        "gelu_tanh",
        "MLP activation: tanh-approximate GELU (1.3B+) or exact erf GELU (base/large).",
        choices=("gelu_tanh", "gelu"),
    )
    layernorm_eps: float = doc(1e-5, "LayerNorm epsilon (ModelScope checkpoints use 1e-12).")
    dropout: float = doc(0.1, "Dropout after embeddings and on each residual branch.")
    attention_dropout: float = doc(0.1, "Dropout on attention probabilities.")
    init_std: float = doc(
        0.02, "Std of the normal init; output projections get std/sqrt(2*layers)."
    )

    @property
    def ffn(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class ParallelConfig:
    tensor: int = doc(1, "Tensor-parallel size (megatron-core parallel layers).")
    pipeline: int = doc(1, "Pipeline-parallel stages (DeepSpeed pipeline engine, 1F1B).")
    zero_stage: int = doc(
        1, "DeepSpeed ZeRO stage; only 0 or 1 when pipeline > 1.", choices=(0, 1, 2, 3)
    )
    sequence_parallel: bool = doc(
        False,
        "Megatron sequence parallelism: activations outside "
        "the TP region split along the sequence (needs TP > 1).",
    )
    recompute: str = doc(
        "none",
        "Activation recompute: none, full (whole layer) or selective (core attention only).",
        choices=("none", "full", "selective"),
    )
    pipeline_partition: str = doc(
        "uniform", "How layers are split across pipeline stages.", choices=("uniform", "parameters")
    )
    backend: str = doc(
        "auto",
        "Process-group backend; auto = nccl with CUDA, gloo without.",
        choices=("auto", "nccl", "gloo"),
    )
    timeout_s: int = doc(
        0,
        "Collective timeout in seconds: a rank waiting longer on its peers "
        "reports the phase and step and exits; 0 = 300 (gloo), 1200 (NCCL).",
    )


@dataclass
class OptimConfig:
    lr: float = doc(0.0, "Peak learning rate; 0 takes the size's LR from the registry.")
    min_lr_ratio: float = doc(0.1, "Floor of the decay as a fraction of the peak LR.")
    schedule: str = doc(
        "cosine", "LR schedule after warmup.", choices=("cosine", "linear", "constant", "noam")
    )
    warmup_tokens: float = doc(375e6, "Linear warmup length in tokens (GPT-3: 375M).")
    decay_tokens: float = doc(260e9, "Tokens at which the decay reaches the floor (GPT-3: 260B).")
    warmup_steps: int = doc(100, "Warmup steps W of the noam schedule (min(s^-0.5, s*W^-1.5)).")
    beta1: float = doc(0.9, "AdamW beta1.")
    beta2: float = doc(0.95, "AdamW beta2.")
    eps: float = doc(1e-8, "AdamW epsilon.")
    weight_decay: float = doc(0.1, "Decoupled weight decay; never applied to biases and norms.")
    clip_grad: float = doc(1.0, "Global gradient-norm clip; 0 disables.")


@dataclass
class DataConfig:
    paths: list = doc([], "Indexed dataset prefixes (PREFIX.bin/.idx) for training.")
    weights: list = doc([], "Blend weights, one per path; empty = proportional to size.")
    weights_schedule: list = doc(
        [],
        "Blend weights over training: [{tokens: N, weights: [one "
        "per path]}, ...], linear in consumed tokens between points "
        "(train split; valid/test use the last point). See docs/data.md.",
    )
    split: str = doc("969,30,1", "Train/valid/test split of documents, as weights.")
    tokenizer: str = doc("", "Tokenizer: tokenizer.json / its folder, vocab.txt or a .model file.")
    cache_dir: str = doc("", "Where sample-index caches go; empty = <run.dir>/data_cache.")


@dataclass
class TrainConfig:
    steps: int = doc(100, "Where this run stops (global step); the LR schedule ignores it.")
    micro_batch_size: int = doc(1, "Sequences per micro-batch per data-parallel rank.")
    global_batch_size: int = doc(
        0, "Sequences per optimizer step; 0 = batch tokens of the size / seq_length."
    )
    rampup_batch_size: list = doc([], "Optional [start, increment, ramp_samples] batch ramp.")
    seed: int = doc(1234, "Seed of initialisation, dropout and data order.")
    precision: str = doc("bf16", "Training precision.", choices=("fp32", "bf16", "fp16"))
    tf32: bool = doc(
        True,
        "fp32 matmuls on CUDA use TF32 tensor cores (MFU then divides by "
        "the TF32 peak); false = IEEE fp32 on CUDA cores.",
    )
    initial_loss_scale: float = doc(2.0**16, "fp16 only: initial dynamic loss scale.")
    loss_scale_window: int = doc(1000, "fp16 only: steps without overflow before scaling up.")
    max_bad_steps: int = doc(
        5,
        "Stop (exit 3, nothing saved or exported) after this many bad "
        "steps in a row: NaN/Inf loss or grad norm (the step is skipped, "
        "weights untouched) or a loss spike.",
    )
    loss_spike_factor: float = doc(
        0.0,
        "A loss above this many times the mean of the last 100 "
        "good steps counts as a bad step (already applied: pair it "
        "with rewind_on_bad_steps); 0 disables.",
    )
    rewind_on_bad_steps: int = doc(
        0,
        "At max_bad_steps, go back to the last checkpoint and skip "
        "the batches since it, up to this many times; 0 = stop.",
    )
    log_interval: int = doc(10, "Log metrics every N steps.")
    eval_interval: int = doc(1000, "Validation every M steps; 0 disables.")
    eval_iters: int = doc(10, "Validation micro-batches per data-parallel rank per evaluation.")
    eval_tasks: list = doc(
        [],
        "lm-eval task names run at every validation (e.g. "
        "[megagpt_zh_mc]), logged as eval/<task>/<metric>; needs the eval "
        "extra and parallel.pipeline=1.",
    )
    eval_tasks_limit: int = doc(0, "Documents per eval task at each validation; 0 = all.")
    device: str = doc(
        "auto", "auto = cuda when available, else cpu.", choices=("auto", "cpu", "cuda")
    )
    compile: str = doc(
        "auto",
        "torch.compile the decoder layers' training forward: always, "
        "never, or auto = on CUDA only (megagpt/model/compile.py).",
        choices=("auto", "always", "never"),
    )
    cpu_matmul: str = doc(
        "auto",
        "CPU device, fp32: the model's GEMMs (forward and input gradients) on oneDNN, or on "
        "torch's BLAS (blas); auto = oneDNN on an AMD x86-64 CPU where torch has it, "
        "the BLAS (MKL) elsewhere (megagpt/model/matmul.py).",
        choices=("auto", "onednn", "blas"),
    )
    cpu_kernels: str = doc(
        "auto",
        "CPU device, fp32: the decoder's causal self-attention (up to 512 tokens, no attention "
        "dropout) and the MLP's bias + GELU (TP = 1) on megagpt's own C kernels (megagpt), or "
        "torch's (torch); auto = ours on an Intel CPU where they build (a C compiler, AVX-512) "
        "(megagpt/model/cpu_training.py).",
        choices=("auto", "megagpt", "torch"),
    )
    keep_freed_memory: bool = doc(
        True,
        "CPU device, glibc: keep memory freed during a step in the process "
        "for the next (malloc thresholds raised) instead of page-faulting it back every step "
        "(megagpt/training/host_memory.py); false = the allocator's defaults.",
    )


@dataclass
class CheckpointConfig:
    interval: int = doc(1000, "Save every K steps (and always at the end); 0 = only at the end.")
    keep_last: int = doc(3, "Checkpoints kept in the run directory; older ones are removed.")
    load: str = doc("", "Start from this checkpoint directory when the run has none of its own.")
    native: bool = doc(
        False,
        "Also write DeepSpeed's native files (doubles the size); resume "
        "works from megagpt's layout-free record at any layout without them.",
    )
    trust_pickle: bool = doc(
        False,
        "Read DeepSpeed's native .pt files on resume. RISK: they are "
        "pickles, and loading one runs any code it holds; set only for "
        "checkpoints you wrote yourself. Off: only safetensors/JSON are read.",
    )
    require_latest: bool = doc(
        False,
        "Resume only from the newest checkpoint: fail when it is "
        "damaged instead of falling back to the newest intact one.",
    )


@dataclass
class LoggingConfig:
    wandb: str = doc("offline", "Weights & Biases mode.", choices=("offline", "online", "disabled"))
    wandb_project: str = doc("megagpt", "W&B project name.")
    peak_tflops: float = doc(0.0, "Peak TFLOP/s per device for MFU; 0 = look up the device type.")
    tensorboard: bool = doc(
        False,
        "Also write TensorBoard event files to <run.dir>/tensorboard "
        '(needs the tensorboard package: pip install -e ".[plot]").',
    )


@dataclass
class RunConfig:
    dir: str = doc("runs/default", "Run directory: resolved config, metrics.jsonl, checkpoints.")
    name: str = doc("", "Run name for loggers; empty = the run directory's name.")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config dataclass (for YAML dumps and checkpoints)."""
    return dataclasses.asdict(cfg)
