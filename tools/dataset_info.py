#!/usr/bin/env python
"""What an indexed dataset (``PREFIX.bin``/``PREFIX.idx``) holds: documents, tokens, dtype,
vocabulary, length statistics, and decoded samples.

    python tools/dataset_info.py data/wiki_text_document
    python tools/dataset_info.py data/wiki_text_document --tokenizer tok/ --sample 3
    python tools/dataset_info.py data/shards/ --json          # every dataset in a folder

PREFIX may be given with or without ``.bin``/``.idx``. The files are memory-mapped and read
through ``megagpt.data.indexed`` (the module that owns the format); nothing is loaded whole.
The vocabulary comes from ``PREFIX.vocab.json`` (written by ``megagpt preprocess``) when the
dataset has one, else from a scan of the tokens (``--no-scan`` skips it on huge datasets).
``--tokenizer`` (a tokenizer folder or file, as ``data.tokenizer``) decodes samples and checks
that every token id fits its vocabulary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megagpt.errors import MegagptError  # noqa: E402

PROG = "dataset_info.py"


def _prefixes(path: str) -> list[str]:
    """Dataset prefixes named by ``path``: a prefix, a .bin/.idx file, or a folder of them."""
    from megagpt.data.errors import DataError
    from megagpt.data.indexed import dataset_exists

    if os.path.isdir(path):
        found = sorted(
            str(p.with_suffix(""))
            for p in Path(path).glob("*.idx")
            if dataset_exists(str(p.with_suffix("")))
        )
        if not found:
            raise DataError(f"{path}: a folder without any PREFIX.bin/PREFIX.idx dataset")
        return found
    prefix = path[:-4] if path.endswith((".bin", ".idx")) else path
    if not os.path.exists(prefix + ".idx") and not os.path.exists(prefix + ".bin"):
        raise FileNotFoundError(f"{path}: no dataset here ({prefix}.bin/.idx not found)")
    return [prefix]


def describe(
    prefix: str, *, tokenizer=None, samples: int = 1, sample_tokens: int = 64, scan: bool = True
) -> dict:
    """Info on the dataset at ``prefix``; ``tokenizer`` (a megagpt Tokenizer) decodes samples.

    Raises:
        DataError: the dataset is missing, damaged, or has ids outside ``tokenizer``'s vocab.
    """
    import numpy as np

    from megagpt.data.errors import DataError
    from megagpt.data.indexed import (
        IndexedDataset,
        TokenizerRecord,
        check_vocab,
        max_token_id,
        tokenizer_record,
        vocab_record,
    )

    ds = IndexedDataset(prefix)
    lengths = np.asarray(ds.sequence_lengths, dtype=np.int64)
    docs = np.diff(np.asarray(ds.document_indices, dtype=np.int64))
    info: dict = {
        "prefix": prefix,
        "documents": ds.num_documents,
        "sequences": len(ds),
        "tokens": ds.num_tokens,
        "dtype": str(ds.dtype),
        "bytes": os.path.getsize(prefix + ".bin") + os.path.getsize(prefix + ".idx"),
        "sequences_per_document": {"max": int(docs.max())} if len(docs) else {},
    }
    if len(lengths):
        q = np.percentile(lengths, [50, 90, 99])
        info["sequence_length"] = {
            "min": int(lengths.min()),
            "mean": float(lengths.mean()),
            "p50": float(q[0]),
            "p90": float(q[1]),
            "p99": float(q[2]),
            "max": int(lengths.max()),
            "empty": int((lengths == 0).sum()),
        }
    record = vocab_record(prefix)
    if record is not None:
        info["vocab"] = dict(record, source=os.path.basename(prefix) + ".vocab.json")
    elif scan:
        info["vocab"] = {"max_token_id": max_token_id(prefix), "source": "scan"}
    if tokenizer is not None:
        top = info.get("vocab", {}).get("max_token_id")
        if top is None:
            top = max_token_id(prefix)
        if top >= tokenizer.vocab_size:
            raise DataError(
                f"{prefix}: token id {top} is outside the tokenizer's vocabulary of "
                f"{tokenizer.vocab_size}: the dataset was made with another "
                "tokenizer"
            )
        if record is not None:
            # The recorded tokenizer (size, and fingerprint where recorded) must be this one:
            # another of the same size fits every id and decodes other tokens.
            check_vocab(
                prefix,
                tokenizer.vocab_size,
                "dataset",
                TokenizerRecord.of(tokenizer),
                "--tokenizer",
            )
        info["tokenizer"] = {
            "family": tokenizer.family,
            "vocab_size": tokenizer.vocab_size,
            "same_as_recorded": tokenizer_record(record) is not None,
        }
        picks = (
            np.linspace(0, len(ds) - 1, num=min(samples, len(ds)), dtype=np.int64)
            if len(ds) and samples > 0
            else []
        )
        info["samples"] = [
            {
                "sequence": int(i),
                "tokens": int(lengths[i]),
                "text": tokenizer.decode(
                    ds.get(int(i), 0, min(sample_tokens, int(lengths[i]))).tolist()
                ),
            }
            for i in picks
        ]
    return info


def _count(n: int) -> str:
    return f"{n:,} ({n / 1e9:.2f}B)" if n >= 1e8 else f"{n:,} ({n / 1e6:.2f}M)"


def render(info: dict) -> str:
    """A readable summary of ``describe``'s dict."""
    lines = [
        f"dataset    {info['prefix']}",
        f"documents  {info['documents']:,}  (sequences {info['sequences']:,})",
        f"tokens     {_count(info['tokens'])}  dtype {info['dtype']}, "
        f"{info['bytes'] / 2**20:.1f} MiB on disk",
    ]
    if "sequence_length" in info:
        s = info["sequence_length"]
        lines.append(
            f"lengths    min {s['min']}, mean {s['mean']:.1f}, p50 {s['p50']:.0f}, "
            f"p90 {s['p90']:.0f}, p99 {s['p99']:.0f}, max {s['max']}"
            + (f"; {s['empty']} empty" if s["empty"] else "")
        )
    if "vocab" in info:
        v = info["vocab"]
        size = f"vocab_size {v['vocab_size']:,}, " if "vocab_size" in v else ""
        lines.append(f"vocab      {size}largest id {v['max_token_id']:,} (from {v['source']})")
    if "tokenizer" in info:
        t = info["tokenizer"]
        same = ", the tokenizer recorded with the dataset" if t.get("same_as_recorded") else ""
        lines.append(f"tokenizer  {t['family']}, {t['vocab_size']:,} tokens: every id fits{same}")
        for s in info["samples"]:
            lines.append(f"sample     #{s['sequence']} ({s['tokens']} tokens): {s['text']!r}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="+", help="dataset prefix, .bin/.idx file, or folder")
    parser.add_argument("--tokenizer", help="tokenizer folder/file: decode samples, check ids")
    parser.add_argument(
        "--sample",
        type=int,
        default=1,
        metavar="N",
        help="decoded samples, spread over the dataset (default 1)",
    )
    parser.add_argument(
        "--sample-tokens",
        type=int,
        default=64,
        metavar="T",
        help="tokens decoded per sample (default 64)",
    )
    parser.add_argument(
        "--no-scan",
        action="store_true",
        help="without PREFIX.vocab.json, do not scan the tokens for the largest id",
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    try:
        if args.sample < 0 or args.sample_tokens < 1:
            raise MegagptError("--sample must be >= 0 and --sample-tokens >= 1")
        tokenizer = None
        if args.tokenizer:
            from megagpt.data.tokenizer import build_tokenizer

            tokenizer = build_tokenizer(args.tokenizer)
        infos = [
            describe(
                p,
                tokenizer=tokenizer,
                samples=args.sample,
                sample_tokens=args.sample_tokens,
                scan=not args.no_scan,
            )
            for path in args.path
            for p in _prefixes(path)
        ]
    except (MegagptError, FileNotFoundError) as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(infos if len(infos) > 1 else infos[0], ensure_ascii=False, indent=2))
    else:
        print("\n\n".join(render(i) for i in infos))
    return 0


if __name__ == "__main__":
    sys.exit(main())
