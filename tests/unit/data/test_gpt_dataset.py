"""GPT sample index: packing, epochs, shuffling, splits, caching, and their edge cases."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest

from megagpt.data import DataError, IndexedDataset, build_gpt_datasets
from megagpt.data import gpt_dataset as gpt_module
from megagpt.data.gpt_dataset import parse_split, split_document_ranges

EOD = 0


def _doc_of(token: int) -> int:
    """Document index encoded in a make_dataset token (see conftest)."""
    return (token - 1) // 1000


def _lengths(n: int, seed: int = 0, low: int = 1, high: int = 60) -> list[int]:
    return np.random.default_rng(seed).integers(low, high, n).tolist()


# --- split parsing ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("split", "expected"),
    [
        ("969,30,1", [0.969, 0.03, 0.001]),
        ("98,2", [0.98, 0.02, 0.0]),
        ("1", [1.0, 0.0, 0.0]),
        ("8/1/1", [0.8, 0.1, 0.1]),
        ("0,1,0", [0.0, 1.0, 0.0]),
    ],
)
def test_parse_split(split, expected):
    assert parse_split(split) == pytest.approx(expected)


@pytest.mark.parametrize("split", ["a,b", "-1,2", "0,0,0", "1,2,3,4", ""])
def test_parse_split_rejects_bad_strings(split):
    with pytest.raises(DataError, match="split"):
        parse_split(split)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 10, 1001])
@pytest.mark.parametrize("split", ["969,30,1", "1,1,1", "1,0,0", "0,0,1"])
def test_split_ranges_tile_the_documents(n, split):
    ranges = split_document_ranges(n, parse_split(split))
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    assert all(start <= end for start, end in ranges)


# --- packing ----------------------------------------------------------------------------------


def test_samples_pack_documents_in_order_across_boundaries(make_dataset):
    lengths = _lengths(40) + [0, 5]  # an empty document too
    prefix = make_dataset("ds", lengths)
    seq = 16
    train, _, _ = build_gpt_datasets([prefix], None, "1", seq, (100, 0, 0), 7, None)
    assert len(train) >= 100
    ds = IndexedDataset(prefix)
    stream = np.concatenate([ds[int(d)] for d in train.doc_idx])
    for j in range(len(train)):
        tokens = train.sample_tokens(j)
        assert tokens.dtype == np.int64 and tokens.shape == (seq + 1,)
        # Sample j is the seq+1 tokens at j*seq of the epoch stream: each token a target once.
        np.testing.assert_array_equal(tokens, stream[j * seq : j * seq + seq + 1])
    item = train[3]
    assert set(item) == {"tokens"} and item["tokens"].shape == (seq + 1,)


def test_epochs_are_permutations_and_just_enough(make_dataset):
    lengths = _lengths(25, seed=1)
    prefix = make_dataset("ds", lengths)
    seq, wanted = 32, 200
    train, _, _ = build_gpt_datasets([prefix], None, "1", seq, (wanted, 0, 0), 3, None)
    tokens_per_epoch = sum(lengths)
    epochs = len(train.doc_idx) // 25
    assert epochs == -(-(wanted * seq + 1) // tokens_per_epoch)  # the fewest that suffice
    for e in range(epochs):
        assert sorted(train.doc_idx[e * 25 : (e + 1) * 25]) == list(range(25))
    assert len(train) == (epochs * tokens_per_epoch - 1) // seq >= wanted
    # Served order: all samples of the first epochs-1 epochs come before any of the last one.
    first = ((epochs - 1) * tokens_per_epoch - 1) // seq
    assert sorted(train.shuffle_idx[:first]) == list(range(first))
    assert first <= wanted


def test_shuffle_is_deterministic_by_seed(make_dataset):
    prefix = make_dataset("ds", _lengths(50))
    a, _, _ = build_gpt_datasets([prefix], None, "1", 8, (100, 0, 0), 1, None)
    b, _, _ = build_gpt_datasets([prefix], None, "1", 8, (100, 0, 0), 1, None)
    c, _, _ = build_gpt_datasets([prefix], None, "1", 8, (100, 0, 0), 2, None)
    np.testing.assert_array_equal(a.shuffle_idx, b.shuffle_idx)
    np.testing.assert_array_equal(a[5]["tokens"], b[5]["tokens"])
    assert not np.array_equal(a.shuffle_idx, c.shuffle_idx)


def test_splits_use_disjoint_document_ranges(make_dataset):
    prefix = make_dataset("ds", _lengths(100, seed=2))
    train, valid, test = build_gpt_datasets([prefix], None, "80,10,10", 8, (50, 20, 20), 1, None)
    seen = []
    for ds, (lo, hi) in ((train, (0, 80)), (valid, (80, 90)), (test, (90, 100))):
        docs = {_doc_of(int(t)) for i in range(len(ds)) for t in ds[i]["tokens"] if t != EOD}
        assert docs and all(lo <= d < hi for d in docs)
        seen.append(docs)
    assert not (seen[0] & seen[1] or seen[1] & seen[2])


# --- split edge cases -------------------------------------------------------------------------


def test_zero_weight_or_zero_samples_gives_none(make_dataset):
    prefix = make_dataset("ds", _lengths(30))
    train, valid, test = build_gpt_datasets([prefix], None, "100,0,0", 8, (10, 5, 5), 1, None)
    assert train is not None and valid is None and test is None
    train, valid, test = build_gpt_datasets([prefix], None, "8,1,1", 8, (10, 0, 0), 1, None)
    assert train is not None and valid is None and test is None


def test_empty_split_is_a_clear_error(make_dataset):
    prefix = make_dataset("ds", _lengths(3))
    # 3 documents at 969,30,1: valid and test get no document at all.
    with pytest.raises(DataError) as err:
        build_gpt_datasets([prefix], None, "969,30,1", 8, (10, 4, 0), 1, None)
    message = str(err.value)
    assert "valid split" in message and "[3, 3)" in message and "0 documents" in message
    assert "4 samples" in message and "0 tokens" in message


def test_tiny_split_is_a_clear_error_not_a_hang(make_dataset):
    prefix = make_dataset("ds", [50] * 9 + [3])
    with pytest.raises(DataError, match=r"test split .*1 documents, 3 tokens.*17 tokens"):
        build_gpt_datasets([prefix], None, "9,0,1", 16, (10, 0, 1), 1, None)


def test_empty_dataset_is_a_clear_error(make_dataset):
    prefix = make_dataset("empty", [])
    with pytest.raises(DataError, match="train split .*0 documents"):
        build_gpt_datasets([prefix], None, "1", 8, (1, 0, 0), 1, None)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prefixes": []}, "no data prefixes"),
        ({"seq_length": 0}, "seq_length"),
        ({"num_samples": (1, 2)}, "three"),
        ({"weights": [1.0, 2.0]}, "2 blend weights"),
        ({"weights": [-1.0]}, "non-negative"),
        ({"prefixes": ["/nonexistent/x"]}, "not found"),
    ],
)
def test_bad_arguments_are_clear_errors(make_dataset, kwargs, message):
    args = {
        "prefixes": [make_dataset("ds", [20] * 5)],
        "weights": None,
        "split": "1",
        "seq_length": 8,
        "num_samples": (5, 0, 0),
        "seed": 1,
        "cache_dir": None,
    }
    args.update(kwargs)
    with pytest.raises(DataError, match=message):
        build_gpt_datasets(**args)


# --- caching ----------------------------------------------------------------------------------


def test_index_is_cached_and_reused(make_dataset, tmp_path, monkeypatch):
    prefix = make_dataset("ds", _lengths(60))
    cache = tmp_path / "cache"
    fresh, _, _ = build_gpt_datasets([prefix], None, "9,1,0", 8, (100, 10, 0), 5, None)
    built, _, _ = build_gpt_datasets([prefix], None, "9,1,0", 8, (100, 10, 0), 5, str(cache))
    files = sorted(os.listdir(cache))
    assert len(files) == 2 * 4 and not [f for f in files if ".tmp." in f]

    def no_rebuild(*args, **kwargs):
        raise AssertionError("index rebuilt although cached")

    monkeypatch.setattr(gpt_module, "build_sample_index", no_rebuild)
    cached, _, _ = build_gpt_datasets([prefix], None, "9,1,0", 8, (100, 10, 0), 5, str(cache))
    for name in ("doc_idx", "sample_idx", "shuffle_idx"):
        np.testing.assert_array_equal(getattr(cached, name), getattr(fresh, name))
        np.testing.assert_array_equal(getattr(built, name), getattr(fresh, name))
    assert isinstance(cached.shuffle_idx, np.memmap)
    # Another sequence length is another index.
    monkeypatch.undo()
    build_gpt_datasets([prefix], None, "9,1,0", 16, (100, 10, 0), 5, str(cache))
    assert len(os.listdir(cache)) == 2 * 2 * 4


def test_cache_key_follows_seed_and_num_samples(make_dataset, tmp_path):
    """Runs sharing one data.cache_dir must not reuse another seed's shuffle, nor an index
    built for fewer samples (one epoch where more are needed)."""
    prefix = make_dataset("ds", _lengths(60))
    cache = tmp_path / "cache"

    def build(num_samples, seed):
        train, _, _ = build_gpt_datasets(
            [prefix], None, "1", 8, (num_samples, 0, 0), seed, str(cache)
        )
        return train

    a = build(100, 5)
    one_epoch = len(a)
    assert len(os.listdir(cache)) == 4
    b = build(100, 6)
    fresh, _, _ = build_gpt_datasets([prefix], None, "1", 8, (100, 0, 0), 6, None)
    np.testing.assert_array_equal(b.shuffle_idx, fresh.shuffle_idx)  # seed 6's own shuffle
    np.testing.assert_array_equal(b.doc_idx, fresh.doc_idx)
    assert not np.array_equal(a.shuffle_idx, b.shuffle_idx)
    assert len(os.listdir(cache)) == 2 * 4  # a second entry beside seed 5's

    more = 3 * one_epoch  # needs several epochs: seed 5's one-epoch index is too short
    c = build(more, 5)
    assert len(c) >= more > len(a)
    assert c[more - 1]["tokens"].shape == (9,)
    assert len(os.listdir(cache)) == 3 * 4


def test_incomplete_cache_entry_is_rebuilt(make_dataset, tmp_path):
    prefix = make_dataset("ds", _lengths(60))
    cache = tmp_path / "cache"
    first, _, _ = build_gpt_datasets([prefix], None, "1", 8, (50, 0, 0), 5, str(cache))
    expected = np.array(first.shuffle_idx)  # a copy: the file under the memmap is damaged below
    marker = next(f for f in os.listdir(cache) if f.endswith("description.json"))
    os.unlink(cache / marker)  # as if the builder crashed before committing
    (cache / marker.replace("description.json", "shuffle_idx.npy")).write_bytes(b"garbage")
    again, _, _ = build_gpt_datasets([prefix], None, "1", 8, (50, 0, 0), 5, str(cache))
    np.testing.assert_array_equal(again.shuffle_idx, expected)


def test_cache_key_follows_content_not_path(make_dataset, tmp_path):
    a = make_dataset("a", _lengths(30))
    for ext in (".bin", ".idx"):
        os.link(a + ext, str(tmp_path / "copy") + ext)
    cache = tmp_path / "cache"
    build_gpt_datasets([a], None, "1", 8, (20, 0, 0), 5, str(cache))
    build_gpt_datasets([str(tmp_path / "copy")], None, "1", 8, (20, 0, 0), 5, str(cache))
    assert len(os.listdir(cache)) == 4


def test_pickled_dataset_maps_the_cache_instead_of_copying_it(make_dataset, tmp_path):
    import pickle

    prefix = make_dataset("ds", _lengths(200))
    train, _, _ = build_gpt_datasets([prefix], None, "1", 8, (5000, 0, 0), 5, str(tmp_path / "c"))
    blob = pickle.dumps(train)
    assert len(blob) < 5000 < train.shuffle_idx.nbytes
    clone = pickle.loads(blob)
    assert isinstance(clone.shuffle_idx, np.memmap)
    for i in (0, 17, len(train) - 1):
        np.testing.assert_array_equal(clone[i]["tokens"], train[i]["tokens"])
