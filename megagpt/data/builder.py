"""``build_gpt_datasets``: the train/valid/test datasets the trainer iterates."""

from __future__ import annotations

import logging

import numpy as np

from megagpt.data.blending import (
    BlendedDataset,
    blend_counts,
    normalize_weights,
    parse_weights_schedule,
)
from megagpt.data.errors import DataError
from megagpt.data.gpt_dataset import (
    SPLIT_NAMES,
    GPTDataset,
    check_split_size,
    dataset_fingerprint,
    parse_split,
    split_document_ranges,
)
from megagpt.data.indexed import IndexedDataset

logger = logging.getLogger(__name__)


def build_gpt_datasets(
    prefixes: list[str],
    weights: list[float] | None,
    split: str,
    seq_length: int,
    num_samples: tuple[int, int, int],
    seed: int,
    cache_dir: str | None,
    *,
    node_local_cache: bool = False,
    weights_schedule: list | None = None,
) -> tuple:
    """Build the (train, valid, test) GPT datasets over one or more preprocessed datasets.

    Each prefix is split by document ranges (``split``, e.g. ``"969,30,1"``); split ``s`` of
    every prefix is packed into samples (see :mod:`megagpt.data.gpt_dataset`) and, with several
    prefixes, blended by ``weights``.

    Args:
        prefixes: ``PREFIX`` of each ``PREFIX.bin``/``PREFIX.idx``.
        weights: blend weight per prefix; None weighs each by its tokens in the split (plain
            concatenation). Ignored for a single prefix.
        split: train/valid/test proportions of the documents.
        seq_length: model sequence length; samples hold ``seq_length + 1`` tokens.
        num_samples: samples wanted for (train, valid, test).
        seed: shuffling seed (documents per epoch and samples).
        cache_dir: where index files are cached and shared between ranks and runs; None
            builds them in memory on every rank (fine for small data and tests).
        node_local_cache: ``cache_dir`` is per node: local rank 0 of each node builds.
        weights_schedule: ``data.weights_schedule``, blend weights that change with consumed
            tokens (``[{"tokens": N, "weights": [...]}, ...]``, see
            :class:`~megagpt.data.blending.WeightsSchedule`); applies to the train split, while
            valid and test are blended by its last point's weights. Exclusive with ``weights``.

    Returns:
        ``(train, valid, test)``; an entry is None when its split weight or sample count is 0.
        Otherwise ``len(ds) >= num_samples[i]`` and ``ds[i]["tokens"]`` is an int64 array of
        ``seq_length + 1`` tokens.

    Raises:
        DataError: bad arguments, unreadable datasets, or a split too small for its samples
            (checked on every rank before any index is built, so no rank waits forever).
    """
    if not prefixes:
        raise DataError("no data prefixes given")
    if seq_length < 1:
        raise DataError(f"seq_length must be >= 1, got {seq_length}")
    if len(num_samples) != 3 or any(int(n) < 0 for n in num_samples):
        raise DataError(f"num_samples must be three non-negative counts, got {num_samples}")
    if weights is not None:
        if len(weights) != len(prefixes):
            raise DataError(
                f"{len(weights)} blend weights for {len(prefixes)} data prefixes; give one each"
            )
        weights = normalize_weights(list(weights))
    schedule = None
    if weights_schedule:
        if weights is not None:
            raise DataError("set data.weights or data.weights_schedule, not both")
        schedule = parse_weights_schedule(weights_schedule, len(prefixes), seq_length)
        weights = schedule.final_weights  # valid and test: the mixture the schedule ends at
    split_weights = parse_split(split)
    datasets = [IndexedDataset(p) for p in prefixes]
    ranges = [split_document_ranges(len(ds), split_weights) for ds in datasets]

    # Plan and validate everything first, on every rank: errors must not depend on who builds.
    plans: list[list[tuple[int, int]] | None] = []  # per split: [(dataset, samples)]
    split_weights_per_split: list[list[float] | None] = []
    for s, name in enumerate(SPLIT_NAMES):
        wanted = int(num_samples[s])
        if split_weights[s] == 0 or wanted == 0:
            if split_weights[s] == 0 and wanted > 0:
                logger.warning(
                    "%s split has weight 0 in %r; %d samples requested, none built",
                    name,
                    split,
                    wanted,
                )
            plans.append(None)
            split_weights_per_split.append(None)
            continue
        if len(datasets) == 1:
            blend_w = [1.0]
        elif weights is None:
            tokens = [
                int(ds.sequence_lengths[r[s][0] : r[s][1]].sum(dtype=np.int64))
                for ds, r in zip(datasets, ranges)
            ]
            if sum(tokens) == 0:
                blend_w = [1.0] * len(datasets)  # every split empty: the check below reports it
            else:
                blend_w = normalize_weights(tokens, f"{name} split token counts")
        else:
            blend_w = weights
        if len(datasets) == 1:
            counts = np.array([wanted])
        elif schedule is not None and s == 0:
            counts = schedule.counts(wanted)
        else:
            counts = blend_counts(blend_w, wanted)
        plan = []
        for d, (ds, r) in enumerate(zip(datasets, ranges)):
            if counts[d] == 0:
                continue
            start, end = r[s]
            check_split_size(
                ds.prefix,
                name,
                (start, end),
                ds.sequence_lengths[start:end],
                seq_length,
                int(counts[d]),
            )
            plan.append((d, int(counts[d])))
        plans.append(plan)
        split_weights_per_split.append(blend_w)

    result = []
    for s, name in enumerate(SPLIT_NAMES):
        plan = plans[s]
        if plan is None:
            result.append(None)
            continue
        parts: list = [None] * len(datasets)
        for d, count in plan:
            parts[d] = GPTDataset(
                datasets[d],
                name,
                ranges[d][s],
                seq_length,
                count,
                [seed, s, d],
                cache_dir=cache_dir,
                node_local_cache=node_local_cache,
            )
        if len(datasets) == 1:
            result.append(parts[0])
            continue
        description = {
            "datasets": [dataset_fingerprint(ds) for ds in datasets],
            "seq_length": seq_length,
            "seed": seed,
        }
        result.append(
            BlendedDataset(
                parts,
                split_weights_per_split[s],
                int(num_samples[s]),
                name,
                cache_dir=cache_dir,
                description=description,
                node_local_cache=node_local_cache,
                schedule=schedule if s == 0 else None,
            )
        )
    return tuple(result)
