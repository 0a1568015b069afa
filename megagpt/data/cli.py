"""``megagpt tokenizer train`` and ``megagpt preprocess``: argument parsing only.

``megagpt/cli.py`` registers these with :func:`add_tokenizer_parser` and
:func:`add_preprocess_parser`; each sets ``func`` on the parsed namespace to a function that
takes the namespace and returns an exit code. They raise :class:`DataError` for user errors
(the top-level CLI prints the message and exits 2). :func:`main` runs them standalone
(``python -m megagpt.data.cli``) with that same error handling.
"""

from __future__ import annotations

import argparse
import sys

from megagpt.data.errors import DataError
from megagpt.data.readers import FORMATS, make_input_spec
from megagpt.data.segment import SEGMENTERS
from megagpt.data.tokenizer_train import DEFAULT_VOCAB_SIZE


def add_reader_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    """The input files and how to read them (``input_specs`` turns them into reader specs),
    shared by ``tokenizer train``, ``preprocess`` and ``clean``."""
    p.add_argument(
        "--input",
        nargs="+",
        required=required,
        metavar="FILE",
        help="input files, read in order: .jsonl, .txt, .csv, each optionally .gz",
    )
    p.add_argument(
        "--input-format",
        choices=("auto",) + FORMATS,
        default="auto",
        help="input format; auto: from the file suffix",
    )
    p.add_argument("--json-key", default="text", help="jsonl key holding the document text")
    p.add_argument("--csv-column", default="text", help="csv column holding the document text")
    p.add_argument(
        "--blank-line-separated",
        action="store_true",
        help="plain text: documents are separated by blank lines (default: one document per line)",
    )
    p.add_argument(
        "--skip-bad-lines",
        action="store_true",
        help="skip and count malformed / non-UTF-8 / keyless / empty records "
        "instead of stopping at the first one",
    )


def _add_input_args(p: argparse.ArgumentParser) -> None:
    add_reader_args(p)
    p.add_argument(
        "--segmenter",
        choices=SEGMENTERS,
        default=None,
        help="Chinese word segmenter before BPE/SentencePiece (default: the one the "
        "tokenizer was trained with, else rjieba)",
    )


def input_specs(args: argparse.Namespace) -> list:
    """Reader specs of ``--input`` (parsed with ``add_reader_args``), in order."""
    return [
        make_input_spec(
            path, args.input_format, args.json_key, args.csv_column, args.blank_line_separated
        )
        for path in args.input
    ]


def add_tokenizer_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``tokenizer`` (with its ``train`` subcommand) on ``subparsers``."""
    p = subparsers.add_parser("tokenizer", help="tokenizer tools", description="Tokenizer tools.")
    sub = p.add_subparsers(dest="tokenizer_command", metavar="COMMAND", required=True)
    t = sub.add_parser(
        "train",
        help="train a jieba-BPE tokenizer.json",
        description="Train a byte-level BPE over jieba pieces and write DIR/tokenizer.json "
        "(lossless on any text; <|endoftext|>, <sep>, <pad> and \\n tokens).",
    )
    _add_input_args(t)
    t.add_argument(
        "--vocab-size",
        type=int,
        default=DEFAULT_VOCAB_SIZE,
        help="total vocabulary size, special tokens included (default: %(default)s, "
        "the size of the ModelScope 1.3B+ tokenizer)",
    )
    t.add_argument("--output", required=True, metavar="DIR", help="output directory")
    t.set_defaults(func=run_tokenizer_train)
    return p


def run_tokenizer_train(args: argparse.Namespace) -> int:
    from megagpt.data.tokenizer_train import train_tokenizer_from_files

    tok, skipped = train_tokenizer_from_files(
        input_specs(args), args.output, args.vocab_size, args.segmenter, args.skip_bad_lines
    )
    print(
        f"wrote {tok.path}: vocab size {tok.vocab_size}, eod {tok.eod}, sep {tok.sep}, "
        f"pad {tok.pad}, newline {tok.newline}, segmenter {tok.segmenter_name}"
    )
    if tok.vocab_size < args.vocab_size:
        print(
            f"note: the corpus supported only {tok.vocab_size} of the {args.vocab_size} "
            "tokens asked for",
            file=sys.stderr,
        )
    if skipped:
        print(
            "skipped " + ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())), file=sys.stderr
        )
    return 0


def add_preprocess_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``preprocess`` on ``subparsers``."""
    p = subparsers.add_parser(
        "preprocess",
        help="tokenize text into PREFIX.bin/PREFIX.idx",
        description="Tokenize documents into a megatron-core indexed dataset "
        "(PREFIX.bin/PREFIX.idx).",
    )
    _add_input_args(p)
    p.add_argument(
        "--tokenizer",
        required=True,
        metavar="PATH",
        help="tokenizer.json, vocab.txt, SentencePiece .model, or their directory",
    )
    p.add_argument(
        "--output-prefix", required=True, metavar="PREFIX", help="write PREFIX.bin and PREFIX.idx"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes (default 1); with more, each reads its own byte ranges of "
        "uncompressed jsonl/text inputs and writes its own shard, merged in order",
    )
    p.add_argument(
        "--append-eod",
        action="store_true",
        help="end every document with the tokenizer's end-of-document token (a BERT "
        "vocab.txt also starts it with [CLS], always: [CLS] text [SEP])",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_preprocess)
    return p


def run_preprocess(args: argparse.Namespace) -> int:
    from megagpt.data.preprocess import preprocess

    stats = preprocess(
        input_specs(args),
        args.tokenizer,
        args.output_prefix,
        workers=args.workers,
        append_eod=args.append_eod,
        skip_bad_lines=args.skip_bad_lines,
        segmenter=args.segmenter,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print(stats.summary(args.output_prefix))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point with the CLI's error convention (DataError -> exit 2)."""
    parser = argparse.ArgumentParser(prog="megagpt")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_tokenizer_parser(sub)
    add_preprocess_parser(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; no output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
