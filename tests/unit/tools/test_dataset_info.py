"""tools/dataset_info.py: counts, dtype, vocabulary and decoded samples of indexed datasets."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megagpt.data.indexed import IndexedDatasetWriter
from tests.unit.tools.conftest import load_tool, run_script


@pytest.fixture(scope="module")
def tool():
    return load_tool("dataset_info")


def _write(prefix, docs, vocab_size=None, dtype=np.uint16) -> str:
    with IndexedDatasetWriter(str(prefix), np.dtype(dtype), vocab_size=vocab_size) as w:
        for d in docs:
            w.add_document(np.asarray(d, dtype=dtype))
    return str(prefix)


def test_counts_lengths_and_scanned_vocab(tmp_path, tool):
    docs = [[5, 6, 7], [], [1] * 10, [299, 2]]
    prefix = _write(tmp_path / "d", docs)
    info = tool.describe(prefix)
    assert (info["documents"], info["sequences"], info["tokens"]) == (4, 4, 15)
    assert info["dtype"] == "uint16"
    assert info["sequence_length"]["max"] == 10 and info["sequence_length"]["empty"] == 1
    assert info["vocab"] == {"max_token_id": 299, "source": "scan"}
    assert "vocab" not in tool.describe(prefix, scan=False)


def test_vocab_record_and_decoded_samples(tmp_path, tool, jieba_tokenizer, wiki_texts):
    from megagpt.data.tokenizer import build_tokenizer

    tok = build_tokenizer(str(jieba_tokenizer))
    texts = wiki_texts[:5]
    prefix = _write(tmp_path / "wiki", [tok.encode(t) for t in texts], vocab_size=tok.vocab_size)
    info = tool.describe(prefix, tokenizer=tok, samples=2, sample_tokens=1000)
    assert info["vocab"]["vocab_size"] == tok.vocab_size
    assert info["vocab"]["source"] == "wiki.vocab.json"
    # Samples spread over the dataset: the first and the last document, decoded whole.
    assert [s["sequence"] for s in info["samples"]] == [0, 4]
    assert info["samples"][0]["text"] == tok.decode(tok.encode(texts[0])[:1000])
    assert info["samples"][0]["text"][:10] == texts[0][:10]


def test_ids_outside_the_tokenizer_are_refused(tmp_path, tool, jieba_tokenizer):
    from megagpt.data.errors import DataError
    from megagpt.data.tokenizer import build_tokenizer

    tok = build_tokenizer(str(jieba_tokenizer))
    prefix = _write(tmp_path / "big", [[1, 2, tok.vocab_size + 5]])
    with pytest.raises(DataError, match=f"token id {tok.vocab_size + 5} is outside"):
        tool.describe(prefix, tokenizer=tok)


def test_another_tokenizer_of_the_same_size_is_refused(tmp_path, tool, jieba_tokenizer):
    """--tokenizer against the tokenizer recorded with the dataset (its fingerprint): the same
    one decodes, another of the same size (every id fits) is refused naming the dataset."""
    from megagpt.data.errors import DataError
    from megagpt.data.indexed import TokenizerRecord
    from megagpt.data.tokenizer import build_tokenizer

    tok = build_tokenizer(str(jieba_tokenizer))

    def write(name, record):
        prefix = str(tmp_path / name)
        with IndexedDatasetWriter(prefix, np.dtype(np.uint16), tok.vocab_size, record) as w:
            w.add_document(np.array(tok.encode("北京"), np.uint16))
        return prefix

    ours = write("ours", TokenizerRecord.of(tok))
    info = tool.describe(ours, tokenizer=tok)
    assert info["tokenizer"]["same_as_recorded"] and info["samples"][0]["text"] == "北京"
    assert "the tokenizer recorded with the dataset" in tool.render(info)
    theirs = write("theirs", TokenizerRecord("c" * 64, "/elsewhere", "jieba-bpe"))
    with pytest.raises(DataError, match="preprocessed with another tokenizer") as err:
        tool.describe(theirs, tokenizer=tok)
    assert str(err.value).startswith(f"dataset={theirs}: ") and "than --tokenizer" in str(err.value)


def test_script_on_a_folder_and_errors(tmp_path):
    _write(tmp_path / "a", [[1, 2], [3]])
    _write(tmp_path / "b", [[4]], vocab_size=10)
    out = run_script("dataset_info", str(tmp_path), "--json")
    assert out.returncode == 0, out.stderr
    infos = json.loads(out.stdout)
    assert [i["tokens"] for i in infos] == [3, 1]
    text = run_script("dataset_info", str(tmp_path / "a.bin"))
    assert text.returncode == 0 and "documents  2" in text.stdout
    missing = run_script("dataset_info", str(tmp_path / "nope"))
    assert missing.returncode == 2
    assert missing.stderr.startswith("dataset_info.py: error:") and "nope" in missing.stderr
    (tmp_path / "a.bin").write_bytes(b"\0" * 3)  # damaged: size disagrees with the index
    damaged = run_script("dataset_info", str(tmp_path / "a"))
    assert damaged.returncode == 2 and "does not match its index" in damaged.stderr
