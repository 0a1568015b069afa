"""tools/preprocess_data.py: Megatron-LM's flags, megagpt's bytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megagpt.cli import main as megagpt_main
from tests.conftest import BERT_VOCAB, CPM_MODEL, shared_path
from tests.unit.tools.conftest import load_tool, run_script


@pytest.fixture(scope="module")
def tool():
    return load_tool("preprocess_data")


@pytest.fixture
def corpus(tmp_path, wiki_texts):
    """jsonl with two keys: text (wiki articles) and title (their first 12 characters)."""
    path = tmp_path / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for t in wiki_texts[:40]:
            f.write(json.dumps({"title": t[:12], "text": t}, ensure_ascii=False) + "\n")
    return path


def _files(prefix) -> tuple[bytes, bytes]:
    return Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes()


@pytest.mark.parametrize("kind", ["jieba", "bert", "sentencepiece"])
def test_output_is_byte_identical_to_megagpt_preprocess(
    kind, tmp_path, corpus, jieba_tokenizer, tool, capsys
):
    flags, path = {
        "jieba": (
            ["--tokenizer-type", "JiebaBPETokenizer", "--vocab-file"],
            lambda: jieba_tokenizer / "tokenizer.json",
        ),
        "bert": (
            ["--tokenizer-type", "BertWordPieceLowerCase", "--vocab-file"],
            lambda: shared_path(BERT_VOCAB),
        ),
        "sentencepiece": (
            ["--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model"],
            lambda: shared_path(CPM_MODEL),
        ),
    }[kind]
    path = path()
    ours = tmp_path / "ours"
    assert (
        megagpt_main(
            [
                "preprocess",
                "--input",
                str(corpus),
                "--tokenizer",
                str(path),
                "--output-prefix",
                str(ours),
                "--append-eod",
                "--workers",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    theirs = tmp_path / "meg"
    assert (
        tool.main(
            [
                "--input",
                str(corpus),
                "--output-prefix",
                str(theirs),
                *flags,
                str(path),
                "--append-eod",
                "--workers",
                "2",
                "--dataset-impl",
                "mmap",
                "--log-interval",
                "100",
                "--no-progress",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "--dataset-impl mmap ignored" in err and "--log-interval ignored" in err
    assert _files(f"{theirs}_text_document") == _files(ours)


def test_several_json_keys_give_one_dataset_each(tmp_path, corpus, jieba_tokenizer, tool):
    prefix = tmp_path / "out"
    assert (
        tool.main(
            [
                "--input",
                str(corpus),
                "--output-prefix",
                str(prefix),
                "--json-keys",
                "text",
                "title",
                "--vocab-file",
                str(jieba_tokenizer),
                "--append-eod",
                "--workers",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    ours = tmp_path / "title"
    assert (
        megagpt_main(
            [
                "preprocess",
                "--input",
                str(corpus),
                "--json-key",
                "title",
                "--tokenizer",
                str(jieba_tokenizer),
                "--output-prefix",
                str(ours),
                "--append-eod",
                "--no-progress",
            ]
        )
        == 0
    )
    assert _files(f"{prefix}_title_document") == _files(ours)
    assert _files(f"{prefix}_text_document") != _files(ours)
    # megatron-core reads what it wrote: 40 documents per key.
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    assert len(IndexedDataset(f"{prefix}_title_document").document_indices) == 41


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", "V"], "no GPT-2 vocab.json"),
        (["--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", "V"], "not supported"),
        (
            ["--tokenizer-type", "BertWordPieceLowerCase", "--vocab-file", "TOK"],
            "needs a BERT WordPiece vocab.txt",
        ),
        (["--vocab-file", "/nonexistent/vocab.txt"], "/nonexistent/vocab.txt: no such file"),
        (["--vocab-file", "TOK", "--split-sentences"], "--split-sentences is not supported"),
        ([], "no tokenizer"),
    ],
)
def test_unsupported_flags_and_wrong_paths_are_clear_errors(
    args, message, tmp_path, corpus, jieba_tokenizer, tool, capsys
):
    args = [str(jieba_tokenizer / "tokenizer.json") if a == "TOK" else a for a in args]
    code = tool.main(["--input", str(corpus), "--output-prefix", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not list(tmp_path.glob("o_*"))


def test_script_help_and_missing_input(tmp_path, jieba_tokenizer):
    out = run_script("preprocess_data", "--help")
    assert out.returncode == 0 and "--tokenizer-type" in out.stdout
    assert "--dataset-impl" in out.stdout and "--json-keys" in out.stdout
    missing = tmp_path / "nope.jsonl"
    out = run_script(
        "preprocess_data",
        "--input",
        str(missing),
        "--output-prefix",
        str(tmp_path / "o"),
        "--vocab-file",
        str(jieba_tokenizer),
    )
    assert out.returncode == 2, out.stderr
    assert f"{missing}: input file does not exist" in out.stderr and "Traceback" not in out.stderr
