"""Blending: realised proportions within 1% of the weights, per prefix and overall."""

from __future__ import annotations

import numpy as np
import pytest

from megagpt.data import DataError, build_gpt_datasets
from megagpt.data.blending import blend_counts, build_blend_index

OFFSET = 100_000  # tokens of dataset k are k * OFFSET + (small id)


@pytest.fixture
def three_datasets(tmp_path, data):
    rng = np.random.default_rng(0)
    prefixes = []
    for k, n_docs in enumerate((80, 40, 120)):
        docs = [k * OFFSET + rng.integers(1, 1000, rng.integers(5, 60)) for _ in range(n_docs)]
        prefixes.append(data.write_dataset(tmp_path / f"ds{k}", docs, np.int32))
    return prefixes


@pytest.mark.parametrize("size", [1, 7, 100, 12345])
@pytest.mark.parametrize("weights", [[0.5, 0.3, 0.2], [1, 1, 1], [0.001, 0.999], [3, 0, 1]])
def test_counts_sum_to_size_and_are_within_one_sample(size, weights):
    counts = blend_counts(weights, size)
    assert counts.sum() == size
    exact = np.asarray(weights, float) / sum(weights) * size
    assert np.all(np.abs(counts - exact) < 1)


def test_every_prefix_of_the_blend_keeps_the_proportions():
    weights = np.array([0.5, 0.3, 0.2])
    counts = blend_counts(list(weights), 10_000)
    index = build_blend_index(counts)
    which = index["dataset_index"]
    running = np.stack([np.cumsum(which == d) for d in range(3)], axis=1)
    lengths = np.arange(1, len(which) + 1)[:, None]
    # Off by at most ~one sample per dataset at every length: within 1% from 200 samples on.
    assert np.abs(running - lengths * weights).max() <= 2
    # Each dataset's samples are used in order, each exactly once.
    for d in range(3):
        np.testing.assert_array_equal(
            index["dataset_sample_index"][which == d], np.arange(counts[d])
        )


def test_blended_gpt_datasets_realise_the_weights(three_datasets):
    weights = [0.5, 0.3, 0.2]
    train, valid, _ = build_gpt_datasets(
        three_datasets, weights, "9,1,0", 16, (3000, 200, 0), 1, None
    )
    assert len(train) == 3000 and len(valid) == 200
    for ds in (train, valid):
        origin = np.array([int(ds[i]["tokens"].max()) // OFFSET for i in range(len(ds))])
        assert np.array_equal(origin, ds.dataset_index)  # tokens really come from that dataset
        realised = np.bincount(origin, minlength=3) / len(ds)
        assert np.abs(realised - weights).max() < 0.01
        # Per global batch of 64 too (not only over the run).
        for start in range(0, len(ds) - 63, 64):
            share = np.bincount(origin[start : start + 64], minlength=3) / 64
            assert np.abs(share - weights).max() <= 2 / 64


def test_no_weights_means_proportional_to_tokens(three_datasets):
    from megagpt.data import IndexedDataset

    train, _, _ = build_gpt_datasets(three_datasets, None, "1", 16, (2000, 0, 0), 1, None)
    tokens = np.array([IndexedDataset(p).num_tokens for p in three_datasets], float)
    realised = np.bincount(np.asarray(train.dataset_index), minlength=3) / len(train)
    assert np.abs(realised - tokens / tokens.sum()).max() < 0.01


def test_zero_weight_dataset_is_not_used_and_may_be_tiny(tmp_path, three_datasets, data):
    tiny = data.write_dataset(tmp_path / "tiny", [[1, 2]], np.int32)
    train, _, _ = build_gpt_datasets(
        [three_datasets[0], tiny], [1.0, 0.0], "1", 16, (100, 0, 0), 1, None
    )
    assert set(np.asarray(train.dataset_index).tolist()) == {0}


def test_blend_with_a_too_small_split_names_the_dataset(tmp_path, three_datasets, data):
    tiny = data.write_dataset(tmp_path / "tiny", [[1, 2]], np.int32)
    with pytest.raises(DataError, match=r"train split of .*tiny is too small"):
        build_gpt_datasets([three_datasets[0], tiny], [0.5, 0.5], "1", 16, (100, 0, 0), 1, None)


def test_blend_index_is_cached(three_datasets, tmp_path):
    cache = tmp_path / "cache"
    a, _, _ = build_gpt_datasets(three_datasets, [1, 2, 3], "1", 16, (500, 0, 0), 1, str(cache))
    b, _, _ = build_gpt_datasets(three_datasets, [1, 2, 3], "1", 16, (500, 0, 0), 1, str(cache))
    assert any(p.name.startswith("blend-index") for p in cache.iterdir())
    np.testing.assert_array_equal(a.dataset_index, b.dataset_index)
    np.testing.assert_array_equal(a[17]["tokens"], b[17]["tokens"])
