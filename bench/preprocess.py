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

Two more modes (issue 11), each running every preprocess in a fresh child process:

    python bench/preprocess.py --scaling [--workers 2] [--repeat 5]
    python bench/preprocess.py --memory 10,100,1000 [--workers 2]

* ``--scaling``: 1 worker against ``--workers`` workers, interleaved, best wall time of the
  repeats, plus the CPU seconds of the main process and of each worker (the work's own division,
  whatever the load) and the load average before and after;
* ``--memory``: inputs of the given sizes in MB (the corpus repeated into a scratch file, deleted
  afterwards) and the peak RSS of the whole process tree (main + workers, sampled from /proc),
  which stays flat when preprocessing streams.
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


_CHILD = """
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from megagpt.data import make_input_spec, preprocess
wall = time.perf_counter()
stats = preprocess([make_input_spec(sys.argv[2])], sys.argv[3], sys.argv[4],
                   workers=int(sys.argv[5]), append_eod=True, progress=False, overwrite=True)
print(json.dumps({"seconds": stats.seconds, "documents": stats.documents,
                  "tokens": stats.tokens, "main_cpu": stats.main_cpu_seconds,
                  "worker_cpu": sorted(stats.worker_cpu_seconds.values()),
                  "maxrss_main_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def _tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))  # fields[1]: ppid
        rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")  # fields[21]: rss pages
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo += children.get(p, [])
    return total


def run_children(jobs: list[tuple[str, str, str, int]]) -> tuple[float, list[dict]]:
    """Run ``preprocess`` for each (input, tokenizer, prefix, workers) in its own fresh
    interpreter, all at once; the wall seconds until all finished, and per child its stats
    and the peak RSS of its process tree (main + workers)."""
    import subprocess

    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(ROOT), *map(str, job)],
            stdout=subprocess.PIPE,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        for job in jobs
    ]
    peaks = [0] * len(procs)
    while any(p.poll() is None for p in procs):
        for k, p in enumerate(procs):
            if p.poll() is None:
                peaks[k] = max(peaks[k], _tree_rss(p.pid))
        time.sleep(0.05)
    wall = time.perf_counter() - start
    results = []
    for p, peak in zip(procs, peaks):
        out, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"preprocess child failed with exit code {p.returncode}")
        results.append({**json.loads(out), "peak_tree_rss": peak})
    return wall, results


def run_child(input_path: str, tok_dir: str, prefix: str, workers: int) -> dict:
    """One ``preprocess`` in a fresh interpreter (see :func:`run_children`)."""
    return run_children([(input_path, tok_dir, prefix, workers)])[1][0]


def split_in_two(path: str, tmp: str) -> list[str]:
    """The first and second half of ``path`` (cut at a line start) as two files."""
    data = Path(path).read_bytes()
    cut = data.find(b"\n", len(data) // 2) + 1
    halves = [os.path.join(tmp, "half0.jsonl"), os.path.join(tmp, "half1.jsonl")]
    Path(halves[0]).write_bytes(data[:cut])
    Path(halves[1]).write_bytes(data[cut:])
    return halves


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def scaling(args, tok_dir: str, tmp: str) -> None:
    print(f"load average before: {loadavg()}")
    runs: dict[int, list[dict]] = {1: [], args.workers: []}
    # The machine's own ceiling: two independent 1-worker processes on the two halves of the
    # input at once (no coordination at all). A 2-worker run cannot beat it.
    halves = split_in_two(str(args.input), tmp) if args.workers == 2 else None
    control: list[dict] = []
    for _ in range(args.repeat):
        for workers in runs:
            r = run_child(str(args.input), tok_dir, os.path.join(tmp, f"s{workers}"), workers)
            runs[workers].append(r)
            print(
                f"  {workers} worker(s): {r['seconds']:.2f}s wall, main cpu "
                f"{r['main_cpu']:.2f}s, worker cpu {[round(c, 2) for c in r['worker_cpu']]}"
                f", load {loadavg()}",
                flush=True,
            )
        if halves:
            wall, rs = run_children(
                [(h, tok_dir, os.path.join(tmp, f"h{k}"), 1) for k, h in enumerate(halves)]
            )
            control.append({"seconds": wall, "cpu": [r["main_cpu"] for r in rs]})
            print(
                f"  control, 2 independent 1-worker halves: {wall:.2f}s wall, cpu "
                f"{[round(r['main_cpu'], 2) for r in rs]}, load {loadavg()}",
                flush=True,
            )
    print(f"load average after: {loadavg()}")
    one = min(runs[1], key=lambda r: r["seconds"])
    print(
        f"\n{'workers':>7s} {'best s':>7s} {'tokens/s':>11s} {'speed-up':>8s} "
        f"{'main cpu s':>10s} {'worker cpu s':>20s} {'sum cpu s':>9s}"
    )
    for workers, rs in runs.items():
        b = min(rs, key=lambda r: r["seconds"])
        cpu = b["main_cpu"] + sum(b["worker_cpu"])
        print(
            f"{workers:7d} {b['seconds']:7.2f} {b['tokens'] / b['seconds']:11,.0f} "
            f"{one['seconds'] / b['seconds']:7.2f}x {b['main_cpu']:10.2f} "
            f"{str([round(c, 2) for c in b['worker_cpu']]):>20s} {cpu:9.2f}"
        )
    if control:
        c = min(control, key=lambda r: r["seconds"])
        print(
            f"control {c['seconds']:7.2f} {'':>11s} {one['seconds'] / c['seconds']:7.2f}x "
            f"{'':>10s} {str([round(x, 2) for x in c['cpu']]):>20s} {sum(c['cpu']):9.2f}"
        )
    b = min(runs[args.workers], key=lambda r: r["seconds"])
    ideal = (one["main_cpu"]) / max(max(b["worker_cpu"] or [0]), b["main_cpu"], 1e-9)
    print(
        f"CPU-time bound on the speed-up (1-worker CPU / busiest process with "
        f"{args.workers}): {ideal:.2f}x"
    )


def memory(args, tok_dir: str, tmp: str) -> None:
    source = Path(args.input).read_bytes()
    print(f"load average before: {loadavg()}")
    print(
        f"\n{'input MB':>8s} {'documents':>10s} {'seconds':>8s} {'peak RSS tree MB':>16s} "
        f"{'main max RSS MB':>15s}"
    )
    for mb in (int(x) for x in args.memory.split(",")):
        path = os.path.join(tmp, f"big{mb}.jsonl")
        with open(path, "wb") as f:
            left = mb * 10**6
            while left > 0:
                piece = source[:left]
                if left < len(source):  # whole lines only
                    piece = piece[: piece.rfind(b"\n") + 1] or source[: source.find(b"\n") + 1]
                f.write(piece)
                left -= len(piece)
        try:
            r = run_child(path, tok_dir, os.path.join(tmp, "m"), args.workers)
        finally:
            os.unlink(path)
            for ext in (".bin", ".idx", ".vocab.json"):
                if os.path.exists(os.path.join(tmp, "m" + ext)):
                    os.unlink(os.path.join(tmp, "m" + ext))
        print(
            f"{mb:8d} {r['documents']:10,d} {r['seconds']:8.1f} "
            f"{r['peak_tree_rss'] / 2**20:16.0f} {r['maxrss_main_kb'] / 1024:15.0f}",
            flush=True,
        )
    print(f"load average after: {loadavg()}")


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
    parser.add_argument(
        "--scaling",
        action="store_true",
        help="only: 1 worker vs --workers, wall and CPU time per process",
    )
    parser.add_argument(
        "--memory",
        default=None,
        metavar="MB,MB,...",
        help="only: peak RSS of the process tree for inputs of these sizes",
    )
    args = parser.parse_args()

    if args.scaling or args.memory:
        with tempfile.TemporaryDirectory() as tmp:
            tok_dir = args.tokenizer
            if tok_dir is None:
                tok_dir = os.path.join(tmp, "tok")
                wiki = make_input_spec(str(SHARED / "corpus" / "wiki_cmrc2018.jsonl"))
                train_tokenizer(iter_documents([wiki]), tok_dir, vocab_size=25600)
            print(
                f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} "
                f"cores, Python {platform.python_version()}, "
                f"{time.strftime('%Y-%m-%d %H:%M %Z')}; input {args.input}"
            )
            if args.scaling:
                scaling(args, tok_dir, tmp)
            if args.memory:
                memory(args, tok_dir, tmp)
        return 0

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
