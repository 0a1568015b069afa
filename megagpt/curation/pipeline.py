"""``megagpt clean``: raw documents -> filtered, deduplicated jsonl shards plus a report.

Data flow. The main process cuts the inputs into work units of ``output.chunk_docs`` records
(:func:`megagpt.data.readers.iter_raw_records`); a worker pool parses (``parse_record``), cleans
(:class:`filters.Cleaner`) and signs (exact hash, MinHash) each unit. Results come back in unit
order, and the main process alone deduplicates (:class:`dedup.LSHIndex`) and writes, so the
output bytes are the same for any ``--workers``. At most ``2 * workers`` units are in flight:
memory is bounded by the units plus the index of kept documents.

Output directory::

    part-00000.jsonl ...     kept documents {text_key: text, source_key: "file:line"}
    duplicates.jsonl         {"removed": id, "kept": id, "kind": "exact"|"near", "similarity"}
    report.json, report.md   written at the end
    .clean-state/            manifest.json (config + input fingerprint), journal.jsonl,
                             index.bin (hash, id and signature of each kept document)

Resume. Every ``output.commit_chunks`` units the shard, duplicates and index files are flushed
and fsynced, then one journal line records their sizes, the next unit and the counters. A run
that finds a journal for the same manifest truncates the files to the last journal line,
rebuilds the index from index.bin and goes on from that unit: a run killed at any point
(SIGKILL included) and restarted writes exactly the bytes of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from megagpt.curation.config import CleanConfig, to_dict
from megagpt.curation.dedup import LSHIndex, MinHasher, exact_hash
from megagpt.curation.filters import Cleaner
from megagpt.curation.report import Report, write_report
from megagpt.data.errors import BadRecordError, DataError
from megagpt.data.pool import ordered_map
from megagpt.data.readers import InputSpec, iter_raw_records, parse_record

STATE_DIR = ".clean-state"
_STALL_ENV = "MEGAGPT_CLEAN_STALL_AFTER_CHUNK"  # fault injection for the resume test only


@dataclass
class _Chunk:
    index: int
    spec_index: int
    lines: list[int]
    raws: list


@dataclass
class _Result:
    index: int
    spec_index: int
    lines: list[int]  # of the documents that passed the filters
    texts: list[str]
    hashes: list[int]
    sigs: np.ndarray  # [len(texts), num_perm] uint32 (num_perm 0 without near dedup)
    report: Report
    error: BadRecordError | None = None


_STATE: dict = {}


def _init_worker(cfg: CleanConfig, specs: list[InputSpec], skip_bad: bool, in_pool: bool):
    if in_pool:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C
    d = cfg.dedup
    _STATE.update(
        cleaner=Cleaner(cfg.normalize, cfg.filters),
        specs=specs,
        skip=skip_bad,
        cfg=cfg,
        hasher=MinHasher(d.num_perm, d.shingle_chars, d.seed, d.backend) if d.near else None,
    )


def _process(chunk: _Chunk) -> _Result:
    cleaner: Cleaner = _STATE["cleaner"]
    hasher: MinHasher | None = _STATE["hasher"]
    spec: InputSpec = _STATE["specs"][chunk.spec_index]
    report = Report(_STATE["cfg"].output.examples)
    lines, texts, hashes, sigs = [], [], [], []
    error = None
    for line, raw in zip(chunk.lines, chunk.raws):
        report.records += 1
        report.input_bytes += (
            len(raw.encode("utf-8", "surrogateescape")) if isinstance(raw, str) else len(raw or b"")
        )
        try:
            doc = parse_record(spec, line, raw)
        except BadRecordError as exc:
            if not _STATE["skip"]:
                error = exc  # stop here; the earlier documents of the unit are still returned
                break
            report.add_bad(exc)
            continue
        doc_id = f"{spec.path}:{line}"
        result = cleaner.clean(doc)
        report.add_clean(doc_id, doc, result)
        if result.text is None:
            continue
        lines.append(line)
        texts.append(result.text)
        hashes.append(exact_hash(result.text))
        if hasher is not None:
            sigs.append(hasher.signature(result.text))
    width = hasher.num_perm if hasher is not None else 0
    sig_array = np.stack(sigs) if sigs else np.empty((0, width), dtype=np.uint32)
    return _Result(chunk.index, chunk.spec_index, lines, texts, hashes, sig_array, report, error)


def _iter_chunks(specs: list[InputSpec], chunk_docs: int, start: int) -> Iterator[_Chunk]:
    """Work units in input order, numbered from 0; those below ``start`` are read, not sent."""
    index = 0
    for i, spec in enumerate(specs):
        lines: list[int] = []
        raws: list = []
        for line, raw in iter_raw_records(spec):
            if index < start:  # already done in an earlier run: only count records
                lines.append(line)
                if len(lines) >= chunk_docs:
                    index, lines = index + 1, []
                continue
            lines.append(line)
            raws.append(raw)
            if len(lines) >= chunk_docs:
                yield _Chunk(index, i, lines, raws)
                index, lines, raws = index + 1, [], []
        if lines:
            if index >= start:
                yield _Chunk(index, i, lines, raws)
            index += 1


def _run_ordered(chunks: Iterator[_Chunk], workers: int, initargs: tuple) -> Iterator[_Result]:
    """``_process`` of every unit, in unit order; a pool with bounded read-ahead."""
    if workers <= 1:
        _init_worker(*initargs, False)
        try:
            for chunk in chunks:
                yield _process(chunk)
        finally:
            _STATE.clear()
        return
    yield from ordered_map(
        _process,
        chunks,
        workers,
        initializer=_init_worker,
        initargs=initargs + (True,),
        died="a clean worker died (killed for memory?); progress up to the "
        "last commit is kept: rerun the same command to resume",
    )


def _fingerprint(specs: list[InputSpec]) -> list[dict]:
    out = []
    for s in specs:
        st = os.stat(s.path)
        out.append(
            {
                "path": s.path,
                "format": s.fmt,
                "json_key": s.json_key,
                "csv_column": s.csv_column,
                "paragraphs": s.paragraphs,
                "size": st.st_size,
                "mtime_ns": st.st_mtime_ns,
            }
        )
    return out


def _index_dtype(num_perm: int) -> np.dtype:
    fields = [("hash", "<u8"), ("spec", "<u4"), ("line", "<u8")]
    if num_perm:
        fields.append(("sig", "<u4", (num_perm,)))
    return np.dtype(fields)


class _Writer:
    """The output files and the dedup state; commits and restores them (see module doc)."""

    def __init__(self, out_dir: str, cfg: CleanConfig, specs: list[InputSpec]) -> None:
        self.dir = out_dir
        self.cfg = cfg
        self.specs = specs
        self.state = os.path.join(out_dir, STATE_DIR)
        d = cfg.dedup
        self.num_perm = d.num_perm if d.near else 0
        self.dtype = _index_dtype(self.num_perm)
        self.lsh = LSHIndex(d.num_perm, d.threshold, d.seed) if d.near else None
        self.exact: dict[int, int] = {}  # normalised-text hash -> kept index
        self.kept_spec = np.empty(1024, dtype=np.uint32)
        self.kept_line = np.empty(1024, dtype=np.uint64)
        self.kept = 0
        self.shard = 0
        self.report = Report(cfg.output.examples)
        self.next_chunk = 0
        self._part = self._dup = self._index = None

    # -- files ---------------------------------------------------------------------------
    def part_path(self, i: int) -> str:
        return os.path.join(self.dir, f"part-{i:05d}.jsonl")

    def open(self, offsets: dict | None) -> None:
        """Open the files for appending, truncated to ``offsets`` (a journal line) if given."""
        os.makedirs(self.state, exist_ok=True)
        dup_path = os.path.join(self.dir, "duplicates.jsonl")
        index_path = os.path.join(self.state, "index.bin")
        if offsets is None:
            offsets = {"shard": 0, "shard_bytes": 0, "dup_bytes": 0, "kept": 0}
        self.shard = offsets["shard"]
        for name in os.listdir(self.dir):  # parts written after the commit are not output
            if name.startswith("part-") and name.endswith(".jsonl"):
                if int(name[5:10]) > self.shard:
                    os.remove(os.path.join(self.dir, name))
        self._part = _truncated(self.part_path(self.shard), offsets["shard_bytes"])
        self._dup = _truncated(dup_path, offsets["dup_bytes"])
        self._index = _truncated(index_path, offsets["kept"] * self.dtype.itemsize)
        if offsets["kept"]:
            self._restore(np.fromfile(index_path, dtype=self.dtype, count=offsets["kept"]))

    def _restore(self, records: np.ndarray) -> None:
        for rec in records:
            self._remember(
                int(rec["hash"]),
                int(rec["spec"]),
                int(rec["line"]),
                rec["sig"] if self.num_perm else None,
            )

    def _remember(self, h: int, spec: int, line: int, sig: np.ndarray | None) -> int:
        i = self.kept
        if i == len(self.kept_spec):
            self.kept_spec = np.concatenate([self.kept_spec, np.empty_like(self.kept_spec)])
            self.kept_line = np.concatenate([self.kept_line, np.empty_like(self.kept_line)])
        self.kept_spec[i], self.kept_line[i] = spec, line
        if self.cfg.dedup.exact:
            self.exact.setdefault(h, i)
        if self.lsh is not None:
            self.lsh.add(sig)
        self.kept += 1
        return i

    def state_bytes_per_document(self) -> float:
        """Measured bytes of dedup state per kept document: the LSH index (signature and band
        entries), the exact-hash dict and the id arrays (``sys.getsizeof``)."""
        if self.kept == 0:
            return 0.0
        total = self.lsh.bytes_per_document() * self.kept if self.lsh is not None else 0.0
        total += sys.getsizeof(self.exact) + sum(
            sys.getsizeof(k) + (sys.getsizeof(v) if v > 256 else 0) for k, v in self.exact.items()
        )
        total += (self.kept_spec.itemsize + self.kept_line.itemsize) * self.kept
        return total / self.kept

    def doc_id(self, i: int) -> str:
        return f"{self.specs[int(self.kept_spec[i])].path}:{int(self.kept_line[i])}"

    # -- one unit ----------------------------------------------------------------------
    def add(self, res: _Result) -> None:
        """Deduplicate and write the documents of one unit, in order."""
        o = self.cfg.output
        path = self.specs[res.spec_index].path
        self.report.merge(res.report)
        records = np.zeros(len(res.texts), dtype=self.dtype)
        n_new = 0
        for j, text in enumerate(res.texts):
            doc_id = f"{path}:{res.lines[j]}"
            h = res.hashes[j]
            sig = res.sigs[j] if self.num_perm else None
            dup = None
            if self.cfg.dedup.exact and h in self.exact:
                dup = ("exact", self.exact[h], 1.0)
            elif self.lsh is not None:
                hit = self.lsh.query(sig)
                if hit is not None:
                    dup = ("near", hit[0], hit[1])
            if dup is not None:
                kind, kept, sim = dup
                self.report.add_duplicate(kind, doc_id, self.doc_id(kept), text)
                self._dup.write(
                    json.dumps(
                        {
                            "removed": doc_id,
                            "kept": self.doc_id(kept),
                            "kind": kind,
                            "similarity": round(sim, 4),
                        },
                        ensure_ascii=False,
                    ).encode("utf-8")
                    + b"\n"
                )
                continue
            self._remember(h, res.spec_index, res.lines[j], sig)
            records[n_new]["hash"] = h
            records[n_new]["spec"] = res.spec_index
            records[n_new]["line"] = res.lines[j]
            if self.num_perm:
                records[n_new]["sig"] = sig
            n_new += 1
            obj = {o.text_key: text}
            if o.source_key:
                obj[o.source_key] = doc_id
            line = json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n"
            self._part.write(line)
            self.report.add_output(text)
            if self._part.tell() >= o.shard_bytes:
                self._part.close()
                self.shard += 1
                self._part = open(self.part_path(self.shard), "wb")
        self._index.write(records[:n_new].tobytes())
        self.next_chunk = res.index + 1

    def commit(self, done: bool = False) -> None:
        """Make everything written so far durable, then record the resume point."""
        for f in (self._part, self._dup, self._index):
            f.flush()
            os.fsync(f.fileno())
        entry = {
            "next_chunk": self.next_chunk,
            "shard": self.shard,
            "shard_bytes": self._part.tell(),
            "dup_bytes": self._dup.tell(),
            "kept": self.kept,
            "report": self.report.state(),
            "done": done,
        }
        with open(os.path.join(self.state, "journal.jsonl"), "ab") as j:
            j.write(json.dumps(entry, ensure_ascii=False).encode("utf-8") + b"\n")
            j.flush()
            os.fsync(j.fileno())

    def close(self) -> None:
        for f in (self._part, self._dup, self._index):
            if f is not None:
                f.close()


def _truncated(path: str, size: int):
    """``path`` opened for writing at byte ``size``, everything after it cut (the bytes
    written after the last commit). Not append mode: there ``tell()`` would still report the
    size before the truncation, and shard sizes are measured with ``tell()``."""
    f = open(path, "r+b" if os.path.exists(path) else "wb")
    f.truncate(size)
    f.seek(size)
    return f


def _last_journal_entry(state: str) -> dict | None:
    path = os.path.join(state, "journal.jsonl")
    if not os.path.exists(path):
        return None
    last = None
    with open(path, "rb") as f:
        for raw in f:
            try:
                last = json.loads(raw)
            except json.JSONDecodeError:  # a line cut by the crash: the one before stands
                break
    return last


def _prepare_output(out_dir: str, manifest: dict, overwrite: bool, log) -> dict | None:
    """Check or start the output directory; returns the journal entry to resume from."""
    state = os.path.join(out_dir, STATE_DIR)
    manifest_path = os.path.join(state, "manifest.json")
    if os.path.isdir(out_dir) and overwrite:
        for name in os.listdir(out_dir):
            if (name.startswith("part-") and name.endswith(".jsonl")) or name in (
                "duplicates.jsonl",
                "report.json",
                "report.md",
            ):
                os.remove(os.path.join(out_dir, name))
        if os.path.isdir(state):
            for name in os.listdir(state):
                os.remove(os.path.join(state, name))
    if os.path.exists(manifest_path):
        with open(manifest_path, encoding="utf-8") as f:
            old = json.load(f)
        for key in ("inputs", "config"):
            if old.get(key) != manifest[key]:
                raise DataError(
                    f"{out_dir}: holds an unfinished or finished clean with other {key} "
                    f"({manifest_path}); use another --output, or pass --overwrite to start over"
                )
        entry = _last_journal_entry(state)
        if entry is not None and entry.get("done"):
            raise DataError(
                f"{out_dir}: this clean is already complete (report.json); "
                "pass --overwrite to run it again"
            )
        if entry is not None:
            log(
                f"resuming from work unit {entry['next_chunk']} ({entry['kept']:,} documents "
                "kept so far)"
            )
        return entry
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise DataError(
            f"{out_dir}: output directory is not empty and holds no clean state; "
            "use an empty or new directory, or pass --overwrite"
        )
    os.makedirs(state, exist_ok=True)
    tmp = manifest_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, ensure_ascii=False, indent=1)
    os.replace(tmp, manifest_path)
    return None


def clean(
    specs: list[InputSpec],
    out_dir: str,
    cfg: CleanConfig,
    *,
    workers: int = 1,
    skip_bad_lines: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log=None,
) -> Report:
    """Clean and deduplicate ``specs`` into ``out_dir`` (see the module doc for the layout).

    Args:
        specs: inputs, in output order (:func:`megagpt.data.readers.make_input_spec`).
        out_dir: output directory; an unfinished run there with the same inputs and config is
            resumed.
        cfg: the validated :class:`CleanConfig`.
        workers: worker processes (1 = in-process); the output does not depend on it.
        skip_bad_lines: count and skip bad records instead of stopping at the first one.
        overwrite: discard an earlier run in ``out_dir``.
        progress: tqdm progress bar on stderr.

    Returns:
        The :class:`Report` also written to ``report.json`` / ``report.md``.

    Raises:
        DataError: bad input (file:line), an output directory in another state, a dead worker.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if workers < 1:
        raise DataError(f"--workers must be >= 1, got {workers}")
    if not specs:
        raise DataError("no input files given")
    manifest = {"version": 1, "inputs": _fingerprint(specs), "config": to_dict(cfg)}
    manifest = json.loads(json.dumps(manifest))  # int keys of dicts become strings, as on disk
    entry = _prepare_output(out_dir, manifest, overwrite, log)
    writer = _Writer(out_dir, cfg, specs)
    writer.open(entry)
    if entry is not None:
        writer.report.load_state(entry["report"])
        writer.next_chunk = entry["next_chunk"]
    stall = int(os.environ.get(_STALL_ENV, "-1"))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(
            unit="docs",
            unit_scale=True,
            dynamic_ncols=True,
            desc="clean",
            file=sys.stderr,
            initial=writer.report.records,
        )
    start = time.perf_counter()
    read_before = writer.report.records
    bytes_in = 0
    results = _run_ordered(
        _iter_chunks(specs, cfg.output.chunk_docs, writer.next_chunk),
        workers,
        (cfg, specs, skip_bad_lines),
    )
    try:
        since_commit = 0
        for res in results:
            writer.add(res)
            bytes_in += res.report.input_bytes
            if res.error is not None:
                raise res.error
            since_commit += 1
            if since_commit >= cfg.output.commit_chunks:
                writer.commit()
                since_commit = 0
            if bar is not None:
                bar.update(res.report.records)
                bar.set_postfix_str(f"kept {writer.kept:,}", refresh=False)
            if res.index == stall:  # test hook: uncommitted output on disk, then hang
                for f in (writer._part, writer._dup, writer._index):
                    f.flush()
                time.sleep(3600)
        if writer.kept == 0 and writer.report.records == 0:
            raise DataError("no documents in the inputs; check --json-key / --input-format")
        writer.commit(done=False)
    finally:
        results.close()
        writer.close()
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    report = writer.report
    report.finish(
        inputs=[s.path for s in specs],
        config=to_dict(cfg),
        shards=sorted(n for n in os.listdir(out_dir) if n.startswith("part-")),
        index={
            "backend": cfg.dedup.backend,
            "bands": writer.lsh.bands if writer.lsh else 0,
            "rows": writer.lsh.rows if writer.lsh else 0,
            "lsh_bytes_per_document": round(writer.lsh.bytes_per_document(), 1)
            if writer.lsh
            else 0.0,
            "memory_bytes_per_document": round(writer.state_bytes_per_document(), 1),
            "disk_bytes_per_document": writer.dtype.itemsize,
        },
        timing={
            "seconds": round(seconds, 3),
            "workers": workers,
            "documents_per_s": round((report.records - read_before) / max(seconds, 1e-9), 1),
            "mb_per_s": round(bytes_in / 1e6 / max(seconds, 1e-9), 3),
        },
    )
    write_report(report, out_dir)
    with open(os.path.join(writer.state, "journal.jsonl"), "ab") as j:
        j.write(b'{"done": true}\n')
        j.flush()
        os.fsync(j.fileno())
    return report
