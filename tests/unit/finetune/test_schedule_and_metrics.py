"""The noam schedule at known steps; BLEU / ROUGE-L on Chinese text."""

from __future__ import annotations

import pytest

from megagpt.config import OptimConfig
from megagpt.training.schedules import learning_rate, noam_multiplier
from megagpt.training.text_metrics import bleu, char_tokens, rouge_l


@pytest.mark.parametrize("step,expected", [
    (0, 1e-3),        # s=1: 1 * 100^-1.5
    (49, 0.05),       # s=50: 50 / 1000
    (99, 0.1),        # s=100 = W: the peak, W^-0.5
    (399, 0.05),      # s=400: 400^-0.5
    (9999, 0.01),     # s=10000
])
def test_noam_multiplier_at_known_steps(step, expected):
    assert noam_multiplier(step, 100) == pytest.approx(expected)


def test_poetry_recipe_peaks_at_3e_5():
    o = OptimConfig(lr=3e-4, schedule="noam", warmup_steps=100)
    lrs = [learning_rate(o, tokens=0, step=s) for s in range(1000)]
    assert max(lrs) == pytest.approx(3e-5) and lrs.index(max(lrs)) == 99
    assert lrs[0] == pytest.approx(3e-7)


def test_char_tokens_split_han_keep_latin_words():
    assert char_tokens("GPT-3 模型，好") == ["GPT-3", "模", "型", "，", "好"]


def test_bleu_and_rouge_l_on_chinese():
    refs = ["床前明月光", "疑是地上霜"]
    assert bleu(refs, refs) == pytest.approx(100.0)
    assert rouge_l(refs, refs) == pytest.approx(100.0)
    assert rouge_l(["床前月光", "地上霜"], refs) == pytest.approx(
        100 * (2 * 0.8 * 1.0 / 1.8 + 2 * 0.6 * 1.0 / 1.6) / 2)
    assert 0.0 < bleu(["床前明月光照地上", "疑是地上霜"], refs) < 100.0
    assert bleu([], []) == 0.0
