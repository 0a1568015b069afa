"""`megagpt clean` on real Chinese text with planted near-duplicates and junk.

    python bench/clean.py [--data ../shared/data/corpus] [--copies 150] [--junk 20]

Builds, in a temporary directory, the inputs laws.jsonl + wiki_cmrc2018.jsonl (as shipped) and
planted.jsonl: ``--copies`` near copies of random documents of both corpora (a few characters
substituted, a sentence inserted or removed, punctuation changed; see
megagpt/curation/synthetic.py) and ``--junk`` documents of each junk kind. Then prints:

* duplicate removal precision and recall against the planted truth; removals that were not
  planted are checked against the exact character-5-gram Jaccard (real duplicates in the corpus);
* what each filter removed (documents, characters) and the boilerplate lines deleted;
* throughput, documents/s and MB/s of input, 1 vs 2 workers, each in a fresh process, wall and
  CPU time (children), with the load average before and after; byte-identical outputs;
* signature backends: our numpy MinHash vs datasketch on the same documents (CPU seconds,
  recall/precision of the LSH decisions against exact Jaccard);
* resume: a 2-worker run SIGKILLed once 90% of the work units are committed, then rerun: its
  output must equal the uninterrupted run's bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megagpt.curation.dedup import LSHIndex, MinHasher, normalized_key  # noqa: E402
from megagpt.curation.synthetic import EDITS, JUNK, near_copy  # noqa: E402

SETS = ["output.chunk_docs=64", "output.commit_chunks=1"]


def _load(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def _jaccard(a: str, b: str, n: int = 5) -> float:
    a, b = normalized_key(a), normalized_key(b)
    sa = {a[i : i + n] for i in range(len(a) - n + 1)}
    sb = {b[i : i + n] for i in range(len(b) - n + 1)}
    return len(sa & sb) / max(len(sa | sb), 1)


def build(data: Path, tmp: Path, copies: int, junk: int, seed: int = 0):
    rng = random.Random(seed)
    files = [data / "laws.jsonl", data / "wiki_cmrc2018.jsonl"]
    docs = {str(f): _load(f) for f in files}
    pool = [
        (str(f), i) for f in files for i in range(len(docs[str(f)])) if len(docs[str(f)][i]) >= 300
    ]
    planted, truth, kinds = [], {}, {}
    for k, (f, i) in enumerate(rng.sample(pool, copies)):
        edit = EDITS[k % len(EDITS)]
        donor = docs[str(files[1])][rng.randrange(len(docs[str(files[1])]))]
        planted.append(near_copy(docs[f][i], rng, edit, donor))
        truth[len(planted)] = f"{f}:{i + 1}"
        kinds[len(planted)] = edit
    wiki = [t for t in docs[str(files[1])] if len(t) >= 400 and "Church" not in t]
    junk_kinds = {}
    for name, (maker, expected) in JUNK.items():
        for _ in range(junk):
            planted.append(maker(rng.choice(wiki), rng))
            junk_kinds[len(planted)] = (name, expected)
    order = list(range(len(planted)))  # shuffle copies and junk, keep the truth by line
    rng.shuffle(order)
    out = tmp / "planted.jsonl"
    with open(out, "w", encoding="utf-8") as fh:
        for j in order:
            fh.write(json.dumps({"text": planted[j]}, ensure_ascii=False) + "\n")
    where = {j + 1: line + 1 for line, j in enumerate(order)}  # old line -> new line
    truth = {where[k]: v for k, v in truth.items()}
    kinds = {where[k]: v for k, v in kinds.items()}
    junk_kinds = {where[k]: v for k, v in junk_kinds.items()}
    return files + [out], docs, truth, kinds, junk_kinds


def run_clean(inputs, out: Path, workers: int, env=None, extra=()):
    cmd = [
        sys.executable,
        "-m",
        "megagpt.cli",
        "clean",
        "--input",
        *map(str, inputs),
        "--output",
        str(out),
        "--workers",
        str(workers),
        "--no-progress",
        *extra,
    ]
    for s in SETS:
        cmd += ["--set", s]
    return cmd, dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))


def timed(inputs, out, workers):
    cmd, env = run_clean(inputs, out, workers)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def outputs(out: Path) -> dict:
    files = {p.name: p.read_bytes() for p in sorted(out.glob("*.jsonl"))}
    rep = json.loads((out / "report.json").read_text())
    rep.pop("timing")
    files["report"] = json.dumps(rep, sort_keys=True).encode()
    return files


def text_of(docs, planted_docs, doc_id: str) -> str:
    path, line = doc_id.rsplit(":", 1)
    return (docs[path] if path in docs else planted_docs)[int(line) - 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "corpus"))
    ap.add_argument("--copies", type=int, default=150)
    ap.add_argument("--junk", type=int, default=20)
    args = ap.parse_args()
    print(f"load average before: {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        inputs, docs, truth, kinds, junk_kinds = build(Path(args.data), tmp, args.copies, args.junk)
        planted_docs = _load(inputs[2])
        size = sum(p.stat().st_size for p in inputs)
        records = sum(len(v) for v in docs.values()) + len(planted_docs)
        print(
            f"inputs: {records} documents, {size / 1e6:.1f} MB; planted {len(truth)} near "
            f"copies, {len(junk_kinds)} junk"
        )

        # -- throughput, 1 vs 2 workers, interleaved ---------------------------------
        runs = {}
        for workers in (1, 2, 1, 2):
            out = tmp / f"w{workers}-{len(runs)}"
            wall, cpu = timed(inputs, out, workers)
            runs.setdefault(workers, []).append((wall, cpu, out))
        for w, rs in runs.items():
            wall = min(r[0] for r in rs)
            print(
                f"workers {w}: best wall {wall:.1f}s, {records / wall:.0f} docs/s, "
                f"{size / 1e6 / wall:.2f} MB/s; CPU {min(r[1] for r in rs):.1f}s"
            )
        ratio = min(r[0] for r in runs[1]) / min(r[0] for r in runs[2])
        print(f"speed-up 2 vs 1 workers (wall): {ratio:.2f}x")
        ref = runs[1][0][2]
        same = all(outputs(r[2]) == outputs(ref) for rs in runs.values() for r in rs)
        print(f"outputs byte-identical across the 4 runs: {same}")

        # -- what was removed ----------------------------------------------------------
        rep = json.loads((ref / "report.json").read_text())
        print(f"index: {rep['dedup_index']}")
        print("| filter | documents | characters |")
        for reason, f in rep["filters"].items():
            print(f"| {reason} | {f['documents']} | {f['characters']} |")
        bp = rep["lines"]["boilerplate"]
        print(f"boilerplate lines deleted: {bp['lines']} in {bp['documents']} documents")
        planted_path = str(inputs[2])
        removed = {}
        for x in (ref / "duplicates.jsonl").read_text().splitlines():
            x = json.loads(x)
            removed[x["removed"]] = x
        # junk: which filter caught each planted junk document
        caught = {}
        by_reason = {}
        kept_ids = set()
        for part in sorted(ref.glob("part-*.jsonl")):
            for line in part.read_text().splitlines():
                kept_ids.add(json.loads(line)["source"])
        for line, (name, expected) in junk_kinds.items():
            doc_id = f"{planted_path}:{line}"
            caught.setdefault(name, [0, 0, expected])
            caught[name][1] += 1
            if expected == "boilerplate":
                caught[name][0] += doc_id in kept_ids or doc_id in removed
            else:
                caught[name][0] += doc_id not in kept_ids and doc_id not in removed
        for name, (ok, n, _) in caught.items():
            by_reason[name] = f"{ok}/{n}"
        print(f"planted junk removed (boilerplate: kept with lines deleted): {by_reason}")

        # -- dedup precision / recall ------------------------------------------------
        # Every removal is checked against the exact shingle Jaccard of the pair (exact kind:
        # equal normalised text); every planted copy whose exact Jaccard with its original is
        # >= the threshold must be removed (as a duplicate of its original or of a document
        # the original itself duplicates).
        pair_j = []
        for x in removed.values():
            a = text_of(docs, planted_docs, x["removed"])
            b = text_of(docs, planted_docs, x["kept"])
            pair_j.append(1.0 if normalized_key(a) == normalized_key(b) else _jaccard(a, b))
        pair_j.sort()
        n = max(len(pair_j), 1)
        exact = sum(x["kind"] == "exact" for x in removed.values())
        print(
            f"duplicates removed: {len(removed)} ({exact} exact); precision (exact "
            "Jaccard of the removed/kept pair >= 0.8): "
            f"{sum(j >= 0.8 for j in pair_j) / n:.3f}, >= 0.7: "
            f"{sum(j >= 0.7 for j in pair_j) / n:.3f}; lowest pairs: "
            f"{[round(j, 3) for j in pair_j[:5]]}"
        )
        planted_removed = sum(
            1 for k in removed if k.startswith(planted_path) and int(k.rsplit(":", 1)[1]) in truth
        )
        print(
            f"  of which planted copies: {planted_removed}; not planted (duplicates already "
            f"in the corpora): {len(removed) - planted_removed}"
        )
        should, found, per_edit, missed = 0, 0, {}, []
        for line, orig in truth.items():
            j = _jaccard(text_of(docs, planted_docs, orig), planted_docs[line - 1])
            hit = f"{planted_path}:{line}" in removed
            e = per_edit.setdefault(kinds[line], [0, 0, 0, 0])
            e[0] += hit
            e[1] += 1
            if j >= 0.8:
                should += 1
                found += hit
                e[2] += hit
                e[3] += 1
                if not hit:
                    missed.append((kinds[line], round(j, 3)))
        all_found = sum(v[0] for v in per_edit.values())
        print(
            f"recall on planted copies with exact Jaccard >= 0.8: {found}/{should} = "
            f"{found / max(should, 1):.3f}; on all planted copies: {all_found}/{len(truth)} = "
            f"{all_found / len(truth):.3f}; missed (edit, exact Jaccard): {missed}"
        )
        print(
            "recall per edit (all planted / Jaccard >= 0.8): "
            + ", ".join(f"{k} {a}/{b} / {c}/{d}" for k, (a, b, c, d) in per_edit.items())
        )

        # -- backends ---------------------------------------------------------------
        texts = [t for v in docs.values() for t in v] + planted_docs
        sigs = {}
        for backend in ("numpy", "datasketch"):
            h = MinHasher(backend=backend)
            t = time.process_time()
            sigs[backend] = [h.signature(x) for x in texts]
            print(
                f"backend {backend}: {time.process_time() - t:.2f} CPU s for {len(texts)} "
                "signatures"
            )
        n_base = sum(len(v) for v in docs.values())
        for backend, ss in sigs.items():
            index = LSHIndex(128, 0.8)
            for s in ss[:n_base]:
                index.add(s)
            hits = {}
            for k, s in enumerate(ss[n_base:]):
                r = index.query(s)
                if r is not None:
                    hits[k + 1] = r[0]
            good = sum(
                1 for line, i in hits.items() if _jaccard(texts[i], planted_docs[line - 1]) >= 0.8
            )
            should = [
                line
                for line, orig in truth.items()
                if _jaccard(text_of(docs, planted_docs, orig), planted_docs[line - 1]) >= 0.8
            ]
            print(
                f"backend {backend}: planted.jsonl against the corpora: {len(hits)} hits, "
                f"{good} with exact Jaccard >= 0.8 (precision {good / max(len(hits), 1):.3f}); "
                f"planted copies (Jaccard >= 0.8) hit: {sum(x in hits for x in should)}"
                f"/{len(should)}"
            )

        # -- resume after SIGKILL at 90% ---------------------------------------------------
        chunks = sum(-(-len(v) // 64) for v in docs.values()) + -(-len(planted_docs) // 64)
        out = tmp / "killed"
        cmd, env = run_clean(inputs, out, 2)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        journal = out / ".clean-state" / "journal.jsonl"
        at = 0
        while proc.poll() is None:
            if journal.exists():
                lines = journal.read_text().splitlines()
                if lines:
                    try:
                        at = json.loads(lines[-1]).get("next_chunk", 0)
                    except json.JSONDecodeError:
                        pass
                if at >= 0.9 * chunks:
                    proc.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.05)
        proc.wait()
        killed = proc.returncode == -signal.SIGKILL
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        print(
            f"resume: killed={killed} at work unit {at}/{chunks}; rerun rc {res.returncode} "
            f"({res.stderr.strip().splitlines()[0] if res.stderr.strip() else ''}); output "
            f"equal to uninterrupted: {outputs(out) == outputs(ref)}"
        )
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
