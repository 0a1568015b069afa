"""Tokenizer fingerprints: a dataset records which tokenizer made it, not only its size, and
training refuses it with another tokenizer of the same size (``check_data_paths`` before any
process group). The fingerprint hashes content, not paths: a copy of the files, a model
directory's ``tokenizer/`` and another process give the same value."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from megagpt.config import Config
from megagpt.data import DataError, build_tokenizer, make_input_spec, preprocess
from megagpt.data.indexed import (
    IndexedDatasetWriter,
    TokenizerRecord,
    check_vocab,
    merged_vocab,
    vocab_path,
    vocab_record,
)
from megagpt.training.setup import check_data_paths

REPO = Path(__file__).resolve().parents[3]


SWAPPED = ("的", "是")


def _permuted_copy(src: Path, dest: Path) -> Path:
    """Tokenizer B: the files of ``src`` with the ids of two words (:data:`SWAPPED`) swapped.
    Same tokens, same size: only what the ids mean differs (the hardest case to tell apart)."""
    tok = build_tokenizer(str(src))
    ids = [tok.encode(word) for word in SWAPPED]
    assert all(len(i) == 1 for i in ids), ids  # each word is one token
    shutil.copytree(src, dest)
    path = dest / "tokenizer.json"
    spec = json.loads(path.read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    (a,), (b,) = ids
    vocab[by_id[a]], vocab[by_id[b]] = b, a
    path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    return dest


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tokenizer_dir, wiki_texts) -> str:
    """A dataset preprocessed with the session tokenizer (A)."""
    root = tmp_path_factory.mktemp("fp")
    src = root / "docs.jsonl"
    src.write_text(
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in wiki_texts[:20]),
        encoding="utf-8",
    )
    prefix = str(root / "ds")
    preprocess(
        [make_input_spec(str(src))], str(tokenizer_dir), prefix, append_eod=True, progress=False
    )
    return prefix


def _cfg(prefix: str, tokenizer: Path | str) -> Config:
    cfg = Config()
    cfg.data.paths = [prefix]
    cfg.data.tokenizer = str(tokenizer)
    return cfg


def test_preprocess_records_the_fingerprint_next_to_the_size(dataset, tokenizer):
    record = vocab_record(dataset)
    assert record["vocab_size"] == tokenizer.vocab_size
    assert record["tokenizer"] == {
        "fingerprint": tokenizer.fingerprint,
        "path": os.path.abspath(tokenizer.path),
        "settings": "jieba-bpe, segmenter rjieba",
    }
    assert len(tokenizer.fingerprint) == 64


def test_same_size_other_tokenizer_is_refused(tmp_path, dataset, tokenizer_dir, tokenizer):
    other_dir = _permuted_copy(tokenizer_dir, tmp_path / "tok2")
    other = build_tokenizer(str(other_dir))
    assert other.vocab_size == tokenizer.vocab_size
    text = "".join(SWAPPED)
    assert other.encode(text) == tokenizer.encode(text)[::-1]  # the ids mean other tokens
    check_data_paths(_cfg(dataset, tokenizer_dir), tokenizer)  # its own tokenizer: accepted
    with pytest.raises(DataError) as err:
        check_data_paths(_cfg(dataset, other_dir), other)
    msg = str(err.value)
    assert msg.startswith(f"data.paths[0]={dataset}: preprocessed with another tokenizer "), msg
    assert f"fingerprint {tokenizer.fingerprint[:8]}: jieba-bpe, segmenter rjieba, " in msg
    assert f"from {os.path.abspath(tokenizer.path)}; recorded in ds.vocab.json)" in msg
    assert f"than data.tokenizer={other_dir} (fingerprint {other.fingerprint[:8]}" in msg
    assert f"although both have {tokenizer.vocab_size} tokens" in msg


def test_same_tokenizer_copied_elsewhere_is_accepted(tmp_path, dataset, tokenizer_dir, tokenizer):
    copy = tmp_path / "elsewhere" / "tok"
    shutil.copytree(tokenizer_dir, copy)
    # Re-indented, keys reordered: the same JSON, so the same ids and the same fingerprint.
    spec = json.loads((copy / "tokenizer.json").read_text(encoding="utf-8"))
    (copy / "tokenizer.json").write_text(
        json.dumps(dict(reversed(spec.items())), indent=4, ensure_ascii=False), encoding="utf-8"
    )
    moved = build_tokenizer(str(copy / "tokenizer.json"))
    assert moved.fingerprint == tokenizer.fingerprint
    check_data_paths(_cfg(dataset, copy), moved)


def test_perplexity_of_a_dataset_refuses_another_tokenizer(tmp_path, dataset, tokenizer_dir):
    """``megagpt eval --data PREFIX`` scores the stored ids with the model's tokenizer: one of
    the same size but other ids is refused, naming the dataset (it scored other tokens)."""
    from megagpt.evaluation.model import EvalError
    from megagpt.evaluation.perplexity import read_documents

    other = build_tokenizer(str(_permuted_copy(tokenizer_dir, tmp_path / "tok2")))
    assert next(read_documents(dataset, build_tokenizer(str(tokenizer_dir)))).tokens
    with pytest.raises(EvalError, match="preprocessed with another tokenizer") as err:
        next(read_documents(dataset, other))
    assert str(err.value).startswith(f"{dataset} (dataset)={dataset}: ")
    assert "than the model's tokenizer (fingerprint" in str(err.value)


@pytest.mark.parametrize("source", ["dir", "file"])
def test_model_dir_tokenizer_has_the_source_fingerprint(
    tmp_path, dataset, tokenizer_dir, tokenizer, source
):
    """Continued pretraining / fine-tuning reads data made with the original tokenizer with a
    model directory's copy of it (``copy_tokenizer`` of data.tokenizer: a folder or its file)."""
    from megagpt.checkpoint import model_dir

    given = tokenizer_dir if source == "dir" else tokenizer_dir / "tokenizer.json"
    model_dir.copy_tokenizer(str(tmp_path / "model"), str(given))
    saved = model_dir.tokenizer_path(str(tmp_path / "model"))
    tok = build_tokenizer(saved)
    assert tok.fingerprint == tokenizer.fingerprint
    check_data_paths(_cfg(dataset, saved), tok)


def test_model_dir_keeps_a_single_files_settings_and_finds_it_by_name(tmp_path, wiki_texts):
    """data.tokenizer given as one file of a tokenizer trained with the jieba segmenter, under
    another name: the model directory's copy loads with the same segmenter (the same ids, so
    the same fingerprint), and a folder search finds it."""
    from megagpt.checkpoint import model_dir
    from megagpt.data.tokenizer_train import train_tokenizer

    src = tmp_path / "tok"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_tokenizer(wiki_texts[:50], str(src), vocab_size=1000, segmenter="jieba")
        (src / "tokenizer.json").rename(src / "zh_bpe.json")
        original = build_tokenizer(str(src / "zh_bpe.json"))
        model_dir.copy_tokenizer(str(tmp_path / "model"), str(src / "zh_bpe.json"))
        saved = build_tokenizer(model_dir.tokenizer_path(str(tmp_path / "model")))
    assert "segmenter jieba" in original.settings and "rjieba" not in original.settings
    assert saved.settings == original.settings
    assert saved.fingerprint == original.fingerprint


def test_old_record_without_fingerprint_keeps_the_size_check(tmp_path, dataset, tokenizer_dir):
    """A vocab.json from before the fingerprints loads with any tokenizer of its size."""
    for ext in (".bin", ".idx"):
        shutil.copy(dataset + ext, tmp_path / f"old{ext}")
    prefix = str(tmp_path / "old")
    record = vocab_record(dataset)
    del record["tokenizer"]
    Path(vocab_path(prefix)).write_text(json.dumps(record))
    other_dir = _permuted_copy(tokenizer_dir, tmp_path / "tok2")
    other = build_tokenizer(str(other_dir))
    check_data_paths(_cfg(prefix, other_dir), other)
    with pytest.raises(DataError, match=r"preprocessed with a tokenizer of 4000 tokens"):
        check_vocab(prefix, 4001, "data.paths[0]", TokenizerRecord.of(other))


def test_damaged_fingerprint_names_the_record(tmp_path, dataset):
    for ext in (".bin", ".idx"):
        shutil.copy(dataset + ext, tmp_path / f"ds{ext}")
    record = vocab_record(dataset)
    record["tokenizer"]["fingerprint"] = "3f2a"
    Path(vocab_path(str(tmp_path / "ds"))).write_text(json.dumps(record))
    with pytest.raises(DataError, match=r"ds.vocab.json: unreadable vocabulary record"):
        check_vocab(str(tmp_path / "ds"), 4000, "data.paths[0]")


_PRINT = (
    "import sys; from megagpt.data import build_tokenizer; "
    "print(*(build_tokenizer(p).fingerprint for p in sys.argv[1:]))"
)


def test_fingerprint_is_stable_across_processes(tokenizer_dir, data):
    paths = [str(tokenizer_dir), str(data.BERT_VOCAB), str(data.CPM_MODEL)]
    here = [build_tokenizer(p).fingerprint for p in paths]
    for seed in ("1", "4242"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONWARNINGS="ignore")
        out = subprocess.run(
            [sys.executable, "-c", _PRINT, *paths],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        assert out.stdout.split() == here


def test_fingerprint_of_a_known_file_never_changes(data):
    """Datasets keep the fingerprint they were made with: a change of the scheme would refuse
    every dataset made before it. (Bump FINGERPRINT_SCHEME deliberately, never by accident.)"""
    fingerprint = "d84f760f086215fc2199610060f251cc0fd6e96c36bad4b83f4b08761d135bb1"
    assert build_tokenizer(str(data.BERT_VOCAB)).fingerprint == fingerprint


def test_settings_that_change_ids_change_the_fingerprint(tmp_path, tokenizer_dir, data):
    jieba = build_tokenizer(str(tokenizer_dir), segmenter="jieba")
    rjieba = build_tokenizer(str(tokenizer_dir), segmenter="rjieba")
    assert jieba.fingerprint != rjieba.fingerprint
    assert build_tokenizer(str(tokenizer_dir)).fingerprint == rjieba.fingerprint  # the sidecar's

    from megagpt.data.tokenizer import BertTokenizer

    bert = build_tokenizer(str(data.BERT_VOCAB))
    assert BertTokenizer(str(data.BERT_VOCAB), lowercase=False).fingerprint != bert.fingerprint
    crlf = tmp_path / "vocab.txt"
    crlf.write_bytes(data.BERT_VOCAB.read_bytes().replace(b"\n", b"\r\n"))
    assert build_tokenizer(str(crlf)).fingerprint == bert.fingerprint  # same ids, same value

    cpm = build_tokenizer(str(data.CPM_MODEL))
    shutil.copy(data.CPM_MODEL, tmp_path / "renamed.model")
    assert build_tokenizer(str(tmp_path / "renamed.model")).fingerprint == cpm.fingerprint
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cpm_jieba = build_tokenizer(str(data.CPM_MODEL), segmenter="jieba")
    assert cpm_jieba.fingerprint != cpm.fingerprint  # CPM style: jieba pieces make the ids


def _dataset(prefix: Path, fingerprint: str | None, vocab: int = 1000) -> str:
    record = TokenizerRecord(fingerprint * 64, "/t", "bert, lowercase") if fingerprint else None
    with IndexedDatasetWriter(str(prefix), np.dtype(np.uint16), vocab, record) as w:
        w.add_document(np.array([1, 2, vocab - 1]))
    return str(prefix)


def test_merging_keeps_one_fingerprint_and_refuses_two(tmp_path):
    a, b, c = (_dataset(tmp_path / n, f) for n, f in (("a", "a"), ("b", "a"), ("c", "c")))
    kwargs = merged_vocab([a, b])
    assert kwargs == {
        "vocab_size": 1000,
        "tokenizer": TokenizerRecord("a" * 64, "/t", "bert, lowercase"),
    }
    with IndexedDatasetWriter(str(tmp_path / "ab"), np.dtype(np.uint16), **kwargs) as w:
        w.add_document(np.array([1]))
    assert vocab_record(str(tmp_path / "ab"))["tokenizer"]["fingerprint"] == "a" * 64
    with pytest.raises(DataError) as err:
        merged_vocab([a, c])
    msg = str(err.value)
    assert "different tokenizers of 1000 tokens" in msg
    assert f"{a}: fingerprint aaaaaaaa" in msg and f"{c}: fingerprint cccccccc" in msg
    # An input from before the fingerprints: the size is all that is known of the merge.
    old = _dataset(tmp_path / "old", None)
    assert merged_vocab([a, old]) == {"vocab_size": 1000}
    with pytest.raises(DataError, match="tokenizers of different sizes"):
        merged_vocab([a, _dataset(tmp_path / "big", "a", 2000)])
