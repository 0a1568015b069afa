"""Blending several GPT datasets by weight.

Dataset ``d`` gets ``counts[d]`` of the ``size`` samples, by largest remainder, so the totals
are within one sample of ``weights * size``. The samples are interleaved by stride scheduling:
the ``k``-th sample of dataset ``d`` sits at key ``(k + 0.5) / counts[d]`` and the blend is the
stable sort of all keys. Every prefix of the blend therefore holds each dataset within about
one sample of its weight -- the proportions hold per global batch, not only over the whole run.
(megatron-core gets the same property from a greedy C++ loop; sorting keeps this in numpy.)

A :class:`WeightsSchedule` (``data.weights_schedule``) makes the weights change over training:
piecewise linear in consumed tokens. The same stride keys generalise: with ``C_d(n)`` the
number of samples of dataset ``d`` the schedule asks for among the first ``n`` (the sum of its
share at every sample before ``n``), the ``k``-th sample of ``d`` sits where ``C_d`` crosses
``k + 0.5``. Every prefix of the blend then again holds each dataset within about one sample
of ``C_d(n)``, and the blend is still one global sample order that the data-parallel sampler
cuts up, so the order does not depend on the data-parallel size and resuming at
``consumed_samples`` continues it exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

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


@dataclass(frozen=True)
class WeightsSchedule:
    """Blend weights that change with the tokens consumed by training.

    ``points`` are ``(tokens, proportions)`` with strictly increasing ``tokens`` and
    proportions normalised to sum to 1. Sample ``i`` of the blend is trained on after
    ``i * seq_length`` tokens (each sample holds ``seq_length`` target tokens); its target mixture
    is the proportions at that token count, interpolated linearly between the two points around
    it and held constant before the first and after the last point.
    """

    points: tuple[tuple[int, tuple[float, ...]], ...]
    seq_length: int

    @property
    def num_datasets(self) -> int:
        return len(self.points[0][1])

    @property
    def final_weights(self) -> list[float]:
        return list(self.points[-1][1])

    def mixture(self, samples: np.ndarray) -> np.ndarray:
        """Target proportions [len(samples), num_datasets] for the given sample indices."""
        tokens = np.asarray(samples, dtype=np.float64) * self.seq_length
        xs = np.array([t for t, _ in self.points], dtype=np.float64)
        ys = np.array([w for _, w in self.points], dtype=np.float64)  # [points, datasets]
        return np.stack([np.interp(tokens, xs, ys[:, d]) for d in range(ys.shape[1])], axis=1)

    def cumulative(self, d: int, size: int) -> np.ndarray:
        """``C_d(n)`` for n = 0..size: samples of dataset ``d`` wanted among the first n."""
        share = self.mixture(np.arange(size))[:, d] if size else np.zeros(0)
        out = np.zeros(size + 1, dtype=np.float64)
        np.cumsum(share, out=out[1:])
        return out

    def counts(self, size: int) -> np.ndarray:
        """Samples per dataset among the first ``size``, by largest remainder (sum = size)."""
        exact = np.array([self.cumulative(d, size)[-1] for d in range(self.num_datasets)])
        total = exact.sum()
        weights = (exact / total).tolist() if total > 0 else self.final_weights
        return blend_counts(weights, size)

    def describe(self) -> dict:
        """JSON-able identity for caches."""
        return {"points": [[t, list(w)] for t, w in self.points], "seq_length": self.seq_length}


def parse_weights_schedule(
    schedule, num_datasets: int, seq_length: int, key: str = "data.weights_schedule"
) -> WeightsSchedule:
    """Validate ``[{"tokens": N, "weights": [...]}, ...]`` into a :class:`WeightsSchedule`.

    Raises:
        DataError: naming the entry (``data.weights_schedule[2].weights``) when the schedule is
            not a non-empty list of such points, ``tokens`` are not non-negative integers in
            strictly increasing order, or a ``weights`` list is not ``num_datasets``
            non-negative numbers with a positive sum.
    """
    example = "[{tokens: 0, weights: [0.8, 0.2]}, {tokens: 1e9, weights: [0.5, 0.5]}]"
    if not isinstance(schedule, (list, tuple)) or not schedule:
        raise DataError(f"{key} must be a non-empty list of points like {example}")
    points = []
    for i, point in enumerate(schedule):
        where = f"{key}[{i}]"
        if not isinstance(point, dict) or set(point) != {"tokens", "weights"}:
            got = sorted(point) if isinstance(point, dict) else type(point).__name__
            raise DataError(
                f"{where} must be a mapping with exactly the keys 'tokens' and "
                f"'weights' (got {got}), like {example}"
            )
        tokens = point["tokens"]
        if isinstance(tokens, str):  # PyYAML reads 1e9 as text
            try:
                tokens = float(tokens)
            except ValueError:
                pass
        if isinstance(tokens, float) and tokens.is_integer():
            tokens = int(tokens)
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise DataError(
                f"{where}.tokens must be a non-negative integer (consumed training "
                f"tokens), got {point['tokens']!r}"
            )
        if points and tokens <= points[-1][0]:
            raise DataError(
                f"{where}.tokens ({tokens}) must be larger than "
                f"{key}[{i - 1}].tokens ({points[-1][0]}): points must increase"
            )
        weights = point["weights"]
        if not isinstance(weights, (list, tuple)) or len(weights) != num_datasets:
            n = len(weights) if isinstance(weights, (list, tuple)) else "no"
            raise DataError(
                f"{where}.weights has {n} entries for {num_datasets} datasets "
                "(data.paths); give one weight per dataset"
            )
        if (
            any(isinstance(w, bool) or not isinstance(w, (int, float)) for w in weights)
            or any(not np.isfinite(w) or w < 0 for w in weights)
            or not sum(weights) > 0
        ):
            raise DataError(
                f"{where}.weights {list(weights)}: must be non-negative numbers with a positive sum"
            )
        total = float(sum(weights))
        points.append((tokens, tuple(float(w) / total for w in weights)))
    return WeightsSchedule(tuple(points), int(seq_length))


def build_schedule_index(schedule: WeightsSchedule, size: int) -> dict[str, np.ndarray]:
    """``dataset_index`` and ``dataset_sample_index`` [size] following ``schedule``.

    The ``k``-th sample of dataset ``d`` gets the key where ``C_d`` reaches ``k + 0.5``
    (interpolated within the sample where it crosses); the blend is the sort of all keys, ties
    to the earlier dataset. A sample that the rounding of the totals adds beyond ``C_d(size)``
    goes to the end.
    """
    counts = schedule.counts(size)
    keys, which, within = [], [], []
    for d, count in enumerate(counts):
        if count == 0:
            continue
        cum = schedule.cumulative(d, size)  # [size + 1], non-decreasing
        target = np.arange(count) + 0.5
        j = np.searchsorted(cum, target, side="left")  # first n with C_d(n) >= target
        key = np.full(count, np.inf)
        inside = j <= size
        jj = j[inside]
        # The crossing lies in sample jj - 1, where C_d rises from cum[jj-1] to cum[jj] > it.
        key[inside] = (jj - 1) + (target[inside] - cum[jj - 1]) / (cum[jj] - cum[jj - 1])
        keys.append(key)
        which.append(np.full(count, d, dtype=np.int16))
        within.append(np.arange(count, dtype=np.int64))
    if not keys:
        return {
            "dataset_index": np.zeros(0, np.int16),
            "dataset_sample_index": np.zeros(0, np.int64),
        }
    keys_a, which_a, within_a = (np.concatenate(x) for x in (keys, which, within))
    order = np.lexsort((within_a, which_a, keys_a))  # by key, then dataset, then k
    return {"dataset_index": which_a[order], "dataset_sample_index": within_a[order]}


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
        schedule: WeightsSchedule | None = None,
    ) -> None:
        """``schedule``: weights that change over the samples (then ``weights`` is unused)."""
        if len(datasets) > np.iinfo(np.int16).max:
            raise DataError(f"at most {np.iinfo(np.int16).max} datasets can be blended")
        self.datasets = datasets
        self.schedule = schedule
        self.weights = normalize_weights(weights if schedule is None else schedule.final_weights)
        self.split_name = split_name
        counts = blend_counts(self.weights, size) if schedule is None else schedule.counts(size)
        for d, (ds, c) in enumerate(zip(datasets, counts)):
            if c > 0 and (ds is None or len(ds) < c):
                have = 0 if ds is None else len(ds)
                raise DataError(f"{split_name} blend: dataset {d} has {have} samples, {c} needed")
        identity = {**(description or {}), "counts": counts.tolist(), "split": split_name}
        if schedule is not None:
            identity["schedule"] = json.loads(json.dumps(schedule.describe()))
        arrays = cached_arrays(
            cache_dir,
            "blend-index",
            identity,
            ("dataset_index", "dataset_sample_index"),
            (lambda: build_blend_index(counts))
            if schedule is None
            else (lambda: build_schedule_index(schedule, size)),
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
