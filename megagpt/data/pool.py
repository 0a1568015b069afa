"""Worker processes that return results in input order with bounded read-ahead: the one pool of
`megagpt preprocess` and `megagpt clean`."""

from __future__ import annotations

import multiprocessing as mp
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

from megagpt.data.errors import DataError

T = TypeVar("T")
R = TypeVar("R")


def start_method() -> str:
    """ "fork" where the platform has it (workers inherit what the parent loaded), else
    "spawn"."""
    return "fork" if "fork" in mp.get_all_start_methods() else "spawn"


def ordered_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    workers: int,
    *,
    initializer: Callable[..., None],
    initargs: tuple,
    died: str,
) -> Iterator[R]:
    """``fn(item)`` for every item in ``workers`` processes, yielded in input order, with at
    most ``2 * workers`` items in flight (memory stays bounded however many items come).

    A ProcessPoolExecutor (not multiprocessing.Pool) because it raises BrokenProcessPool when a
    worker dies (the OOM killer, a segfault) where Pool would wait forever; that becomes a
    DataError saying ``died``. On an error or Ctrl-C the workers are stopped at once instead of
    finishing the queue.
    """
    pool = ProcessPoolExecutor(
        workers,
        mp_context=mp.get_context(start_method()),
        initializer=initializer,
        initargs=initargs,
    )
    finished = False
    try:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield _result(pending.popleft(), died)
        while pending:
            yield _result(pending.popleft(), died)
        finished = True
    finally:
        if not finished:
            _terminate_workers(pool)
        pool.shutdown(wait=True, cancel_futures=True)


def _result(future, died: str):
    try:
        return future.result()
    except BrokenProcessPool as exc:
        raise DataError(died) from exc


def _terminate_workers(pool: ProcessPoolExecutor) -> None:
    terminate = getattr(pool, "terminate_workers", None)  # Python >= 3.14
    if terminate is not None:
        terminate()
        return
    # Older Pythons have no public way; the process table is stable across 3.8-3.13.
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        proc.terminate()
