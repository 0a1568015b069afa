"""tests/gpu's helpers, run on the CPU in one gloo rank, so that a GPU session does not find
a broken helper only once it has a GPU (docs/gpu.md)."""

from __future__ import annotations

from tests.distributed.launcher import run_distributed


def test_flash_check_helper_runs_on_cpu():
    """tests/gpu's attention helper, on the CPU: the profiler sees the SDPA kernel, and the
    flash-only restriction is applied without error (CPU SDPA has a flash kernel too)."""
    r = run_distributed("tests.gpu.workers:attention_kernels", 1, device="cpu", seq=64)[0]
    assert r["flash_only"] == "ok"
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in r["ops"]
