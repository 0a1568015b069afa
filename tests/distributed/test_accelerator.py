"""DeepSpeed's accelerator follows the run's resolved device, end to end on one rank (the
accelerator choice alone, in fresh interpreters, is tests/unit/engine/test_accelerator.py)."""

from __future__ import annotations

from tests.distributed.launcher import run_distributed


def test_cpu_training_with_cuda_in_the_environment(monkeypatch):
    """End to end: an engine step on CPU while the environment asks DeepSpeed for CUDA."""
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    out = run_distributed(
        "tests.distributed.workers:engine_losses",
        1,
        overrides=["train.global_batch_size=2", "train.micro_batch_size=2"],
        steps=1,
        device="cpu",
    )[0]
    assert len(out["losses"]) == 1 and out["losses"][0] > 0
