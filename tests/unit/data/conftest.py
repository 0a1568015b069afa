"""Shared fixtures of the data tests: real corpora from the shared data (read through
tests/conftest.py's ``shared_path``: absent files skip), a small trained tokenizer, tiny synthetic
indexed datasets."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from megagpt.data.indexed import IndexedDatasetWriter
from tests import conftest as shared


# Every kind of character the jieba-BPE round trip must keep.
MIXED_TEXT = (
    "第一条　为了保护公民的合法权益，制定本法。\n"
    "GPT-3 has 175B parameters; 中文模型有 2.7B。\n\n"
    "  两个空格  和\t制表符\r\n"
    "全角：，。！？（）【】「」《》“”‘’１２３ＡＢＣ\n"
    "emoji 😀👍🏽🇨🇳 与生僻字 𠀀𪚥 and digits 0123456789 3.1415926\n"
)


def read_texts(path: Path, limit: int, key: str = "text") -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)[key])
            if len(texts) == limit:
                break
    return texts


class DataFiles:
    """Paths and helpers for the tests (a fixture, so that no test imports conftest). A shared
    file's path is looked up when a test reads the attribute: a test that needs an absent file
    is skipped, one that needs none of them runs."""

    MIXED_TEXT = MIXED_TEXT
    read_texts = staticmethod(read_texts)

    @property
    def WIKI(self) -> Path:  # noqa: N802  (named like the constants they replace)
        return shared.shared_path(shared.WIKI)

    @property
    def LAWS(self) -> Path:  # noqa: N802
        return shared.shared_path(shared.LAWS)

    @property
    def POETRY(self) -> Path:  # noqa: N802
        return shared.shared_path(shared.POETRY_TEST)

    @property
    def BERT_VOCAB(self) -> Path:  # noqa: N802
        return shared.shared_path(shared.BERT_VOCAB)

    @property
    def CPM_MODEL(self) -> Path:  # noqa: N802
        return shared.shared_path(shared.CPM_MODEL)

    @staticmethod
    def write_dataset(prefix: Path | str, docs: list, dtype=np.uint16) -> str:
        return write_dataset(prefix, docs, dtype)


@pytest.fixture(scope="session")
def data() -> DataFiles:
    """The shared files and helpers of the data tests."""
    return DataFiles()


@pytest.fixture(scope="session")
def wiki_texts() -> list[str]:
    return shared.read_jsonl(shared.WIKI, 300)


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
