"""Raw text files -> tokenized ``PREFIX.bin``/``PREFIX.idx`` (``megagpt preprocess``).

The main process cuts the inputs into chunks of records (a few hundred documents or ~1 MiB) and
hands them to a worker pool; workers parse, validate, segment and tokenize a chunk and return
its tokens as one array. Results are consumed in submission order and written by the main
process, so the output is byte-identical for any ``workers`` value, and the first bad record
reported is the first in file order. At most ``2 * workers`` chunks are in flight, which
bounds memory whatever the input size.

Workers are forked where the platform allows (no re-import cost); each loads its own
tokenizer. They ignore SIGINT: Ctrl-C reaches the main process, which stops the pool and
removes the temporary output (see :class:`IndexedDatasetWriter`).
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

import numpy as np

from megagpt.data.errors import BadRecordError, DataError
from megagpt.data.indexed import (
    IndexedDatasetWriter,
    bin_path,
    dtype_for_vocab,
    idx_path,
)
from megagpt.data.readers import InputSpec, iter_raw_records, parse_record
from megagpt.data.tokenizer import Tokenizer, build_tokenizer

CHUNK_DOCS = 256
CHUNK_BYTES = 1 << 20
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
class _Chunk:
    spec_index: int
    lines: list[int]
    raws: list


@dataclass
class _ChunkResult:
    tokens: np.ndarray
    lengths: np.ndarray
    skipped: Counter
    skipped_examples: list[str]
    error: BadRecordError | None = None


# Per-worker state, set by _init_worker (or directly for the in-process path).
_STATE: dict = {}


def _init_worker(
    tokenizer_path: str,
    segmenter: str | None,
    specs: list[InputSpec],
    append_eod: bool,
    skip_bad_lines: bool,
    dtype: str,
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
        tok=tok, specs=specs, append_eod=append_eod, skip=skip_bad_lines, dtype=np.dtype(dtype)
    )


def _process_chunk(chunk: _Chunk) -> _ChunkResult:
    tok: Tokenizer = _STATE["tok"]
    spec: InputSpec = _STATE["specs"][chunk.spec_index]
    texts: list[str] = []
    skipped: Counter = Counter()
    examples: list[str] = []
    error = None
    for line, raw in zip(chunk.lines, chunk.raws):
        try:
            texts.append(parse_record(spec, line, raw))
        except BadRecordError as exc:
            if not _STATE["skip"]:
                error = exc  # stop here: earlier records of the chunk are still returned
                break
            skipped[exc.reason] += 1
            if len(examples) < _MAX_SKIP_EXAMPLES:
                examples.append(f"{exc.path}:{exc.line}: {exc.detail}")
    ids = tok.encode_batch(texts) if texts else []
    if _STATE["append_eod"]:
        for seq in ids:
            seq.append(tok.eod)
    lengths = np.fromiter(map(len, ids), dtype=np.int32, count=len(ids))
    total = int(lengths.sum(dtype=np.int64))
    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=_STATE["dtype"], count=total)
    return _ChunkResult(tokens, lengths, skipped, examples, error)


def _iter_chunks(specs: list[InputSpec], chunk_docs: int, chunk_bytes: int) -> Iterator[_Chunk]:
    for i, spec in enumerate(specs):
        lines: list[int] = []
        raws: list = []
        size = 0
        for line, raw in iter_raw_records(spec):
            lines.append(line)
            raws.append(raw)
            size += len(raw) if raw is not None else 0
            if len(lines) >= chunk_docs or size >= chunk_bytes:
                yield _Chunk(i, lines, raws)
                lines, raws, size = [], [], 0
        if lines:
            yield _Chunk(i, lines, raws)


def _run_ordered(
    chunks: Iterator[_Chunk], workers: int, initargs: tuple, tok: Tokenizer
) -> Iterator[_ChunkResult]:
    """Results of ``_process_chunk`` in chunk order, with bounded read-ahead.

    A ProcessPoolExecutor (not multiprocessing.Pool) because it raises BrokenProcessPool when a
    worker dies (OOM killer, segfault) where Pool would wait forever.
    """
    if workers <= 1:
        _init_worker(*initargs[:-1], False, tok)
        try:
            for chunk in chunks:
                yield _process_chunk(chunk)
        finally:
            _STATE.clear()  # do not keep the tokenizer (and its piece cache) alive
        return
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    pool = ProcessPoolExecutor(
        workers, mp_context=mp.get_context(method), initializer=_init_worker, initargs=initargs
    )
    finished = False
    try:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.submit(_process_chunk, chunk))
            if len(pending) >= 2 * workers:
                yield _result(pending.popleft())
        while pending:
            yield _result(pending.popleft())
        finished = True
    finally:
        if not finished:
            # Error or Ctrl-C: stop the workers now instead of letting them finish the queue.
            _terminate_workers(pool)
        pool.shutdown(wait=True, cancel_futures=True)


def _result(future) -> _ChunkResult:
    try:
        return future.result()
    except BrokenProcessPool as exc:
        raise DataError(
            "a preprocessing worker died (killed for memory?); nothing was written. "
            "Retry with fewer --workers"
        ) from exc


def _terminate_workers(pool: ProcessPoolExecutor) -> None:
    terminate = getattr(pool, "terminate_workers", None)  # Python >= 3.14
    if terminate is not None:
        terminate()
        return
    # Older Pythons have no public way; the process table is stable across 3.8-3.13.
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        proc.terminate()


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
    log: Callable[[str], None] | None = None,
) -> PreprocessStats:
    """Tokenize every document of ``specs`` into ``output_prefix.bin``/``.idx``.

    Args:
        specs: inputs, in output order (see :func:`readers.make_input_spec`).
        tokenizer_path: anything :func:`build_tokenizer` accepts.
        output_prefix: output path without ``.bin``/``.idx``.
        workers: worker processes (1 = in-process).
        append_eod: end every document with the tokenizer's ``eod`` id.
        skip_bad_lines: skip and count bad records instead of stopping at the first one.
        overwrite: replace an existing dataset at ``output_prefix``.
        progress: show a progress bar (docs/s, tokens/s) on stderr.

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
    dtype = dtype_for_vocab(tok.vocab_size)
    stats = PreprocessStats(dtype=dtype.name)
    initargs = (tokenizer_path, segmenter, specs, append_eod, skip_bad_lines, dtype.str, True)
    bar = _progress_bar(progress)
    start = time.perf_counter()
    results = _run_ordered(_iter_chunks(specs, chunk_docs, chunk_bytes), workers, initargs, tok)
    try:
        with IndexedDatasetWriter(output_prefix, dtype, vocab_size=tok.vocab_size) as writer:
            for result in results:
                writer.add_documents(result.tokens, result.lengths)
                stats.skipped.update(result.skipped)
                for example in result.skipped_examples:
                    if len(stats.skipped_examples) < _MAX_SKIP_EXAMPLES:
                        stats.skipped_examples.append(example)
                if result.error is not None:
                    raise result.error
                if bar is not None:
                    bar.update(len(result.lengths))
                    secs = max(time.perf_counter() - start, 1e-9)
                    bar.set_postfix_str(f"{writer.num_tokens / secs:,.0f} tokens/s", refresh=False)
            stats.documents = writer.num_documents
            stats.tokens = writer.num_tokens
            if stats.documents == 0:
                raise DataError(
                    f"no documents to write ({stats.num_skipped} bad records skipped); "
                    "check --json-key / --input-format"
                )
    finally:
        results.close()  # stops the pool now on an error or Ctrl-C, not at garbage collection
        if bar is not None:
            bar.close()
    stats.seconds = time.perf_counter() - start
    for example in stats.skipped_examples:
        log(f"skipped {example}")
    if stats.num_skipped > len(stats.skipped_examples):
        log(f"... and {stats.num_skipped - len(stats.skipped_examples)} more skipped records")
    return stats


def _progress_bar(enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(
        unit="docs", unit_scale=True, dynamic_ncols=True, desc="preprocess", file=sys.stderr
    )
