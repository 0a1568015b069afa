"""Fixtures of the evaluation tests: a tiny model with the BERT Chinese vocabulary.

The BERT WordPiece vocabulary is used because Hugging Face's tokenizer of an exported model
splits Chinese text exactly as megagpt's does (the jieba-BPE family pre-segments in Python,
which a Hugging Face tokenizer cannot reproduce), so the lm-eval ``hf`` model sees the same ids.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.unit.inference.conftest import _LocalGroup

BERT_VOCAB = (Path(__file__).resolve().parents[3].parent / "shared" / "data" / "vocab"
              / "bert-chinese" / "vocab.txt")


def build_bert_model_dir(root: Path, seed: int = 11) -> str:
    """A 2-layer model directory (hidden 32, 32 positions, the 21,128-token BERT vocab)."""
    from megagpt.checkpoint import model_dir
    from megagpt.config import ParallelConfig, from_name
    from megagpt.model import GPTModel, initialize_weights, megatron_config

    cfg = from_name("gpt3-tiny")
    cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size = 2, 32, 128
    cfg.max_position_embeddings = cfg.seq_length = 32
    cfg.vocab_size = 21128
    cfg.dropout = cfg.attention_dropout = 0.0
    model = GPTModel(cfg, megatron_config(cfg, ParallelConfig()))
    initialize_weights(model, cfg, seed, 0, 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "word_embeddings" in name:
                p.mul_(8.0)  # sharper than a random init: choices differ clearly
            if "position_embeddings" in name:
                p.mul_(20.0)  # positions steer the output: decoding does not repeat one token
    out = root / "model"
    model_dir.save_tensors(str(out), model_dir.full_tensors(model, cfg))
    model_dir.write_config(str(out), cfg)
    model_dir.copy_tokenizer(str(out), str(BERT_VOCAB))
    return str(out)


@pytest.fixture(scope="session")
def eval_group():
    with _LocalGroup():
        yield


@pytest.fixture(scope="session")
def bert_model_dir(tmp_path_factory, eval_group) -> str:
    return build_bert_model_dir(tmp_path_factory.mktemp("eval_model"))


@pytest.fixture(scope="session")
def scorer(bert_model_dir):
    from megagpt.evaluation.model import load_scorer

    return load_scorer(bert_model_dir, device="cpu", dtype="fp32")
