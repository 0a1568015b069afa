"""Shared test setup: no network loggers, GPU tests skipped without CUDA, the shared data and the
tiny model directories every tier builds.

The shared data (``../shared/data`` beside the checkout; ``MEGAGPT_TEST_DATA`` points elsewhere)
is read only through :func:`shared_path` (or :func:`read_jsonl` over it), so that a test that
needs a file which is absent is skipped with the path it looked for, never an error.

DeepSpeed's accelerator is not set here: megagpt chooses it from each run's resolved device
(megagpt/engine/accelerator.py), for CPU and CUDA workers alike.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]

# The files of the shared data the tests read (its README.md says what each is).
WIKI = "corpus/wiki_cmrc2018.jsonl"
LAWS = "corpus/laws.jsonl"
POETRY_TRAIN = "poetry/train.jsonl"
POETRY_TEST = "poetry/test.jsonl"
BERT_VOCAB = "vocab/bert-chinese/vocab.txt"
CPM_MODEL = "vocab/cpm-jieba-sp/chinese_vocab.model"


def shared_data_root() -> Path:
    """The shared data folder: ``$MEGAGPT_TEST_DATA`` when set, else ``../shared/data``."""
    return Path(os.environ.get("MEGAGPT_TEST_DATA") or ROOT.parent / "shared" / "data")


def shared_path(relative: str) -> Path:
    """``relative`` (e.g. :data:`WIKI`) inside the shared data; skips the calling test (or the
    fixture's users) with the path it looked for when the file is absent."""
    path = shared_data_root() / relative
    if not path.exists():
        pytest.skip(
            f"needs the shared test data: {path} is absent (it lives in ../shared/data "
            f"beside the checkout; set MEGAGPT_TEST_DATA to use another folder)"
        )
    return path


def read_jsonl(relative: str, limit: int | None = None, key: str = "text") -> list[str]:
    """Field ``key`` of the first ``limit`` rows (all when None) of a shared jsonl file."""
    texts: list[str] = []
    with open(shared_path(relative), encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(texts) == limit:
                break
            texts.append(json.loads(line)[key])
    return texts


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder (the test is skipped when it is absent)."""
    return shared_path(WIKI).parents[1]


def build_tokenizer_dir(root: Path) -> str:
    """A jieba-BPE tokenizer (vocab 1024) trained on 150 wiki articles and 600 poems."""
    from megagpt.data import train_tokenizer

    docs = read_jsonl(WIKI, 150) + read_jsonl(POETRY_TRAIN, 600, key="text1")
    out = root / "tok"
    train_tokenizer(iter(docs), str(out), vocab_size=1024)
    return str(out)


def sharpen_embeddings(name: str) -> float:
    """The generation tests' scale: a random init is nearly uniform; word embeddings 8x make
    decoding take real (non-tied) choices and make the stop tokens rare."""
    return 8.0 if "word_embeddings" in name else 1.0


def build_model_dir(
    out: Path,
    tokenizer: str,
    *,
    seed: int = 7,
    scale: Callable[[str], float] = sharpen_embeddings,
    **model_keys,
) -> str:
    """A gpt3-tiny model directory at ``out`` (random weights, dropout off) with ``tokenizer``.

    ``model_keys`` override fields of the gpt3-tiny ``ModelConfig``; every parameter is then
    multiplied by ``scale(its name)`` (1.0 leaves it as initialised)."""
    import torch

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
        for name, p in model.named_parameters():
            factor = scale(name)
            if factor != 1.0:
                p.mul_(factor)
    model_dir.save_tensors(str(out), model_dir.full_tensors(model, cfg))
    model_dir.write_config(str(out), cfg)
    model_dir.copy_tokenizer(str(out), tokenizer)
    return str(out)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
