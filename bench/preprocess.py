"""Preprocessing throughput: `megagpt preprocess` against a plain single-process baseline.

    python bench/preprocess.py [--input ../shared/data/corpus/laws.jsonl] [--limit N]

Prints, for the same input in the same run:

* segmenters: jieba vs rjieba characters/s and how often they segment a document identically;
* baseline: one process, ``json.loads`` + ``jieba.lcut`` + HF ``tokenizers`` encode per document,
  then numpy writes of the tokens and the index (what a hand-written script does);
* megagpt preprocess with 1 and N workers, with the default segmenter (rjieba) and with jieba;
* tokens/s of each and the ratio to the baseline.

The tokenizer is a 25,600-token jieba-BPE trained (untimed) on wiki_cmrc2018 unless
``--tokenizer`` is given. Output goes to a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megagpt.data import build_tokenizer, make_input_spec, preprocess  # noqa: E402
from megagpt.data.indexed import dtype_for_vocab  # noqa: E402
from megagpt.data.readers import iter_documents  # noqa: E402
from megagpt.data.tokenizer_train import train_tokenizer  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def load_texts(path: Path, limit: int | None) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            if limit and len(texts) == limit:
                break
    return texts


def bench_segmenters(texts: list[str]) -> dict:
    import jieba
    import rjieba

    jieba.setLogLevel(logging.WARNING)
    jieba.initialize()
    chars = sum(map(len, texts))
    t = time.perf_counter()
    a = [jieba.lcut(x) for x in texts]
    t_jieba = time.perf_counter() - t
    t = time.perf_counter()
    b = [rjieba.cut(x) for x in texts]
    t_rjieba = time.perf_counter() - t
    same_docs = sum(x == y for x, y in zip(a, b))
    pieces_a, pieces_b = sum(map(len, a)), sum(map(len, b))
    return {
        "chars": chars,
        "jieba_chars_per_s": chars / t_jieba,
        "rjieba_chars_per_s": chars / t_rjieba,
        "speedup": t_jieba / t_rjieba,
        "identical_docs": same_docs / len(texts),
        "pieces_jieba": pieces_a,
        "pieces_rjieba": pieces_b,
    }


def baseline(texts_path: Path, limit: int | None, tokenizer_json: str, out_prefix: str) -> dict:
    """Single process, no chunking: the plain script megagpt preprocess is compared with."""
    import jieba
    from tokenizers import Tokenizer

    jieba.setLogLevel(logging.WARNING)
    jieba.initialize()
    tok = Tokenizer.from_file(tokenizer_json)
    eod = tok.token_to_id("<|endoftext|>")
    dtype = dtype_for_vocab(tok.get_vocab_size())
    start = time.perf_counter()
    docs: list[np.ndarray] = []
    with open(texts_path, encoding="utf-8") as f:
        for n, line in enumerate(f):
            if limit and n == limit:
                break
            ids = tok.encode(jieba.lcut(json.loads(line)["text"]), is_pretokenized=True).ids
            ids.append(eod)
            docs.append(np.asarray(ids, dtype=dtype))
    lengths = np.array([len(d) for d in docs], dtype=np.int32)
    np.concatenate(docs).tofile(out_prefix + ".bin")
    np.save(out_prefix + ".lengths.npy", lengths)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "documents": len(docs), "tokens": int(lengths.sum())}


def ours(spec, tokenizer_dir: str, prefix: str, workers: int, segmenter: str | None) -> dict:
    stats = preprocess(
        [spec],
        tokenizer_dir,
        prefix,
        workers=workers,
        append_eod=True,
        segmenter=segmenter,
        progress=False,
        overwrite=True,
    )
    return {"seconds": stats.seconds, "documents": stats.documents, "tokens": stats.tokens}


def best(a: dict | None, b: dict) -> dict:
    return b if a is None or b["seconds"] < a["seconds"] else a


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, default=SHARED / "corpus" / "laws.jsonl")
    parser.add_argument("--limit", type=int, default=None, help="first N documents only")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--tokenizer", default=None, help="tokenizer dir (default: train one)")
    parser.add_argument(
        "--repeat",
        type=int,
        default=2,
        help="runs per configuration; the fastest is reported (noisy machines)",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        input_path = args.input
        if args.limit:  # preprocess reads whole files: cut the subset into its own file
            input_path = Path(tmp) / "subset.jsonl"
            with open(args.input, encoding="utf-8") as src, open(input_path, "w") as dst:
                for n, line in enumerate(src):
                    if n == args.limit:
                        break
                    dst.write(line)
        tok_dir = args.tokenizer
        if tok_dir is None:
            tok_dir = os.path.join(tmp, "tok")
            wiki = make_input_spec(str(SHARED / "corpus" / "wiki_cmrc2018.jsonl"))
            train_tokenizer(iter_documents([wiki]), tok_dir, vocab_size=25600)
        tok = build_tokenizer(tok_dir)
        texts = load_texts(input_path, None)
        size_mb = os.path.getsize(input_path) / 2**20
        print(
            f"input {input_path} ({len(texts)} documents, {sum(map(len, texts)):,} chars, "
            f"{size_mb:.1f} MiB); tokenizer vocab {tok.vocab_size}"
        )
        print(
            f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M %Z')}"
        )

        seg = bench_segmenters(texts)
        print(
            f"\nsegmenters on {seg['chars']:,} chars: jieba {seg['jieba_chars_per_s']:,.0f} "
            f"chars/s, rjieba {seg['rjieba_chars_per_s']:,.0f} chars/s "
            f"({seg['speedup']:.1f}x); identical segmentation for "
            f"{100 * seg['identical_docs']:.1f}% of documents; pieces {seg['pieces_jieba']:,} "
            f"vs {seg['pieces_rjieba']:,}"
        )

        spec = make_input_spec(str(input_path))
        tok_json = os.path.join(tok_dir, "tokenizer.json")
        runs: dict[str, dict] = {}
        configs = [(1, "jieba"), (args.workers, "jieba"), (1, "rjieba"), (args.workers, "rjieba")]
        # Interleave repetitions so that load changes on the machine hit every configuration.
        for _ in range(args.repeat):
            name = "baseline (1 proc, jieba, encode per doc)"
            runs[name] = best(
                runs.get(name), baseline(input_path, None, tok_json, os.path.join(tmp, "base"))
            )
            for workers, segmenter in dict.fromkeys(configs):
                name = f"megagpt preprocess, {workers} worker(s), {segmenter}"
                r = ours(
                    spec, tok_dir, os.path.join(tmp, f"o{workers}{segmenter}"), workers, segmenter
                )
                runs[name] = best(runs.get(name), r)

        # Same segmenter, same tokens: the speed-up is not bought with different output.
        dtype = dtype_for_vocab(tok.vocab_size)
        base_tokens = np.fromfile(os.path.join(tmp, "base.bin"), dtype=dtype)
        ours_tokens = np.fromfile(os.path.join(tmp, "o1jieba.bin"), dtype=dtype)
        identical = np.array_equal(base_tokens, ours_tokens)

        base = next(iter(runs.values()))
        base_rate = base["tokens"] / base["seconds"]
        print(f"\n{'run':50s} {'seconds':>8s} {'docs/s':>9s} {'tokens/s':>11s} {'ratio':>6s}")
        for name, r in runs.items():
            rate = r["tokens"] / r["seconds"]
            print(
                f"{name:50s} {r['seconds']:8.2f} {r['documents'] / r['seconds']:9,.0f} "
                f"{rate:11,.0f} {rate / base_rate:5.2f}x"
            )
        print(f"\ntokens written: {base['tokens']:,}")
        print(f"baseline and megagpt(jieba) tokens identical: {identical}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
