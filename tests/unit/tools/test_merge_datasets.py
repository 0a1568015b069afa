"""tools/merge_datasets.py: megatron-core reads the merge, equal to the concatenation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megagpt.data.indexed import IndexedDatasetWriter
from tests.unit.tools.conftest import load_tool, run_script


@pytest.fixture(scope="module")
def tool():
    return load_tool("merge_datasets")


def _docs(seed: int, n: int, high: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, high, rng.integers(1, 50)) for _ in range(n)]
    docs[n // 2] = np.zeros(0, np.int64)  # an empty document survives the merge too
    return docs


def _write(prefix, docs, dtype) -> str:
    with IndexedDatasetWriter(str(prefix), np.dtype(dtype)) as w:
        for d in docs:
            w.add_document(np.asarray(d, dtype=dtype))
    return str(prefix)


def _write_mcore(prefix, docs, dtype) -> str:
    """A dataset written by megatron-core's own builder (as Megatron-LM's preprocessing does)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    b = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for d in docs:
        b.add_document(torch.as_tensor(np.asarray(d, dtype=np.int64)), [len(d)])
    b.finalize(f"{prefix}.idx")
    return str(prefix)


@pytest.mark.parametrize("chunk", [1 << 26, 7])  # 7 tokens: many chunks, documents larger
def test_megatron_core_reads_the_concatenation(chunk, tmp_path, tool, monkeypatch):
    monkeypatch.setattr(tool, "CHUNK_TOKENS", chunk)
    parts = [_docs(1, 30, 60000), _docs(2, 1, 60000), _docs(3, 45, 60000)]
    a = _write(tmp_path / "a", parts[0], np.uint16)
    b = _write(tmp_path / "b", parts[1], np.uint16)
    c = _write_mcore(tmp_path / "c", parts[2], np.uint16)
    out = tmp_path / "merged" / "abc"
    docs, tokens = tool.merge([a, f"{b}.bin", c], str(out), log=lambda m: None)
    expected = [d for part in parts for d in part]
    assert docs == len(expected) == 76 and tokens == sum(len(d) for d in expected)

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(out))
    assert len(ds) == 76 and ds.index.dtype == np.uint16
    assert list(ds.document_indices) == list(range(77))
    for i, d in enumerate(expected):
        np.testing.assert_array_equal(ds[i], d)
    assert ds.sequence_lengths.sum() == tokens


def test_directory_input_in_name_order_and_cli(tmp_path, tool, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    d1, d0 = _docs(5, 4, 1000), _docs(6, 3, 1000)
    _write(shards / "part-1", d1, np.int32)
    _write(shards / "part-0", d0, np.int32)
    out = tmp_path / "all"
    assert tool.main(["--input", str(shards), "--output-prefix", str(out)]) == 0
    assert "7 documents" in capsys.readouterr().out
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(out))
    for i, d in enumerate(d0 + d1):
        np.testing.assert_array_equal(ds[i], d)
    # An existing output is kept unless --overwrite.
    assert tool.main(["--input", str(shards), "--output-prefix", str(out)]) == 2
    assert "already exist; pass --overwrite" in capsys.readouterr().err
    assert tool.main(["--input", str(shards), "--output-prefix", str(out), "--overwrite"]) == 0


def test_different_dtypes_are_refused_naming_both(tmp_path, tool, capsys):
    a = _write(tmp_path / "small", _docs(1, 3, 100), np.uint16)
    b = _write(tmp_path / "big", _docs(2, 3, 100), np.int32)
    assert tool.main(["--input", a, b, "--output-prefix", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{a}: uint16" in err and f"{b}: int32" in err and "different dtypes" in err
    assert not list(tmp_path.glob("o.*"))


def test_sentence_split_input_is_refused(tmp_path, tool, capsys):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    b = IndexedDatasetBuilder(str(tmp_path / "sent.bin"), dtype=np.uint16)
    b.add_document(torch.arange(10), [4, 6])  # one document of two sentences
    b.finalize(str(tmp_path / "sent.idx"))
    code = tool.main(["--input", str(tmp_path / "sent"), "--output-prefix", str(tmp_path / "o")])
    assert code == 2 and "2 sequences in 1 documents" in capsys.readouterr().err


def test_script_help_and_wrong_path(tmp_path):
    out = run_script("merge_datasets", "--help")
    assert out.returncode == 0 and "--output-prefix" in out.stdout
    out = run_script(
        "merge_datasets", "--input", str(tmp_path / "nope"), "--output-prefix", str(tmp_path / "o")
    )
    assert out.returncode == 2 and f"{tmp_path / 'nope'}: no dataset here" in out.stderr
    assert "Traceback" not in out.stderr


def test_tokenizer_size_records_are_carried_and_checked(tmp_path, tool, capsys):
    from megagpt.data import indexed

    def write(name, vocab):
        with IndexedDatasetWriter(str(tmp_path / name), np.dtype(np.uint16), vocab_size=vocab) as w:
            w.add_document(np.array([1, 2, vocab - 1], np.uint16))
        return str(tmp_path / name)

    a, b, c = write("a", 1000), write("b", 1000), write("c", 2000)
    assert tool.main(["--input", a, b, "--output-prefix", str(tmp_path / "ab")]) == 0
    assert indexed.vocab_record(str(tmp_path / "ab")) == {"vocab_size": 1000, "max_token_id": 999}
    assert tool.main(["--input", a, c, "--output-prefix", str(tmp_path / "ac")]) == 2
    err = capsys.readouterr().err
    assert "tokenizers of different sizes" in err and f"{c}: 2000" in err


def test_tokenizer_fingerprints_are_carried_and_checked(tmp_path, tool, capsys):
    """Same size, another tokenizer (its fingerprint): the merge is refused naming both inputs;
    the same tokenizer's fingerprint goes into the merge's record."""
    from megagpt.data import indexed
    from megagpt.data.indexed import TokenizerRecord

    def write(name, fingerprint):
        record = TokenizerRecord(fingerprint * 64, "/tok", "bert")
        prefix = str(tmp_path / name)
        with IndexedDatasetWriter(prefix, np.dtype(np.uint16), 1000, record) as w:
            w.add_document(np.array([1, 2, 999], np.uint16))
        return prefix

    a, b, c = write("a", "a"), write("b", "a"), write("c", "c")
    assert tool.main(["--input", a, b, "--output-prefix", str(tmp_path / "ab")]) == 0
    merged = indexed.vocab_record(str(tmp_path / "ab"))
    assert merged["vocab_size"] == 1000 and merged["tokenizer"]["fingerprint"] == "a" * 64
    assert tool.main(["--input", a, c, "--output-prefix", str(tmp_path / "ac")]) == 2
    err = capsys.readouterr().err
    assert "different tokenizers of 1000 tokens" in err and f"{c}: fingerprint cccccccc" in err
    assert not (tmp_path / "ac.bin").exists()
