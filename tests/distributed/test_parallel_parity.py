"""Every parallel layout trains like the single process: same per-step loss and grad norm.

Tiny GPT, fp32, dropout off, the same synthetic global batches; 5 optimizer steps with
gradient accumulation where micro x DP < global.
"""

from __future__ import annotations

import pytest

from tests.distributed.launcher import run_distributed

STEPS = 5
BASE = ["train.global_batch_size=8", "train.micro_batch_size=2"]


@pytest.fixture(scope="module")
def reference():
    return run_distributed(
        "tests.distributed.workers:engine_losses",
        1,
        overrides=BASE + ["parallel.zero_stage=0"],
        steps=STEPS,
    )[0]


LAYOUTS = {
    "tp2": (2, ["parallel.tensor=2"]),
    "pp2": (2, ["parallel.pipeline=2"]),
    "dp2": (2, []),
    "tp2_pp2": (4, ["parallel.tensor=2", "parallel.pipeline=2"]),
    "tp2_dp2": (4, ["parallel.tensor=2"]),
    "pp2_dp2": (4, ["parallel.pipeline=2"]),
    "zero0_dp2": (2, ["parallel.zero_stage=0"]),
    "zero1_dp2": (2, ["parallel.zero_stage=1"]),
    "zero2_dp2": (2, ["parallel.zero_stage=2"]),
    "zero3_dp2": (2, ["parallel.zero_stage=3"]),
    "tp2_recompute_full": (2, ["parallel.tensor=2", "parallel.recompute=full"]),
    "selective_recompute": (1, ["parallel.recompute=selective"]),
    # sequence parallel on gloo (megagpt.parallel.regions), alone and across pipeline stages,
    # where DeepSpeed's pipe partitioning would splice the TP ranks' sequence chunks
    "tp2_sp": (2, ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    "tp2_pp2_sp": (
        4,
        ["parallel.tensor=2", "parallel.pipeline=2", "parallel.sequence_parallel=true"],
    ),
    "tp2_sp_recompute_full": (
        2,
        ["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.recompute=full"],
    ),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name, reference):
    world, overrides = LAYOUTS[name]
    results = run_distributed(
        "tests.distributed.workers:engine_losses", world, overrides=BASE + overrides, steps=STEPS
    )
    for rank, r in enumerate(results):
        for step, (got, want) in enumerate(zip(r["losses"], reference["losses"])):
            assert got == pytest.approx(want, rel=1e-4), (
                f"{name}: rank {rank} step {step + 1} loss {got} != single-process {want}"
            )
        for step, (got, want) in enumerate(zip(r["grad_norms"], reference["grad_norms"])):
            assert got == pytest.approx(want, rel=1e-3), (
                f"{name}: rank {rank} step {step + 1} grad norm {got} != {want}"
            )
    # No gradient all-reduce over a data-parallel group of one (pipelines included).
    tp = next((int(o.split("=")[1]) for o in overrides if o.startswith("parallel.tensor=")), 1)
    pp = next((int(o.split("=")[1]) for o in overrides if o.startswith("parallel.pipeline=")), 1)
    dp = world // (tp * pp)
    assert all(r["reduces_over_dp"] == (dp > 1) for r in results), (name, dp, results)
    # The run must actually train: a constant LR of 1e-3 on 8x32 tokens moves the loss.
    assert reference["losses"][0] != reference["losses"][-1]
