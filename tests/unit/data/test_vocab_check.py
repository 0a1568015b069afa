"""Data that does not fit the model: the tokenizer's size is recorded with a dataset at
preprocessing, and ``check_vocab`` refuses ids past the model's vocabulary (with or without the
record) naming the data.paths entry, the largest id and the vocabulary size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from megagpt.data import DataError, make_input_spec, preprocess
from megagpt.data.indexed import check_vocab, max_token_id, vocab_path, vocab_record


def test_preprocess_records_the_tokenizer_size_and_largest_id(
    tmp_path, tokenizer_dir, tokenizer, wiki_texts
):
    src = tmp_path / "docs.jsonl"
    src.write_text(
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in wiki_texts[:20]),
        encoding="utf-8",
    )
    prefix = str(tmp_path / "ds")
    preprocess(
        [make_input_spec(str(src))], str(tokenizer_dir), prefix, append_eod=True, progress=False
    )
    record = vocab_record(prefix)
    assert record.pop("tokenizer")["fingerprint"] == tokenizer.fingerprint  # test_fingerprint.py
    assert record == {"vocab_size": tokenizer.vocab_size, "max_token_id": max_token_id(prefix)}
    assert 0 < record["max_token_id"] < tokenizer.vocab_size
    check_vocab(prefix, tokenizer.vocab_size, "data.paths[0]")  # fits: no error
    with pytest.raises(
        DataError,
        match=rf"data.paths\[0\]={prefix}: preprocessed with a "
        rf"tokenizer of {tokenizer.vocab_size} tokens .* has 1000",
    ):
        check_vocab(prefix, 1000, "data.paths[0]")


def test_dataset_without_record_is_scanned(tmp_path, data, monkeypatch):
    """No vocab.json (an older dataset, another tool): the largest id is found by a chunked
    scan of .bin (chunks of 7 tokens here, so the maximum sits in a later chunk)."""
    from megagpt.data import indexed

    monkeypatch.setattr(indexed, "_SCAN_TOKENS", 7)
    prefix = data.write_dataset(tmp_path / "old", [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10, 1500, 2]])
    assert not (tmp_path / "old.vocab.json").exists()
    assert max_token_id(prefix) == 1500
    check_vocab(prefix, 1501, "data.paths[1]")
    with pytest.raises(
        DataError,
        match=r"data.paths\[1\]=.*old: token id 1500 does not fit "
        r"the model's vocabulary of 1024",
    ):
        check_vocab(prefix, 1024, "data.paths[1]")


def test_record_is_written_atomically_and_replaced(tmp_path):
    """The writer records the largest id it wrote; rewriting the prefix without a record
    removes the stale one (it would describe other data)."""
    from megagpt.data.indexed import IndexedDatasetWriter

    prefix = str(tmp_path / "ds")
    with IndexedDatasetWriter(prefix, np.dtype(np.uint16), vocab_size=3000) as w:
        w.add_document(np.array([5, 2999, 7]))
    assert vocab_record(prefix) == {"vocab_size": 3000, "max_token_id": 2999}
    with IndexedDatasetWriter(prefix, np.dtype(np.uint16)) as w:
        w.add_document(np.array([5]))
    assert vocab_record(prefix) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds.bin", "ds.idx"]


def test_damaged_record_names_the_file(tmp_path, data):
    prefix = data.write_dataset(tmp_path / "ds", [[1, 2]])
    Path(vocab_path(prefix)).write_text("{not json")
    with pytest.raises(DataError, match=r"ds.vocab.json: unreadable vocabulary record"):
        check_vocab(prefix, 100, "data.paths[0]")


def test_a_dataset_of_a_smaller_tokenizer_is_refused(tmp_path):
    """Ids of a 512-token tokenizer read with a 700-token one: every id fits, and means another
    token. The recorded size must equal the tokenizer's, not merely fit under it."""
    from megagpt.data.indexed import IndexedDatasetWriter

    prefix = str(tmp_path / "ds")
    with IndexedDatasetWriter(prefix, np.dtype(np.uint16), vocab_size=512) as w:
        w.add_document(np.array([5, 511, 7]))
    check_vocab(prefix, 512, "data.paths[0]")
    with pytest.raises(
        DataError,
        match=rf"data.paths\[0\]={prefix}: preprocessed with a tokenizer of 512 tokens "
        r"\(recorded in ds.vocab.json, largest id 511\), but data.tokenizer has 700",
    ):
        check_vocab(prefix, 700, "data.paths[0]")
