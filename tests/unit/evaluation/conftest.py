"""Fixtures of the evaluation tests: a tiny model with the BERT Chinese vocabulary.

The BERT WordPiece vocabulary is used because Hugging Face's tokenizer of an exported model
splits Chinese text exactly as megagpt's does (the jieba-BPE family pre-segments in Python,
which a Hugging Face tokenizer cannot reproduce), so the lm-eval ``hf`` model sees the same ids.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import BERT_VOCAB, build_model_dir, shared_path


def bert_scale(name: str) -> float:
    """Word embeddings 8x (choices differ clearly), positions 20x (positions steer the output:
    decoding does not repeat one token)."""
    if "word_embeddings" in name:
        return 8.0
    if "position_embeddings" in name:
        return 20.0
    return 1.0


def build_bert_model_dir(root: Path, seed: int = 11) -> str:
    """A 2-layer model directory (hidden 32, 32 positions, the 21,128-token BERT vocab)."""
    return build_model_dir(
        root / "model",
        str(shared_path(BERT_VOCAB)),
        seed=seed,
        scale=bert_scale,
        num_layers=2,
        hidden_size=32,
        ffn_hidden_size=128,
        max_position_embeddings=32,
        seq_length=32,
        vocab_size=21128,
    )


@pytest.fixture(scope="session")
def bert_model_dir(tmp_path_factory) -> str:
    return build_bert_model_dir(tmp_path_factory.mktemp("eval_model"))


@pytest.fixture(scope="session")
def scorer(bert_model_dir):
    from megagpt.evaluation.model import load_scorer

    return load_scorer(bert_model_dir, device="cpu", dtype="fp32")
