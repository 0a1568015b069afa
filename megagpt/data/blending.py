"""Blending several GPT datasets by weight.

Dataset ``d`` gets ``counts[d]`` of the ``size`` samples, by largest remainder, so the totals
are within one sample of ``weights * size``. The samples are interleaved by stride scheduling:
the ``k``-th sample of dataset ``d`` sits at key ``(k + 0.5) / counts[d]`` and the blend is the
stable sort of all keys. Every prefix of the blend therefore holds each dataset within about
one sample of its weight -- the proportions hold per global batch, not only over the whole run.
(megatron-core gets the same property from a greedy C++ loop; sorting keeps this in numpy.)
"""

from __future__ import annotations

import numpy as np

from megagpt.data.cache import MappedArraysPickleMixin, cached_arrays
from megagpt.data.errors import DataError


def normalize_weights(weights: list[float], what: str = "blend weights") -> list[float]:
    """Weights scaled to sum to 1. Raises DataError for negative or all-zero weights."""
    if any(not np.isfinite(w) or w < 0 for w in weights) or not sum(weights) > 0:
        raise DataError(f"{what} {weights}: must be non-negative numbers with a positive sum")
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def blend_counts(weights: list[float], size: int) -> np.ndarray:
    """Samples per dataset: ``round(weights * size)`` by largest remainder, summing to ``size``."""
    w = np.asarray(normalize_weights(weights), dtype=np.float64)
    exact = w * size
    counts = np.floor(exact).astype(np.int64)
    short = size - int(counts.sum())
    if short:
        # Largest remainders first; ties go to the earlier dataset (stable sort).
        order = np.argsort(-(exact - counts), kind="stable")
        counts[order[:short]] += 1
    return counts


def build_blend_index(counts: np.ndarray) -> dict[str, np.ndarray]:
    """``dataset_index`` and ``dataset_sample_index`` [sum(counts)] for the interleaved blend."""
    keys = np.concatenate([(np.arange(c) + 0.5) / c for c in counts if c > 0] or [np.zeros(0)])
    which = np.concatenate(
        [np.full(c, d, dtype=np.int16) for d, c in enumerate(counts) if c > 0]
        or [np.zeros(0, np.int16)]
    )
    within = np.concatenate([np.arange(c) for c in counts if c > 0] or [np.zeros(0, np.int64)])
    order = np.lexsort((which, keys))  # by key, then dataset order on ties
    return {
        "dataset_index": which[order],
        "dataset_sample_index": within[order].astype(np.int64),
    }


class BlendedDataset(MappedArraysPickleMixin):
    """``size`` samples drawn from ``datasets`` in the proportions ``weights``.

    ``ds[i]`` is the sample of ``datasets[dataset_index[i]]`` at ``dataset_sample_index[i]``.
    """

    def __init__(
        self,
        datasets: list,
        weights: list[float],
        size: int,
        split_name: str,
        cache_dir: str | None = None,
        description: dict | None = None,
        node_local_cache: bool = False,
    ) -> None:
        if len(datasets) > np.iinfo(np.int16).max:
            raise DataError(f"at most {np.iinfo(np.int16).max} datasets can be blended")
        self.datasets = datasets
        self.weights = normalize_weights(weights)
        self.split_name = split_name
        counts = blend_counts(self.weights, size)
        for d, (ds, c) in enumerate(zip(datasets, counts)):
            if c > 0 and (ds is None or len(ds) < c):
                have = 0 if ds is None else len(ds)
                raise DataError(f"{split_name} blend: dataset {d} has {have} samples, {c} needed")
        arrays = cached_arrays(
            cache_dir,
            "blend-index",
            {**(description or {}), "counts": counts.tolist(), "split": split_name},
            ("dataset_index", "dataset_sample_index"),
            lambda: build_blend_index(counts),
            node_local=node_local_cache,
        )
        self.counts = counts
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        d = int(self.dataset_index[i])
        return self.datasets[d][int(self.dataset_sample_index[i])]
