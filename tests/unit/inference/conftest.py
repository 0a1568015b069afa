"""Fixtures of the generation tests: a small real tokenizer and a tiny model directory.

megatron-core's parallel layers need their (size-1) tensor-parallel group even at TP=1, so the
model tests run inside one local single-process gloo group, set up once per session and torn
down at the end (the environment variables it sets are restored).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[3].parent / "shared" / "data"
WIKI = SHARED / "corpus" / "wiki_cmrc2018.jsonl"
POETRY_TRAIN = SHARED / "poetry" / "train.jsonl"
POETRY_TEST = SHARED / "poetry" / "test.jsonl"


def build_tokenizer_dir(root: Path) -> str:
    """A jieba-BPE tokenizer (vocab 1024) trained on 150 wiki articles and 600 poems."""
    from megagpt.data import train_tokenizer

    docs = [json.loads(x)["text"] for x in WIKI.read_text(encoding="utf-8").splitlines()[:150]]
    poems = [json.loads(x)["text1"]
             for x in POETRY_TRAIN.read_text(encoding="utf-8").splitlines()[:600]]
    out = root / "tok"
    train_tokenizer(iter(docs + poems), str(out), vocab_size=1024)
    return str(out)


def build_model_dir(root: Path, tokenizer: str, seed: int = 7, **model_keys) -> str:
    """A gpt3-tiny model directory (random weights, dropout off) with ``tokenizer``."""
    from megagpt.checkpoint import model_dir
    from megagpt.config import ParallelConfig, from_name
    from megagpt.model import GPTModel, initialize_weights, megatron_config

    cfg = from_name("gpt3-tiny")
    cfg.dropout = cfg.attention_dropout = 0.0
    for k, v in model_keys.items():
        setattr(cfg, k, v)
    model = GPTModel(cfg, megatron_config(cfg, ParallelConfig()))
    initialize_weights(model, cfg, seed, 0, 1)
    with torch.no_grad():
        # A random init is nearly uniform: sharpen the head so that decoding makes real
        # (non-tied) choices and the stop tokens are rare.
        for name, p in model.named_parameters():
            if "word_embeddings" in name:
                p.mul_(8.0)
    out = root / "model"
    model_dir.save_tensors(str(out), model_dir.full_tensors(model, cfg))
    model_dir.write_config(str(out), cfg)
    model_dir.copy_tokenizer(str(out), tokenizer)
    return str(out)


class _LocalGroup:
    """A single-process gloo group for the duration of a ``with``, unless one already exists;
    the environment variables it sets are restored."""

    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

    def __enter__(self):
        from megagpt import parallel
        from megagpt.config import ParallelConfig

        self.saved = {k: os.environ.get(k) for k in self.keys}
        self.owner = not parallel.is_initialized()
        if self.owner:
            parallel.initialize(ParallelConfig(backend="gloo"), torch.device("cpu"))
        return self

    def __exit__(self, *exc):
        from megagpt import parallel

        if self.owner:
            parallel.destroy()
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_ASSETS: dict = {}


def shared_assets(tmp_path_factory) -> dict:
    """Tokenizer and tiny model directory, built once per test session (for the distributed
    tests, which would otherwise each start a process to build them)."""
    if not _ASSETS:
        root = tmp_path_factory.mktemp("gen_assets")
        tok = build_tokenizer_dir(root)
        with _LocalGroup():
            model = build_model_dir(root, tok)
        _ASSETS.update(root=root, tokenizer=tok, model=model)
    return _ASSETS


@pytest.fixture(scope="session")
def process_group():
    with _LocalGroup():
        yield


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    return shared_assets(tmp_path_factory)["tokenizer"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, process_group) -> str:
    return shared_assets(tmp_path_factory)["model"]


@pytest.fixture(scope="session")
def pipe(tiny_model_dir):
    from megagpt import pipeline

    return pipeline("text-generation", model=tiny_model_dir, device="cpu")
