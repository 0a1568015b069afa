#!/usr/bin/env python
"""Megatron-LM's ``tools/preprocess_data.py`` command line, run by ``megagpt preprocess``.

For users coming from Megatron-LM: the same flags, the same output names
(``PREFIX_<json key>_document.bin/.idx``, one dataset per ``--json-keys`` entry), and a
megatron-core indexed dataset byte-identical to what ``megagpt preprocess`` writes for the same
input and tokenizer (this script only maps flags; the tokenization is megagpt's).

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/wiki \\
        --tokenizer-type JiebaBPETokenizer --vocab-file tokenizer/tokenizer.json \\
        --append-eod --workers 8
    # -> data/wiki_text_document.bin / .idx; train with data.path=data/wiki_text_document

Tokenizers are megagpt's three families, picked by ``--tokenizer-type`` and the file given:

    JiebaBPETokenizer        --vocab-file / --tokenizer-model  tokenizer.json (or its folder)
    BertWordPieceLowerCase   --vocab-file                      vocab.txt
    SentencePieceTokenizer,  --tokenizer-model                 *.model (jieba pre-segmentation,
    GPTSentencePieceTokenizer                                  as for CPM; megagpt's SP family)

Megatron's other tokenizer types (GPT2BPETokenizer, HuggingFaceTokenizer, Llama*, Tiktoken, ...)
are refused with a message: megagpt does not implement them. Megatron flags megagpt has no use
for are accepted and ignored with a note on stderr: ``--dataset-impl`` (megatron-core has only
the mmap format, which is what is written), ``--log-interval`` (a progress bar shows docs/s and
tokens/s), ``--partitions`` / ``--keep-sequential-samples`` (``--workers`` parallelises one
ordered pass), ``--keep-newlines`` / ``--lang`` (sentence splitting only). ``--split-sentences``
is refused (megagpt writes one sequence per document, for GPT pretraining).

Unlike Megatron, an existing output is not replaced unless ``--overwrite`` is given.
"""

from __future__ import annotations

import argparse
import os
import sys

# Runnable from a checkout without installing: the package is the folder above tools/.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megagpt.data.errors import DataError  # noqa: E402

PROG = "preprocess_data.py"

# --tokenizer-type -> (file suffixes it accepts, megagpt family name for messages).
TOKENIZER_TYPES = {
    "JiebaBPETokenizer": ((".json",), "jieba-BPE tokenizer.json"),
    "BertWordPieceLowerCase": ((".txt",), "BERT WordPiece vocab.txt"),
    "SentencePieceTokenizer": ((".model",), "SentencePiece .model"),
    "GPTSentencePieceTokenizer": ((".model",), "SentencePiece .model"),
}
UNSUPPORTED = {
    "BertWordPieceCase": "megagpt's WordPiece tokenizer lower-cases; use BertWordPieceLowerCase",
    "GPT2BPETokenizer": "megagpt has no GPT-2 vocab.json + merges.txt BPE; train a jieba-BPE "
    "tokenizer with `megagpt tokenizer train` and pass JiebaBPETokenizer",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0].splitlines()[0],
        epilog="Output: PREFIX_<key>_document.bin/.idx for each --json-keys entry. "
        "See docs/tools.md.",
    )
    g = p.add_argument_group("input data")
    g.add_argument(
        "--input",
        required=True,
        nargs="+",
        metavar="FILE",
        help="input files (.jsonl, also .txt/.csv; optionally .gz), read in order",
    )
    g.add_argument(
        "--json-keys",
        nargs="+",
        default=["text"],
        metavar="KEY",
        help="jsonl keys (csv columns) to tokenize, one dataset each (default: text)",
    )
    g.add_argument(
        "--split-sentences",
        action="store_true",
        help="not supported (megagpt writes one sequence per document)",
    )
    g.add_argument(
        "--keep-newlines",
        action="store_true",
        help="ignored (only meaningful with --split-sentences)",
    )
    g = p.add_argument_group("tokenizer")
    g.add_argument(
        "--tokenizer-type",
        metavar="TYPE",
        help=f"one of {', '.join(TOKENIZER_TYPES)} (default: from the file given)",
    )
    g.add_argument("--vocab-file", metavar="PATH", help="tokenizer.json or vocab.txt")
    g.add_argument(
        "--tokenizer-model",
        metavar="PATH",
        help="SentencePiece .model, or a tokenizer.json / megagpt tokenizer folder",
    )
    g.add_argument("--merge-file", metavar="PATH", help="not supported (GPT-2 BPE merges)")
    g.add_argument(
        "--append-eod",
        action="store_true",
        help="end every document with the tokenizer's end-of-document token",
    )
    g.add_argument("--lang", help="ignored (sentence-splitting language)")
    g.add_argument(
        "--segmenter",
        choices=("jieba", "rjieba"),
        help="megagpt: Chinese word segmenter (default: the tokenizer's own)",
    )
    g = p.add_argument_group("output data")
    g.add_argument(
        "--output-prefix",
        required=True,
        metavar="PREFIX",
        help="writes PREFIX_<key>_document.bin/.idx",
    )
    g.add_argument(
        "--dataset-impl",
        help="ignored: megatron-core reads only the mmap format, which is what is written",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="megagpt: replace existing output (refused otherwise)",
    )
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    g.add_argument(
        "--partitions", type=int, default=1, help="ignored: --workers parallelises one ordered pass"
    )
    g.add_argument("--log-interval", type=int, help="ignored: a progress bar reports the rate")
    g.add_argument("--keep-sequential-samples", action="store_true", help="ignored")
    g.add_argument(
        "--skip-bad-lines",
        action="store_true",
        help="megagpt: skip and count malformed records instead of stopping",
    )
    g.add_argument("--no-progress", action="store_true", help="megagpt: no progress bar")
    return p


def _notes(args: argparse.Namespace) -> list[str]:
    """One line per accepted-but-ignored Megatron flag."""
    notes = []
    if args.dataset_impl is not None:
        notes.append(
            f"--dataset-impl {args.dataset_impl} ignored: writing the mmap format "
            "(the only one megatron-core reads)"
        )
    if args.log_interval is not None:
        notes.append("--log-interval ignored: the progress bar reports docs/s and tokens/s")
    if args.partitions != 1:
        notes.append(
            f"--partitions {args.partitions} ignored: --workers {args.workers} "
            "processes share one ordered pass"
        )
    if args.keep_sequential_samples:
        notes.append("--keep-sequential-samples ignored: documents keep their input order")
    if args.keep_newlines:
        notes.append("--keep-newlines ignored: documents are never split, newlines are kept")
    if args.lang is not None:
        notes.append("--lang ignored: no sentence splitting")
    return notes


def resolve_tokenizer(args: argparse.Namespace) -> str:
    """The tokenizer path to hand to megagpt, checked against ``--tokenizer-type``."""
    kind = args.tokenizer_type
    if args.merge_file is not None:
        raise DataError(f"--merge-file: {UNSUPPORTED['GPT2BPETokenizer']}")
    if kind in UNSUPPORTED:
        raise DataError(f"--tokenizer-type {kind}: {UNSUPPORTED[kind]}")
    if kind is not None and kind not in TOKENIZER_TYPES:
        raise DataError(
            f"--tokenizer-type {kind} is not supported by megagpt; use one of "
            f"{', '.join(TOKENIZER_TYPES)}"
        )
    given = [
        (flag, v)
        for flag, v in (
            ("--tokenizer-model", args.tokenizer_model),
            ("--vocab-file", args.vocab_file),
        )
        if v
    ]
    if not given:
        raise DataError(
            "no tokenizer: pass --vocab-file (tokenizer.json, vocab.txt) or "
            "--tokenizer-model (SentencePiece .model)"
        )
    if len(given) > 1:
        raise DataError("pass one of --tokenizer-model and --vocab-file, not both")
    flag, path = given[0]
    if not os.path.exists(path):
        raise DataError(f"{flag} {path}: no such file or directory")
    if kind is not None and os.path.isfile(path):
        suffixes, family = TOKENIZER_TYPES[kind]
        if not path.endswith(suffixes):
            raise DataError(f"{flag} {path}: --tokenizer-type {kind} needs a {family}")
    return path


def output_prefix(prefix: str, key: str) -> str:
    """Megatron's name for the dataset of ``key``: PREFIX_KEY_document."""
    return f"{prefix}_{key}_document"


def run(args: argparse.Namespace, log=lambda msg: print(msg, file=sys.stderr)) -> int:
    from megagpt.data.preprocess import preprocess
    from megagpt.data.readers import make_input_spec

    if args.split_sentences:
        raise DataError(
            "--split-sentences is not supported: megagpt writes one sequence per "
            "document (GPT pretraining); drop the flag"
        )
    for note in _notes(args):
        log(f"note: {note}")
    tokenizer = resolve_tokenizer(args)
    for key in args.json_keys:
        # A csv input reads the same name as its column.
        specs = [make_input_spec(path, "auto", key, key) for path in args.input]
        prefix = output_prefix(args.output_prefix, key)
        stats = preprocess(
            specs,
            tokenizer,
            prefix,
            workers=args.workers,
            append_eod=args.append_eod,
            skip_bad_lines=args.skip_bad_lines,
            segmenter=args.segmenter,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            log=log,
        )
        print(stats.summary(prefix))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except DataError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; no output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
