"""LR schedules, batch ramp and the FLOPs formula, against hand-computed values."""

from __future__ import annotations

import math

import pytest

from megagpt.config import OptimConfig, from_name
from megagpt.training.metrics import flops_per_token
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


def test_noam_matches_modelscope_lambda():
    # min(s^-0.5, s * W^-1.5), s = step + 1, W = 100 (the poetry recipe).
    assert noam_multiplier(0, 100) == pytest.approx(1 / 1000)
    assert noam_multiplier(99, 100) == pytest.approx(0.1)
    assert noam_multiplier(399, 100) == pytest.approx(0.05)
    o = OptimConfig(lr=3e-4, schedule="noam", warmup_steps=100)
    assert learning_rate(o, tokens=0, step=99) == pytest.approx(3e-5)


def test_batch_ramp():
    assert batch_size_at(0, 64, []) == 64
    ramp = [16, 16, 300]  # 16 -> 64 in 3 increments over 300 samples
    assert [batch_size_at(n, 64, ramp) for n in (0, 99, 100, 250, 300, 10_000)] == \
        [16, 16, 32, 48, 64, 64]


def test_flops_per_token_formula():
    m = from_name("gpt3-1.3b")
    h, L, s, V = 2048, 24, 2048, 25600
    want = 6 * 12 * L * h * h + 6 * L * s * h + 6 * h * V
    assert flops_per_token(m, V, s) == want
    # 6N is the familiar approximation: within 15% here (attention adds ~8%).
    assert math.isclose(flops_per_token(m, V, s), 6 * 1.265e9, rel_tol=0.15)
