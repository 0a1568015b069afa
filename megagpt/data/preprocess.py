"""Raw text files -> tokenized ``PREFIX.bin``/``PREFIX.idx`` (``megagpt preprocess``).

With ``workers=1`` everything runs in-process: read, tokenize in batches, append to the output.

With more workers the main process only hands out work and merges. An uncompressed jsonl or
one-document-per-line text input is cut into byte ranges (a few MiB, each starting at a line
start; see :func:`readers.iter_byte_ranges`) and every worker reads its own range from the file,
so no process reads everything. Other inputs (gzip, csv, blank-line-separated text) cannot be
cut without reading them, so the main process reads their records and sends them in chunks.
Either way a worker parses, validates, segments and tokenizes its task in batches and writes
the tokens into its own shard files (:class:`indexed.ShardWriter`); only a small summary goes
back. The main process appends the shards in task order with a kernel-side copy
(:meth:`IndexedDatasetWriter.append_shard`), so the output is byte-identical for any
``workers`` value and the first bad record reported is the first in file order (a range's
line numbers are made absolute by adding the lines of the ranges before it). At most
``2 * workers`` tasks are in flight and a worker holds one batch at a time: memory is bounded
whatever the input size, and so is the scratch space of the shards on disk.

Workers are forked where the platform allows (no re-import cost); each loads its own
tokenizer and runs it single-threaded (the worker is the unit of parallelism). They ignore
SIGINT: Ctrl-C reaches the main process, which stops the pool and removes the temporary output
and the shards (see :class:`IndexedDatasetWriter`).
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from megagpt.data.errors import BadRecordError, DataError
from megagpt.data.pool import ordered_map, start_method
from megagpt.data.indexed import (
    IndexedDatasetWriter,
    Shard,
    ShardWriter,
    TokenizerRecord,
    bin_path,
    dtype_for_vocab,
    idx_path,
)
from megagpt.data.readers import (
    InputSpec,
    can_split,
    iter_byte_ranges,
    iter_range_records,
    iter_raw_records,
    parse_record,
)
from megagpt.data.tokenizer import Tokenizer, build_tokenizer

CHUNK_DOCS = 256
CHUNK_BYTES = 1 << 20
RANGE_BYTES_MIN = 1 << 20
RANGE_BYTES_MAX = 32 << 20
_MAX_SKIP_EXAMPLES = 10


@dataclass
class PreprocessStats:
    """What :func:`preprocess` wrote."""

    documents: int = 0
    tokens: int = 0
    skipped: Counter = field(default_factory=Counter)
    skipped_examples: list[str] = field(default_factory=list)
    seconds: float = 0.0
    dtype: str = ""
    # CPU seconds of the main process, and of each worker by pid (parallel runs): evidence of
    # how the work divides, independent of how busy the machine was.
    main_cpu_seconds: float = 0.0
    worker_cpu_seconds: dict[int, float] = field(default_factory=dict)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self, prefix: str) -> str:
        secs = max(self.seconds, 1e-9)
        skipped = self.num_skipped
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items()))
        lines = [
            f"wrote {bin_path(prefix)} and {idx_path(prefix)} ({self.dtype})",
            f"  documents {self.documents:,}   tokens {self.tokens:,}   "
            f"skipped {skipped:,}" + (f" ({detail})" if skipped else ""),
            (
                f"  time {self.seconds:.1f}s   {self.documents / secs:,.0f} docs/s   "
                f"{self.tokens / secs:,.0f} tokens/s"
            ),
        ]
        return "\n".join(lines)


@dataclass
class _Task:
    """One unit of parallel work: bytes ``[start, end)`` of an input, which the worker reads
    itself (``raws`` is None), or records the main process read (gzip, csv, paragraphs)."""

    index: int
    spec_index: int
    start: int = 0
    end: int = 0
    lines: list[int] | None = None
    raws: list | None = None


@dataclass
class _TaskResult:
    """What a worker did with a task. Line numbers are relative to the range start when
    ``relative`` (the main process adds the lines of the earlier ranges)."""

    spec_index: int
    relative: bool
    lines_read: int  # lines in the byte range, blank ones included (0 for record tasks)
    shard: Shard | None
    skipped: Counter
    skipped_examples: list[tuple[int, str]]
    error: BadRecordError | None
    cpu: tuple[int, float]  # (worker pid, its CPU seconds so far)


# Per-worker state, set by _init_worker (or directly for the in-process path).
_STATE: dict = {}


def _init_worker(
    tokenizer_path: str,
    segmenter: str | None,
    specs: list[InputSpec],
    append_eod: bool,
    skip_bad_lines: bool,
    dtype: str,
    shard_dir: str,
    chunk_docs: int,
    chunk_bytes: int,
    in_pool: bool,
    tok: Tokenizer | None = None,
) -> None:
    if in_pool:
        # Ctrl-C is handled by the main process, which stops the pool.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # Each worker is one core already; the Rust thread pool on top only oversubscribes.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if tok is None:
        tok = build_tokenizer(tokenizer_path, segmenter=segmenter)
    _STATE.update(
        tok=tok,
        specs=specs,
        append_eod=append_eod,
        skip=skip_bad_lines,
        dtype=np.dtype(dtype),
        shard_dir=shard_dir,
        chunk_docs=chunk_docs,
        chunk_bytes=chunk_bytes,
    )


def _encode_records(
    spec: InputSpec, lines: list[int], raws: list
) -> tuple[np.ndarray, np.ndarray, Counter, list[tuple[int, str]], BadRecordError | None]:
    """Parse, validate and tokenize records: (tokens, lengths, skipped, examples, error)."""
    tok: Tokenizer = _STATE["tok"]
    texts: list[str] = []
    skipped: Counter = Counter()
    examples: list[tuple[int, str]] = []
    error = None
    for line, raw in zip(lines, raws):
        try:
            texts.append(parse_record(spec, line, raw))
        except BadRecordError as exc:
            if not _STATE["skip"]:
                error = exc  # stop here: earlier records of the chunk are still returned
                break
            skipped[exc.reason] += 1
            if len(examples) < _MAX_SKIP_EXAMPLES:
                examples.append((exc.line, exc.detail))
    ids = tok.encode_batch(texts) if texts else []
    if tok.bos is not None:  # the BERT family's documents read [CLS] text [SEP]
        ids = [tok.start(seq) for seq in ids]
    if _STATE["append_eod"]:
        for seq in ids:
            seq.append(tok.eod)
    lengths = np.fromiter(map(len, ids), dtype=np.int32, count=len(ids))
    total = int(lengths.sum(dtype=np.int64))
    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=_STATE["dtype"], count=total)
    return tokens, lengths, skipped, examples, error


def _batches(records, chunk_docs: int, chunk_bytes: int) -> Iterator[tuple[list, list]]:
    """Group ``(line, raw)`` records into lists of at most chunk_docs / about chunk_bytes."""
    lines: list[int] = []
    raws: list = []
    size = 0
    for line, raw in records:
        lines.append(line)
        raws.append(raw)
        size += len(raw) if raw is not None else 0
        if len(lines) >= chunk_docs or size >= chunk_bytes:
            yield lines, raws
            lines, raws, size = [], [], 0
    if lines:
        yield lines, raws


def _process_chunk(task: _Task) -> _TaskResult:
    """Worker: read (a byte range) or take (records) the task's input, tokenize it in batches
    and write the tokens to the task's own shard files; only a summary goes back."""
    spec: InputSpec = _STATE["specs"][task.spec_index]
    relative = task.raws is None
    lines_read = 0

    def range_records():
        nonlocal lines_read
        lines_read = yield from iter_range_records(spec, task.start, task.end)

    records = range_records() if relative else zip(task.lines, task.raws)
    skipped: Counter = Counter()
    examples: list[tuple[int, str]] = []
    error = None
    path = os.path.join(_STATE["shard_dir"], f"{task.index:09d}")
    with ShardWriter(path, _STATE["dtype"]) as writer:
        for lines, raws in _batches(records, _STATE["chunk_docs"], _STATE["chunk_bytes"]):
            tokens, lengths, batch_skipped, batch_examples, error = _encode_records(
                spec, lines, raws
            )
            writer.add_documents(tokens, lengths)
            skipped.update(batch_skipped)
            examples += batch_examples[: _MAX_SKIP_EXAMPLES - len(examples)]
            if error is not None:
                break
        shard = writer.close()
    return _TaskResult(
        task.spec_index,
        relative,
        lines_read,
        shard,
        skipped,
        examples,
        error,
        (os.getpid(), time.process_time()),
    )


def _iter_tasks(
    specs: list[InputSpec],
    workers: int,
    chunk_docs: int,
    chunk_bytes: int,
    range_bytes: int | None,
) -> Iterator[_Task]:
    """The parallel work in output order, lazily: byte ranges where workers can read the
    input themselves, chunks of records read here otherwise."""
    n = 0
    for i, spec in enumerate(specs):
        if can_split(spec):
            target = range_bytes or _auto_range_bytes(os.path.getsize(spec.path), workers)
            for start, end in iter_byte_ranges(spec, target):
                yield _Task(n, i, start, end)
                n += 1
        else:
            for lines, raws in _batches(iter_raw_records(spec), chunk_docs, chunk_bytes):
                yield _Task(n, i, lines=lines, raws=raws)
                n += 1


def _auto_range_bytes(size: int, workers: int) -> int:
    # About 16 ranges per worker, so that whichever worker gets more CPU (a shared machine)
    # also takes more ranges and the last ones leave little idle time; but no range so small
    # that the per-range cost shows, nor so large that a shard grows big on disk.
    return min(max(size // (16 * workers), RANGE_BYTES_MIN), RANGE_BYTES_MAX)


def _iter_local(specs: list[InputSpec], chunk_docs: int, chunk_bytes: int):
    """In-process (``workers=1``): (spec_index, tokens, lengths, skipped, examples, error)."""
    for i, spec in enumerate(specs):
        for lines, raws in _batches(iter_raw_records(spec), chunk_docs, chunk_bytes):
            yield (i, *_encode_records(spec, lines, raws))


def _run_ordered(tasks: Iterator[_Task], workers: int, initargs: tuple) -> Iterator[_TaskResult]:
    """Results of ``_process_chunk`` in task order, with at most ``2 * workers`` in flight."""
    if start_method() == "fork":
        # Forked workers inherit the main process's loaded tokenizer (the arguments are not
        # pickled): no worker spends its first fraction of a second loading it again.
        initargs = (*initargs, _STATE.pop("parent_tok", None))
    return ordered_map(
        _process_chunk,
        tasks,
        workers,
        initializer=_init_worker,
        initargs=initargs,
        died="a preprocessing worker died (killed for memory?); nothing was "
        "written. Retry with fewer --workers",
    )


def preprocess(
    specs: list[InputSpec],
    tokenizer_path: str,
    output_prefix: str,
    *,
    workers: int = 1,
    append_eod: bool = False,
    skip_bad_lines: bool = False,
    segmenter: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    chunk_docs: int = CHUNK_DOCS,
    chunk_bytes: int = CHUNK_BYTES,
    range_bytes: int | None = None,
    log: Callable[[str], None] | None = None,
) -> PreprocessStats:
    """Tokenize every document of ``specs`` into ``output_prefix.bin``/``.idx``.

    Args:
        specs: inputs, in output order (see :func:`readers.make_input_spec`).
        tokenizer_path: anything :func:`build_tokenizer` accepts.
        output_prefix: output path without ``.bin``/``.idx``.
        workers: worker processes (1 = in-process).
        append_eod: end every document with the tokenizer's ``eod`` id. A tokenizer with a
            ``bos`` (the BERT family's ``[CLS]``) also starts every document with it.
        skip_bad_lines: skip and count bad records instead of stopping at the first one.
        overwrite: replace an existing dataset at ``output_prefix``.
        progress: show a progress bar (docs/s, tokens/s) on stderr.
        chunk_docs, chunk_bytes: records tokenized per batch (bounds a worker's memory).
        range_bytes: bytes of input per parallel task when workers read the input themselves;
            None: a sixteenth of a worker's share of each file, within 1-32 MiB.

    Returns:
        :class:`PreprocessStats` of what was written.

    Raises:
        DataError: a bad record (file:line) without ``skip_bad_lines``, missing inputs, an
            existing output without ``overwrite``, or no document at all.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if workers < 1:
        raise DataError(f"--workers must be >= 1, got {workers}")
    if not specs:
        raise DataError("no input files given")
    if not overwrite and (
        os.path.exists(bin_path(output_prefix)) or os.path.exists(idx_path(output_prefix))
    ):
        raise DataError(f"{output_prefix}.bin/.idx already exist; pass --overwrite to replace them")
    tok = build_tokenizer(tokenizer_path, segmenter=segmenter)
    if append_eod and tok.eod is None:
        raise DataError(
            f"{tokenizer_path}: tokenizer has no end-of-document token for --append-eod"
        )
    # The tokenizer's fingerprint goes into PREFIX.vocab.json beside its size: training then
    # refuses this data with another tokenizer of the same size (indexed.check_vocab).
    record = TokenizerRecord.of(tok)
    dtype = dtype_for_vocab(tok.vocab_size)
    stats = PreprocessStats(dtype=dtype.name)
    bar = _progress_bar(progress)
    start = time.perf_counter()
    cpu_start = time.process_time()
    shard_dir = None
    results = None
    try:
        with IndexedDatasetWriter(
            output_prefix, dtype, vocab_size=tok.vocab_size, tokenizer=record
        ) as writer:
            if workers == 1:
                _init_worker(
                    tokenizer_path,
                    segmenter,
                    specs,
                    append_eod,
                    skip_bad_lines,
                    dtype.str,
                    "",
                    chunk_docs,
                    chunk_bytes,
                    False,
                    tok,
                )
                results = _iter_local(specs, chunk_docs, chunk_bytes)
                for spec_index, tokens, lengths, skipped, examples, error in results:
                    writer.add_documents(tokens, lengths)
                    _record(stats, specs[spec_index].path, skipped, examples, 0)
                    if error is not None:
                        raise error
                    _tick(bar, len(lengths), writer, start)
            else:
                # Workers write their tokens into shard files here; the main process appends
                # them to the output in order (a kernel copy), so it never handles tokens.
                shard_dir = f"{output_prefix}.tmp.{os.getpid()}.shards"
                os.makedirs(shard_dir, exist_ok=True)
                initargs = (
                    tokenizer_path,
                    segmenter,
                    specs,
                    append_eod,
                    skip_bad_lines,
                    dtype.str,
                    shard_dir,
                    chunk_docs,
                    chunk_bytes,
                    True,
                )
                tasks = _iter_tasks(specs, workers, chunk_docs, chunk_bytes, range_bytes)
                _STATE["parent_tok"] = tok
                results = _run_ordered(tasks, workers, initargs)
                spec_index, line_base = -1, 0
                for result in results:
                    if result.spec_index != spec_index:
                        spec_index, line_base = result.spec_index, 0
                    offset = line_base if result.relative else 0
                    writer.append_shard(result.shard)
                    path = specs[spec_index].path
                    _record(stats, path, result.skipped, result.skipped_examples, offset)
                    if result.error is not None:
                        err = result.error
                        raise BadRecordError(err.path, err.line + offset, err.reason, err.detail)
                    line_base += result.lines_read
                    pid, cpu = result.cpu
                    stats.worker_cpu_seconds[pid] = max(stats.worker_cpu_seconds.get(pid, 0), cpu)
                    _tick(bar, result.shard.documents, writer, start)
            stats.documents = writer.num_documents
            stats.tokens = writer.num_tokens
            if stats.documents == 0:
                raise DataError(
                    f"no documents to write ({stats.num_skipped} bad records skipped); "
                    "check --json-key / --input-format"
                )
    finally:
        if results is not None:
            results.close()  # stops the pool now on an error or Ctrl-C, not at garbage collection
        _STATE.clear()  # do not keep the tokenizer (and its piece cache) alive
        if shard_dir is not None:
            shutil.rmtree(shard_dir, ignore_errors=True)
        if bar is not None:
            bar.close()
    stats.seconds = time.perf_counter() - start
    stats.main_cpu_seconds = time.process_time() - cpu_start
    for example in stats.skipped_examples:
        log(f"skipped {example}")
    if stats.num_skipped > len(stats.skipped_examples):
        log(f"... and {stats.num_skipped - len(stats.skipped_examples)} more skipped records")
    return stats


def _record(
    stats: PreprocessStats,
    path: str,
    skipped: Counter,
    examples: list[tuple[int, str]],
    line_offset: int,
) -> None:
    stats.skipped.update(skipped)
    for line, detail in examples:
        if len(stats.skipped_examples) < _MAX_SKIP_EXAMPLES:
            stats.skipped_examples.append(f"{path}:{line + line_offset}: {detail}")


def _tick(bar, documents: int, writer: IndexedDatasetWriter, start: float) -> None:
    if bar is not None:
        bar.update(documents)
        secs = max(time.perf_counter() - start, 1e-9)
        bar.set_postfix_str(f"{writer.num_tokens / secs:,.0f} tokens/s", refresh=False)


def _progress_bar(enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(
        unit="docs", unit_scale=True, dynamic_ncols=True, desc="preprocess", file=sys.stderr
    )
