"""GPU checks (marked `gpu`; skipped without CUDA): the same engine on CUDA/NCCL."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.launcher import run_distributed

pytestmark = pytest.mark.gpu
LOSSES = "tests.distributed.workers:engine_losses_on"
BASE = ["train.global_batch_size=8", "train.micro_batch_size=2"]


def _gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def test_cuda_bf16_matches_cpu_fp32_first_step():
    cpu = run_distributed(LOSSES, 1, overrides=BASE, steps=1, device="cpu")[0]
    gpu = run_distributed(LOSSES, 1, overrides=BASE + ["train.precision=bf16"], steps=3,
                          device="cuda")[0]
    assert gpu["losses"][0] == pytest.approx(cpu["losses"][0], rel=2e-2)


@pytest.mark.skipif(_gpus() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("extra", [["parallel.tensor=2"],
                                   ["parallel.tensor=2", "parallel.sequence_parallel=true"],
                                   ["parallel.pipeline=2"]])
def test_nccl_layouts_match_single_gpu(extra):
    one = run_distributed(LOSSES, 1, overrides=BASE, steps=3, device="cuda")[0]
    two = run_distributed(LOSSES, 2, overrides=BASE + extra, steps=3, device="cuda")[0]
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-3)
