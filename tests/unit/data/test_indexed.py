"""The .bin/.idx format: megatron-core reads ours identically and we read theirs."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest

from megagpt.data import DataError, IndexedDataset, IndexedDatasetWriter
from megagpt.data.indexed import dtype_for_vocab


@pytest.fixture(scope="module")
def megatron_indexed():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Transformer Engine and Apex are not installed"
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def _random_docs(vocab: int, n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 300, n)
    lengths[3] = 0  # an empty document is legal in the format
    return [rng.integers(0, vocab, size) for size in lengths]


@pytest.mark.parametrize(
    ("vocab", "dtype"),
    [(21128, np.uint16), (65536, np.uint16), (65537, np.int32), (250_000, np.int32)],
)
def test_dtype_follows_vocab_size(vocab, dtype):
    assert dtype_for_vocab(vocab) == np.dtype(dtype)


@pytest.mark.parametrize("vocab", [25600, 100_000])
def test_megatron_core_reads_our_output_identically(tmp_path, megatron_indexed, vocab, data):
    docs = _random_docs(vocab, 40)
    prefix = data.write_dataset(tmp_path / "ours", docs, dtype_for_vocab(vocab))
    theirs = megatron_indexed.IndexedDataset(prefix)
    assert len(theirs) == len(docs)
    assert theirs.index.dtype == dtype_for_vocab(vocab)
    assert list(theirs.document_indices) == list(range(len(docs) + 1))
    for i, doc in enumerate(docs):
        np.testing.assert_array_equal(theirs[i], doc)
        assert theirs[i].dtype == dtype_for_vocab(vocab)
    np.testing.assert_array_equal(theirs.get(5, offset=2, length=7), docs[5][2:9])


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_we_read_megatron_core_output_identically(tmp_path, megatron_indexed, dtype):
    import torch

    docs = _random_docs(30000, 40, seed=1)
    prefix = str(tmp_path / "theirs")
    builder = megatron_indexed.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in docs:
        builder.add_item(torch.from_numpy(doc))
        builder.end_document()
    builder.finalize(prefix + ".idx")

    ours = IndexedDataset(prefix)
    assert len(ours) == len(docs) and ours.num_documents == len(docs)
    assert ours.dtype == np.dtype(dtype)
    for i, doc in enumerate(docs):
        np.testing.assert_array_equal(ours[i], doc)
    np.testing.assert_array_equal(ours.get(7, 3, 4), docs[7][3:7])
    # And the files we write for the same documents are byte-identical to theirs.
    mine = str(tmp_path / "mine")
    with IndexedDatasetWriter(mine, np.dtype(dtype)) as w:
        for doc in docs:
            w.add_document(doc)
    for ext in (".bin", ".idx"):
        with open(prefix + ext, "rb") as a, open(mine + ext, "rb") as b:
            assert a.read() == b.read(), ext


def test_writer_abort_leaves_nothing_and_keeps_previous_dataset(tmp_path, data):
    prefix = data.write_dataset(tmp_path / "ds", [[1, 2, 3]])
    before = {p: Path(p).read_bytes() for p in (prefix + ".bin", prefix + ".idx")}
    with pytest.raises(RuntimeError), IndexedDatasetWriter(prefix, np.dtype(np.uint16)) as w:
        w.add_document([4, 5, 6, 7])
        raise RuntimeError("crash mid-write")
    assert sorted(os.listdir(tmp_path)) == ["ds.bin", "ds.idx"]
    assert {p: Path(p).read_bytes() for p in before} == before


def test_truncated_bin_is_detected(tmp_path, data):
    prefix = data.write_dataset(tmp_path / "ds", [[1, 2, 3], [4, 5]])
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(4)
    with pytest.raises(DataError, match=r"ds\.bin.*does not match its index"):
        IndexedDataset(prefix)


@pytest.mark.parametrize("damage", ["missing-idx", "bad-magic", "truncated-idx"])
def test_damaged_index_is_a_clear_error(tmp_path, data, damage):
    prefix = data.write_dataset(tmp_path / "ds", [[1, 2, 3], [4, 5]])
    idx = Path(prefix + ".idx")
    if damage == "missing-idx":
        os.unlink(idx)
        match = "not found"
    elif damage == "bad-magic":
        raw = bytearray(idx.read_bytes())
        raw[:4] = b"XXXX"
        idx.write_bytes(bytes(raw))
        match = "not a megatron indexed dataset"
    else:
        idx.write_bytes(idx.read_bytes()[:40])
        match = "truncated"
    with pytest.raises(DataError, match=match):
        IndexedDataset(prefix)


def test_pickling_sends_the_prefix_not_the_tokens(tmp_path, data):
    import pickle

    prefix = data.write_dataset(tmp_path / "ds", [list(range(1, 5000))] * 20)
    ds = IndexedDataset(prefix)
    blob = pickle.dumps(ds)
    assert len(blob) < 1000
    np.testing.assert_array_equal(pickle.loads(blob)[19], ds[19])


@pytest.mark.parametrize("copy_file_range", [True, False])
def test_shards_merge_into_the_same_bytes_as_one_writer(
    tmp_path, monkeypatch, copy_file_range, megatron_indexed
):
    """Parallel preprocessing's path (ShardWriter parts + append_shard) against plain writes,
    with the index streamed in blocks smaller than the dataset."""
    from megagpt.data import indexed

    if not copy_file_range:
        monkeypatch.delattr(os, "copy_file_range", raising=False)  # the portable fallback
    docs = _random_docs(25600, 40)
    with IndexedDatasetWriter(str(tmp_path / "one"), np.uint16, vocab_size=25600) as w:
        for d in docs:
            w.add_document(d)
    monkeypatch.setattr(indexed, "_INDEX_BLOCK", 7)
    with IndexedDatasetWriter(str(tmp_path / "merged"), np.uint16, vocab_size=25600) as w:
        w.add_document(docs[0])  # a plain write before the shards
        for part, start in enumerate(range(1, 40, 13)):
            with indexed.ShardWriter(str(tmp_path / f"shard{part}"), np.uint16) as shard:
                chunk = docs[start : start + 13]
                shard.add_documents(np.concatenate(chunk), [len(d) for d in chunk])
            w.append_shard(shard.close())
    for ext in (".bin", ".idx", ".vocab.json"):
        assert (tmp_path / f"merged{ext}").read_bytes() == (tmp_path / f"one{ext}").read_bytes()
    assert sorted(os.listdir(tmp_path)) == sorted(
        f"{name}{ext}" for name in ("one", "merged") for ext in (".bin", ".idx", ".vocab.json")
    )
    theirs = megatron_indexed.IndexedDataset(str(tmp_path / "merged"))
    assert [theirs[i].tolist() for i in range(40)] == [d.tolist() for d in docs]


def test_shard_of_another_dtype_is_refused(tmp_path):
    from megagpt.data.indexed import ShardWriter

    with ShardWriter(str(tmp_path / "s"), np.int32) as shard:
        shard.add_documents(np.array([1, 2]), [2])
    with pytest.raises(ValueError, match="dtype"):
        with IndexedDatasetWriter(str(tmp_path / "out"), np.uint16) as w:
            w.append_shard(shard.close())
    assert not (tmp_path / "out.idx").exists()
