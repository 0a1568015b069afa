"""Chinese word segmenters used before BPE / SentencePiece.

Both supported segmenters implement the same dictionary + HMM algorithm (jieba):
``jieba`` is the pure-Python original used by ModelScope; ``rjieba`` binds the Rust port
jieba-rs. On ``../shared/data/corpus/laws.jsonl`` rjieba is about 18x faster and splits Han text
identically; it differs only on some ASCII runs (``5.1.1`` is one piece in rjieba, three in
jieba). See BENCHMARKS-data.md for the measurement that made ``rjieba`` the default.

A segmenter is a function ``str -> list[str]`` whose pieces concatenate back to the input
exactly (spaces and newlines are pieces of their own); tokenizers rely on that to round-trip.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable

from megagpt.data.errors import DataError

Segmenter = Callable[[str], list[str]]

SEGMENTERS = ("rjieba", "jieba")
DEFAULT_SEGMENTER = "rjieba"


@functools.cache
def get_segmenter(name: str | None = None) -> Segmenter:
    """Return the segmentation function called ``name`` (default :data:`DEFAULT_SEGMENTER`).

    ``rjieba`` falls back to ``jieba`` with a warning when the Rust extension is not installed,
    because the two agree on Han text; token ids of ASCII runs may then differ slightly.
    """
    name = name or DEFAULT_SEGMENTER
    if name not in SEGMENTERS:
        raise DataError(f"unknown segmenter {name!r}; choose one of {', '.join(SEGMENTERS)}")
    if name == "rjieba":
        try:
            import rjieba
        except ImportError:
            warnings.warn(
                "rjieba is not installed; segmenting with the (slower) pure-Python jieba. "
                "`pip install rjieba` for the default segmenter.",
                stacklevel=2,
            )
            return get_segmenter("jieba")
        return rjieba.cut
    import jieba

    # jieba logs its dictionary loading at INFO on every process; keep worker output clean.
    jieba.setLogLevel(logging.WARNING)
    return jieba.lcut
