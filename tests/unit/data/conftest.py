"""Shared fixtures of the data tests: real corpora from ../shared/data, a small trained tokenizer,
tiny synthetic indexed datasets."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from megagpt.data.indexed import IndexedDatasetWriter

ROOT = Path(__file__).resolve().parents[3]
SHARED_DATA = ROOT.parent / "shared" / "data"
WIKI = SHARED_DATA / "corpus" / "wiki_cmrc2018.jsonl"
LAWS = SHARED_DATA / "corpus" / "laws.jsonl"
POETRY = SHARED_DATA / "poetry" / "test.jsonl"
BERT_VOCAB = SHARED_DATA / "vocab" / "bert-chinese" / "vocab.txt"
CPM_MODEL = SHARED_DATA / "vocab" / "cpm-jieba-sp" / "chinese_vocab.model"

# Every kind of character the jieba-BPE round trip must keep.
MIXED_TEXT = (
    "第一条　为了保护公民的合法权益，制定本法。\n"
    "GPT-3 has 175B parameters; 中文模型有 2.7B。\n\n"
    "  两个空格  和\t制表符\r\n"
    "全角：，。！？（）【】「」《》“”‘’１２３ＡＢＣ\n"
    "emoji 😀👍🏽🇨🇳 与生僻字 𠀀𪚥 and digits 0123456789 3.1415926\n"
)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: slower data tests (seconds); deselect with -m 'not slow'"
    )


def read_texts(path: Path, limit: int, key: str = "text") -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)[key])
            if len(texts) == limit:
                break
    return texts


@pytest.fixture(scope="session")
def data() -> SimpleNamespace:
    """Paths and helpers for the tests (fixtures, so that no test imports conftest)."""
    return SimpleNamespace(
        WIKI=WIKI,
        LAWS=LAWS,
        POETRY=POETRY,
        BERT_VOCAB=BERT_VOCAB,
        CPM_MODEL=CPM_MODEL,
        MIXED_TEXT=MIXED_TEXT,
        read_texts=read_texts,
        write_dataset=write_dataset,
    )


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not WIKI.exists():
        pytest.skip(f"shared test data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def wiki_texts(shared_data) -> list[str]:
    return read_texts(WIKI, 300)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, wiki_texts) -> Path:
    """A jieba-BPE tokenizer trained on 300 wiki articles (small vocab: fast, still real)."""
    from megagpt.data.tokenizer_train import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_tokenizer(wiki_texts, str(out), vocab_size=4000)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from megagpt.data.tokenizer import build_tokenizer

    return build_tokenizer(str(tokenizer_dir))


def write_dataset(prefix: Path | str, docs: list, dtype=np.uint16) -> str:
    """Write ``docs`` (lists of token ids) as PREFIX.bin/.idx with our writer; return PREFIX."""
    prefix = str(prefix)
    with IndexedDatasetWriter(prefix, np.dtype(dtype)) as w:
        for doc in docs:
            w.add_document(np.asarray(doc))
    return prefix


@pytest.fixture
def make_dataset(tmp_path):
    """Factory: ``make_dataset(name, lengths, eod=0)`` -> prefix of a dataset whose document
    ``d`` holds tokens ``1000*d + 1 ...`` (unique per document) and ends with ``eod``."""

    def make(name: str, lengths: list[int], eod: int = 0) -> str:
        docs = []
        for d, n in enumerate(lengths):
            body = list(range(1000 * d + 1, 1000 * d + n))
            docs.append(body + [eod] if n > 0 else [])
        return write_dataset(tmp_path / name, docs, np.int32)

    return make
