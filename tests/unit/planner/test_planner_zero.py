"""ZeRO stages in the planner: ZeRO 2 reduce-scatters every micro-batch (its cost grows with
gradient accumulation), ZeRO 1 reduces once per step; the buckets and dtypes it assumes are
the ones megagpt.engine gives DeepSpeed."""

from __future__ import annotations

import pytest

from megagpt.config import load_config
from megagpt.planner import memory, timing
from megagpt.planner.hardware import ClusterShape, gpu_type
from megagpt.planner.memory import Layout
from megagpt.planner.search import candidate_layouts, evaluate, search
from megagpt.planner.write import ROOT

NVLINK = 300e9 * 0.8
N13 = 1_265_225_728  # gpt3-1.3b parameters on one GPU at TP1 PP1


def test_zero2_pays_per_micro_batch_zero1_once_per_step():
    def dp(zero, micro_batches):
        # 100 ms of compute per micro-batch: the reduce-scatter (~19 ms) fits in its backward.
        return timing.data_parallel_time("bf16", zero, N13, 8, NVLINK, micro_batches, 0.1)

    assert dp(1, 8) == dp(1, 128)  # accumulated gradients reduced once
    per_micro = dp(2, 2) - dp(2, 1)  # every micro-batch adds its reduce-scatter's cost
    assert per_micro > 0 and dp(2, 128) == pytest.approx(dp(2, 1) + 127 * per_micro)
    assert dp(2, 128) > 10 * dp(1, 128)
    # ZeRO 1 = fp32 reduce-scatter + bf16 all-gather; ZeRO 0 (fp32 run) = all-reduce.
    rs, ag = 7 / 8 * N13 * 4 / NVLINK, 7 / 8 * N13 * 2 / NVLINK
    assert dp(1, 64) == pytest.approx(rs + ag)
    assert timing.data_parallel_time("fp32", 0, N13, 8, NVLINK, 64, 0.1) == pytest.approx(2 * rs)


def test_zero2_reduction_that_outlasts_the_backward_is_exposed():
    # 10 ms of compute per micro-batch: the backward (6.7 ms) hides only part of a 19 ms RS.
    rs = 7 / 8 * N13 * 4 / NVLINK
    got = timing.data_parallel_time("bf16", 2, N13, 8, NVLINK, 10, 0.01)
    ag = rs / 2
    hidden = 0.01 * 2 / 3
    assert got == pytest.approx(10 * (rs - hidden + timing.OVERLAP_INTERFERENCE * hidden) + ag)


@pytest.fixture(scope="module")
def cfg13():
    return load_config(ROOT / "configs" / "pretrain" / "1.3b.yaml", ["model.name=gpt3-1.3b"])


def test_planner_prefers_zero1_for_1p3b_on_one_node(cfg13):
    shape = ClusterShape(1, 8, gpu_type("a100-80gb"))
    z1, z2 = (evaluate(cfg13, Layout(1, 1, 8, 1, zero_stage=z), shape) for z in (1, 2))
    assert z1.fits and z2.fits
    assert z1.time.step_s < z2.time.step_s
    assert z1.peak.total > z2.peak.total  # ZeRO 2 saves memory, at a cost in time
    plans, _ = search(cfg13, shape)
    assert plans[0].layout.zero_stage == 1


def test_bf16_zero0_is_not_a_separate_candidate(cfg13):
    # DeepSpeed runs bf16 at ZeRO 0 as stage 1: the search lists it once, as ZeRO 1.
    shape = ClusterShape(1, 8, gpu_type("a100-80gb"))
    assert {lay.zero_stage for lay in candidate_layouts(cfg13, shape)} == {1, 2, 3}
    cfg13.train.precision = "fp32"
    try:
        assert 0 in {lay.zero_stage for lay in candidate_layouts(cfg13, shape)}
    finally:
        cfg13.train.precision = "bf16"


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_planner_restates_the_engine_deepspeed_config(precision, zero):
    """The planner cannot import megagpt.engine (it imports DeepSpeed); its restated rules
    must match the DeepSpeed JSON the engine generates."""
    from megagpt.config import Config
    from megagpt.engine import ds_config

    cfg = Config()
    cfg.model.name = "gpt3-tiny"
    cfg.train.precision, cfg.parallel.zero_stage = precision, zero
    cfg.train.global_batch_size, cfg.train.micro_batch_size = 8, 1
    ds = ds_config.deepspeed_config(cfg, 8)
    z = ds["zero_optimization"]
    assert memory.deepspeed_stage(precision, zero, 8) == z["stage"]
    if z["stage"] in (1, 2):
        assert z["reduce_bucket_size"] == memory.ZERO_BUCKET_ELEMENTS
        # Two buckets at ZeRO 2 come from overlap_comm (off elsewhere: one bucket).
        assert z.get("overlap_comm", False) == (z["stage"] == 2)
    accum = ds.get("data_types", {}).get("grad_accum_dtype", precision)
    comm = ds.get("communication_data_type", precision)
    assert memory.GRAD_BYTES[precision] == memory.BYTES[accum] == memory.BYTES[comm]
