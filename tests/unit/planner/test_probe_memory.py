"""tools/probe_memory.py's count of live bytes from the profiler's allocation records."""

from __future__ import annotations

from tools.probe_memory import ProbeLayout, live_curve


def test_live_bytes_follow_allocations_and_frees():
    events = [(1, 100, 0xA), (2, 50, 0xB), (3, -100, 0xA), (4, 30, 0xC)]
    assert live_curve(events) == [(1, 100), (2, 150), (3, 50), (4, 80)]


def test_frees_of_blocks_from_before_the_window_are_ignored():
    # A previous layout's tensor collected during this window was never counted here.
    assert live_curve([(1, 64, 0xA), (2, -4096, 0xF), (3, -64, 0xA)]) == [(1, 64), (3, 0)]


def test_an_address_handed_out_again_was_freed_unseen():
    # The free of 0xA happened on a thread the profiler does not hear; when the allocator gives
    # 0xA out again, the old block is gone and must not stay counted.
    assert live_curve([(1, 100, 0xA), (2, 40, 0xA), (3, -40, 0xA)]) == [(1, 100), (2, 40), (3, 0)]


def test_probe_layout_config_keys():
    lay = ProbeLayout("gpt3-tiny", "bf16", tp=2, pp=1, dp=2, zero=3, micro=2, accum=3)
    keys = dict(kv.split("=", 1) for kv in lay.overrides())
    assert lay.world == 4
    assert keys["train.global_batch_size"] == "12"  # micro x accumulation x DP
    assert (keys["parallel.tensor"], keys["parallel.zero_stage"]) == ("2", "3")
    assert keys["model.dropout"] == keys["model.attention_dropout"] == "0"
