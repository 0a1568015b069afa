"""Which training steps count as bad (health.StepHealth): pure, no process group."""

from __future__ import annotations

from megagpt.training.health import StepHealth

NAN, INF = float("nan"), float("inf")


def _out(loss=2.0, norm=1.0, skipped=False, scale=1.0):
    return {"loss": loss, "grad_norm": norm, "skipped": skipped, "loss_scale": scale}


def _feed(h: StepHealth, out: dict) -> str:
    reason = h.check(out)
    h.count(bool(reason), out)
    return reason


def test_nonfinite_loss_or_norm_and_skips_are_bad_and_counted_in_a_row():
    h = StepHealth("fp32", 0.0)
    assert _feed(h, _out()) == "" and h.streak == 0
    assert _feed(h, _out(loss=NAN)).startswith("loss is nan") and h.streak == 1
    assert _feed(h, _out(norm=INF)) == "grad norm is inf" and h.streak == 2
    assert "skipped" in _feed(h, _out(skipped=True)) and h.streak == 3
    assert _feed(h, _out()) == "" and h.streak == 0


def test_fp16_overflow_skips_are_loss_scaling_until_the_minimum_scale():
    """fp16 skips overflowing steps while it lowers its loss scale: not bad, except at the
    minimum scale; a NaN loss is bad at any scale."""
    h = StepHealth("fp16", 0.0)
    assert _feed(h, _out(norm=INF, skipped=True, scale=65536.0)) == ""
    assert (
        _feed(h, _out(norm=INF, skipped=True, scale=1.0))
        == "fp16 overflow at the minimum loss scale"
    )
    assert _feed(h, _out(loss=NAN, skipped=True, scale=1024.0)).startswith("loss is nan")


def test_loss_spike_detector():
    """A loss above k x the mean of the good losses is bad once 10 good steps are known; the
    spike does not enter the mean."""
    h = StepHealth("bf16", 3.0)
    for _ in range(9):
        assert _feed(h, _out(loss=2.0)) == ""
    assert _feed(h, _out(loss=100.0)) == "", "no verdict before 10 good steps"
    h = StepHealth("bf16", 3.0)
    for _ in range(10):
        _feed(h, _out(loss=2.0))
    assert _feed(h, _out(loss=5.9)) == ""  # below 3 x 2.0; the mean is now 25.9 / 11
    reason = _feed(h, _out(loss=8.0))
    assert reason.startswith("loss spike: 8.0000 > 3 x the mean 2.3545") and h.streak == 1
    assert _feed(h, _out(loss=8.0)).startswith("loss spike"), "the spike stayed out of the mean"
    assert h.streak == 2
