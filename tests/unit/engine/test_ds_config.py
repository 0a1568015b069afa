"""The generated DeepSpeed config: pure assertions, no process group, no deepspeed import."""

from __future__ import annotations

from pathlib import Path

import pytest

from megagpt.config import load_config, validate
from megagpt.engine import deepspeed_config, deepspeed_zero_stage

CLUSTER = Path(__file__).resolve().parents[3] / "configs" / "cluster"


def _cfg(*overrides: str):
    return load_config(
        None,
        [
            "model.name=gpt3-tiny",
            "train.global_batch_size=64",
            "train.micro_batch_size=1",
            *overrides,
        ],
    )


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bf16_accumulates_and_reduces_in_fp32(stage):
    ds = deepspeed_config(_cfg("train.precision=bf16", f"parallel.zero_stage={stage}"), 2)
    assert ds["bf16"] == {"enabled": True, "check_grad_overflow": True}
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"}
    assert ds["communication_data_type"] == "fp32"


def test_bf16_at_zero_0_runs_deepspeed_stage_1():
    """DeepSpeed refuses bf16 with fp32 accumulation outside ZeRO: stage 1 is its BF16_Optimizer."""
    cfg = _cfg("train.precision=bf16", "parallel.zero_stage=0")
    assert deepspeed_zero_stage(cfg, 2) == 1
    assert deepspeed_config(cfg, 2)["zero_optimization"]["stage"] == 1
    fp32 = _cfg("train.precision=fp32", "parallel.zero_stage=0")
    assert deepspeed_zero_stage(fp32, 2) == 0 and "data_types" not in deepspeed_config(fp32, 2)


@pytest.mark.parametrize("precision,expected", [("fp32", 0), ("bf16", 1), ("fp16", 2)])
def test_no_zero_partitioning_at_data_parallel_size_1(precision, expected):
    """DP=1: nothing to partition, so no ZeRO optimizer's flat copies (fp32: plain AdamW; bf16:
    the BF16_Optimizer for fp32 accumulation; fp16 keeps its stage). DP=2 keeps the config's."""
    for world, tp in ((1, 1), (2, 2)):  # DP = 1 both times
        cfg = _cfg(f"train.precision={precision}", "parallel.zero_stage=2", f"parallel.tensor={tp}")
        assert deepspeed_zero_stage(cfg, world) == expected
        assert deepspeed_config(cfg, world)["zero_optimization"]["stage"] == expected
    assert (
        deepspeed_zero_stage(_cfg(f"train.precision={precision}", "parallel.zero_stage=2"), 2) == 2
    )


def test_fp32_and_fp16_keep_deepspeed_defaults_for_accumulation():
    assert "data_types" not in deepspeed_config(_cfg("train.precision=fp32"), 1)
    fp16 = deepspeed_config(_cfg("train.precision=fp16"), 1)
    assert fp16["fp16"]["enabled"] and "data_types" not in fp16


@pytest.mark.parametrize("sp,tp,expected", [(True, 2, False), (False, 2, True), (False, 1, False)])
def test_pipeline_partitioning_off_under_sequence_parallel(sp, tp, expected):
    """pipe/grad_partitioned all-gather the stage-to-stage tensor over TP, assuming it is the same
    on every TP rank; under sequence parallelism each rank holds its own sequence chunk."""
    cfg = _cfg(
        "parallel.pipeline=2",
        f"parallel.tensor={tp}",
        f"parallel.sequence_parallel={'true' if sp else 'false'}",
    )
    pipe = deepspeed_config(cfg, 2 * tp)["pipeline"]
    assert pipe == {"pipe_partitioned": expected, "grad_partitioned": expected}


def test_shipped_sequence_parallel_pipeline_layouts_do_not_partition():
    """Every cluster layout with PP > 1 and sequence parallelism (13B, 30B, 175B)."""
    checked = 0
    for path in sorted(CLUSTER.glob("*.yaml")):
        cfg = load_config(str(path), [])
        if cfg.parallel.pipeline > 1 and cfg.parallel.sequence_parallel:
            world = cfg.parallel.tensor * cfg.parallel.pipeline * 2
            cfg.train.global_batch_size = cfg.train.micro_batch_size * 2 * 4
            pipe = deepspeed_config(cfg, world)["pipeline"]
            assert not pipe["pipe_partitioned"] and not pipe["grad_partitioned"], path.name
            checked += 1
    assert checked >= 3


def test_throughput_timer_off_and_zero2_overlaps_communication():
    ds = deepspeed_config(_cfg("parallel.zero_stage=2"), 2)
    assert ds["timers"]["throughput"]["enabled"] is False
    assert ds["wall_clock_breakdown"] is False
    zero = ds["zero_optimization"]
    assert zero["stage"] == 2 and zero["overlap_comm"] is True
    assert zero["contiguous_gradients"] is True
    # buckets sized like Megatron's, not DeepSpeed's 5e8 elements (4 GB of fp32 buckets)
    assert zero["reduce_bucket_size"] <= 5e7 and zero["allgather_bucket_size"] <= 5e7


def test_batch_arithmetic():
    cfg = _cfg("parallel.tensor=2", "train.micro_batch_size=2")
    validate(cfg, 8, cuda=False, need_data=False)
    ds = deepspeed_config(cfg, 8)  # DP = 4
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 8
    assert ds["train_batch_size"] == 64
