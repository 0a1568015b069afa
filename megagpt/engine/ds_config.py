"""The DeepSpeed JSON for a megagpt config: generated, never hand-written, no deepspeed import.

Choices made here, each for a reason found in DeepSpeed 0.19's sources:

- bf16 accumulates and reduces gradients in fp32 (``data_types.grad_accum_dtype``,
  ``communication_data_type``), as Megatron does: the recipes sum 96-1,024 micro-batches per
  step, and bf16's 8-bit significand rounds most of those contributions away.
- DeepSpeed refuses bf16 with fp32 accumulation outside its ZeRO optimizers, so bf16 at
  ``parallel.zero_stage=0`` runs as DeepSpeed stage 1, which for bf16 is its ``BF16_Optimizer``
  (fp32 master weights, fp32 gradients and Adam moments, the fp32 copies sharded over data
  parallel). ``deepspeed_zero_stage`` says which stage DeepSpeed is given.
- At data-parallel size 1 ZeRO has nothing to partition, yet its flat buffers and per-step
  copies cost (measured: the default ZeRO 1 ran a DP=1 fp32 CPU run at ~55% of ZeRO 0's
  tokens/s). There fp32 runs DeepSpeed stage 0 (torch's AdamW on the parameters) and bf16 stage
  1 (the BF16_Optimizer, for the fp32 accumulation); fp16 keeps its stage, since DeepSpeed's
  stage-0 fp16 optimizer checks every parameter for overflow with a host sync.
- The pipeline engine's ``pipe_partitioned``/``grad_partitioned`` split the tensor passed between
  stages over the TP group and rebuild it with an all-gather, assuming every TP rank holds the
  same tensor. Under sequence parallelism each TP rank holds its own ``[s/tp, b, h]`` chunk, so
  they are off there (and pointless at TP=1).
- DeepSpeed's throughput timer synchronises the device twice per micro-batch: off (the trainer
  measures throughput itself). ZeRO-2 overlaps its per-micro-batch gradient reduction with the
  backward (``overlap_comm``), with buckets sized like Megatron's rather than DeepSpeed's 500M
  elements (two fp32 buckets of that size alone would be 4 GB).
"""

from __future__ import annotations

import math

from megagpt.config.schema import Config
from megagpt.config.validate import data_parallel_size, grad_accumulation_steps

# Elements per ZeRO reduce / all-gather bucket (DeepSpeed's default is 5e8).
BUCKET_ELEMENTS = 50_000_000


def deepspeed_zero_stage(cfg: Config, world_size: int) -> int:
    """The ZeRO stage DeepSpeed runs for ``cfg`` on ``world_size`` ranks: ``parallel.zero_stage``,
    except bf16 at 0 and everything at data-parallel size 1 (see above)."""
    return effective_zero_stage(
        cfg.train.precision, cfg.parallel.zero_stage, data_parallel_size(cfg, world_size)
    )


def effective_zero_stage(precision: str, zero_stage: int, dp: int) -> int:
    """The rule of ``deepspeed_zero_stage`` on plain values (the planner restates it)."""
    if dp == 1 and precision != "fp16":
        return 1 if precision == "bf16" else 0
    if precision == "bf16" and zero_stage == 0:
        return 1
    return zero_stage


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """The DeepSpeed config dict for ``cfg`` on ``world_size`` ranks."""
    t, p = cfg.train, cfg.parallel
    gas = grad_accumulation_steps(cfg, world_size)
    dp = data_parallel_size(cfg, world_size)
    stage = deepspeed_zero_stage(cfg, world_size)
    zero: dict = {"stage": stage}
    if stage in (1, 2):
        zero.update(reduce_bucket_size=BUCKET_ELEMENTS, allgather_bucket_size=BUCKET_ELEMENTS)
    if stage == 2:
        zero.update(overlap_comm=True, contiguous_gradients=True)
    ds: dict = {
        "train_batch_size": t.micro_batch_size * gas * dp,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": cfg.optim.clip_grad,
        "zero_optimization": zero,
        # Our optimizer is torch's AdamW (fused on CUDA); DeepSpeed must accept it under ZeRO.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
        "dump_state": False,
    }
    if t.precision == "bf16":
        # A NaN/Inf gradient norm skips the step (weights and moments untouched) under ZeRO 2
        # bf16 only with this flag; DeepSpeed 0.19.8 defaults it on, older releases off, so it is
        # set rather than inherited. BF16_Optimizer (stage 1) and ZeRO-3 always check.
        ds["bf16"] = {"enabled": True, "check_grad_overflow": True}
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
        ds["communication_data_type"] = "fp32"
    elif t.precision == "fp16":
        ds["fp16"] = {
            "enabled": True,
            "loss_scale": 0,
            "initial_scale_power": round(math.log2(t.initial_loss_scale)),
            "loss_scale_window": t.loss_scale_window,
            "hysteresis": 2,
            "min_loss_scale": 1,
        }
    if p.pipeline > 1:
        partitioned = p.tensor > 1 and not p.sequence_parallel
        ds["pipeline"] = {"pipe_partitioned": partitioned, "grad_partitioned": partitioned}
    return ds
