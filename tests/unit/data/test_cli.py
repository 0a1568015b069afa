"""CLI wiring: the parsers the top-level `megagpt` CLI registers, and `tokenizer train`."""

from __future__ import annotations

import argparse
import json

from megagpt.data import build_tokenizer
from megagpt.data.cli import add_preprocess_parser, add_tokenizer_parser, main


def _parser():
    parser = argparse.ArgumentParser(prog="megagpt")
    sub = parser.add_subparsers(dest="command", required=True)
    add_tokenizer_parser(sub)
    add_preprocess_parser(sub)
    return parser


def test_parsers_register_subcommands_with_defaults_and_func():
    args = _parser().parse_args(["tokenizer", "train", "--input", "a.jsonl", "--output", "d"])
    assert args.vocab_size == 25600 and args.json_key == "text" and callable(args.func)
    args = _parser().parse_args(
        ["preprocess", "--input", "a.jsonl", "b.txt.gz", "--tokenizer", "t", "--output-prefix", "p"]
    )
    assert args.input == ["a.jsonl", "b.txt.gz"] and args.workers == 1
    assert not (args.append_eod or args.skip_bad_lines or args.blank_line_separated)
    assert args.csv_column == "text" and args.input_format == "auto" and callable(args.func)


def test_tokenizer_train_writes_a_lossless_tokenizer(tmp_path, wiki_texts, data, capsys):
    src = tmp_path / "corpus.jsonl"
    src.write_text(
        "".join(json.dumps({"content": t}, ensure_ascii=False) + "\n" for t in wiki_texts[:80]),
        encoding="utf-8",
    )
    out = tmp_path / "tok"
    code = main(
        [
            "tokenizer",
            "train",
            "--input",
            str(src),
            "--json-key",
            "content",
            "--vocab-size",
            "1000",
            "--output",
            str(out),
        ]
    )
    assert code == 0
    assert "vocab size 1000" in capsys.readouterr().out
    tok = build_tokenizer(str(out))
    assert tok.vocab_size == 1000 and (tok.pad, tok.eod, tok.sep) == (0, 1, 2)
    assert tok.decode(tok.encode(data.MIXED_TEXT)) == data.MIXED_TEXT


def test_tokenizer_train_bad_input_exits_2_naming_file_and_line(tmp_path, capsys):
    src = tmp_path / "corpus.jsonl"
    src.write_text('{"text": "好"}\n{"title": "no text"}\n', encoding="utf-8")
    code = main(["tokenizer", "train", "--input", str(src), "--output", str(tmp_path / "t")])
    err = capsys.readouterr().err
    assert code == 2 and f"{src}:2: no key 'text'" in err and "Traceback" not in err
    assert not (tmp_path / "t" / "tokenizer.json").exists()
