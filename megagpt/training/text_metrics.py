"""Generation metrics for src+tgt fine-tuning: corpus BLEU (sacrebleu) and ROUGE-L (rouge-score).

Both are scored on a 0-100 scale. Chinese has no word spaces, so BLEU uses sacrebleu's ``zh``
tokenizer (each Han character a token) and ROUGE-L the same character split; Latin words and
digits stay whole.
"""

from __future__ import annotations

import importlib.util
import re

# Han ideographs, CJK punctuation and full-width forms split to characters; other runs of
# non-space characters stay words.
_TOKEN = re.compile(
    r"[\u2e80-\u9fff\uf900-\ufaff\uff00-\uffef\U00020000-\U0003134f]|[^\s"
    r"\u2e80-\u9fff\uf900-\ufaff\uff00-\uffef\U00020000-\U0003134f]+"
)


def missing_packages() -> list[str]:
    """The pip packages BLEU / ROUGE-L need that are not installed."""
    needed = {"sacrebleu": "sacrebleu", "rouge_score": "rouge-score"}
    return [pip for mod, pip in needed.items() if importlib.util.find_spec(mod) is None]


def char_tokens(text: str) -> list[str]:
    """Han characters one by one, other words whole: "GPT-3 模型" -> ["GPT-3", "模", "型"]."""
    return _TOKEN.findall(text)


class _CharTokenizer:
    # rouge-score's own tokenizer keeps only [a-z0-9], which deletes all Chinese text.
    def tokenize(self, text: str) -> list[str]:
        return char_tokens(text)


def bleu(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU-4 (sacrebleu, ``zh`` tokenization), 0-100."""
    import sacrebleu

    if not predictions:
        return 0.0
    return float(sacrebleu.corpus_bleu(predictions, [references], tokenize="zh").score)


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F1 over pairs (rouge-score, character tokens), 0-100."""
    from rouge_score import rouge_scorer

    if not predictions:
        return 0.0
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_CharTokenizer())
    scores = [
        scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)
    ]
    return 100.0 * sum(scores) / len(scores)
