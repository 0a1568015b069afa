"""LR schedules (GPT-3 warmup + cosine, linear, constant, noam) and the batch-size ramp, against
hand-computed values."""

from __future__ import annotations

import pytest

from megagpt.config import OptimConfig
from megagpt.training.schedules import batch_size_at, learning_rate, noam_multiplier


def test_gpt3_warmup_then_cosine_to_ten_percent():
    o = OptimConfig(lr=2e-4)
    assert learning_rate(o, tokens=0, step=0) == 0.0
    assert learning_rate(o, tokens=187.5e6, step=0) == pytest.approx(1e-4)
    assert learning_rate(o, tokens=375e6, step=0) == pytest.approx(2e-4)
    mid = (375e6 + 260e9) / 2
    assert learning_rate(o, tokens=mid, step=0) == pytest.approx(2e-5 + 0.5 * 1.8e-4)
    assert learning_rate(o, tokens=260e9, step=0) == pytest.approx(2e-5)
    assert learning_rate(o, tokens=400e9, step=0) == pytest.approx(2e-5)


def test_linear_and_constant():
    o = OptimConfig(lr=1.0, schedule="linear", warmup_tokens=0, decay_tokens=100)
    assert learning_rate(o, tokens=50, step=0) == pytest.approx(1.0 - 0.9 * 0.5)
    assert learning_rate(OptimConfig(lr=0.3, schedule="constant"), tokens=1e12, step=9) == 0.3


# ModelScope's lambda: min(s^-0.5, s * W^-1.5) with s = step + 1; W = 100 (the poetry recipe).
@pytest.mark.parametrize(
    "step,expected",
    [
        (0, 1e-3),  # s=1: 1 * 100^-1.5
        (49, 0.05),  # s=50: 50 / 1000
        (99, 0.1),  # s=100 = W: the peak, W^-0.5
        (399, 0.05),  # s=400: 400^-0.5
        (9999, 0.01),  # s=10000
    ],
)
def test_noam_multiplier_at_known_steps(step, expected):
    assert noam_multiplier(step, 100) == pytest.approx(expected)


def test_poetry_recipe_peaks_at_3e_5():
    o = OptimConfig(lr=3e-4, schedule="noam", warmup_steps=100)
    lrs = [learning_rate(o, tokens=0, step=s) for s in range(1000)]
    assert max(lrs) == pytest.approx(3e-5) and lrs.index(max(lrs)) == 99
    assert lrs[0] == pytest.approx(3e-7)


def test_batch_ramp():
    assert batch_size_at(0, 64, []) == 64
    ramp = [16, 16, 300]  # 16 -> 64 in 3 increments over 300 samples
    assert [batch_size_at(n, 64, ramp) for n in (0, 99, 100, 250, 300, 10_000)] == [
        16,
        16,
        32,
        48,
        64,
        64,
    ]
