"""BLEU / ROUGE-L of the fine-tuning evaluation, on Chinese text."""

from __future__ import annotations

import pytest

from megagpt.training.text_metrics import bleu, char_tokens, rouge_l


def test_char_tokens_split_han_keep_latin_words():
    assert char_tokens("GPT-3 模型，好") == ["GPT-3", "模", "型", "，", "好"]


def test_bleu_and_rouge_l_on_chinese():
    refs = ["床前明月光", "疑是地上霜"]
    assert bleu(refs, refs) == pytest.approx(100.0)
    assert rouge_l(refs, refs) == pytest.approx(100.0)
    assert rouge_l(["床前月光", "地上霜"], refs) == pytest.approx(
        100 * (2 * 0.8 * 1.0 / 1.8 + 2 * 0.6 * 1.0 / 1.6) / 2
    )
    assert 0.0 < bleu(["床前明月光照地上", "疑是地上霜"], refs) < 100.0
    assert bleu([], []) == 0.0
