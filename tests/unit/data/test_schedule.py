"""data.weights_schedule: blend weights that change with consumed tokens.

Mirrors the guarantees of fixed-weight blending (test_blending.py, test_sampler.py): realised
proportions close to the schedule over every window, one global sample order whatever the
data-parallel size, and exact resume also when the data-parallel size changes.
"""

from __future__ import annotations

import numpy as np
import pytest

from megagpt.data import DataError, build_gpt_datasets
from megagpt.data.blending import build_schedule_index, parse_weights_schedule
from tests.unit.data.test_sampler import global_batches

OFFSET = 100_000  # tokens of dataset k are k * OFFSET + (small id)
SEQ = 16
# Two phases: 90/10 for the first 2,000 samples, a linear ramp to 20/80 over the next 2,000,
# then 20/80 to the end.
TWO_PHASE = [
    {"tokens": 0, "weights": [0.9, 0.1]},
    {"tokens": 2000 * SEQ, "weights": [9, 1]},  # un-normalised weights are fine
    {"tokens": 4000 * SEQ, "weights": [0.2, 0.8]},
]
WINDOW = 200  # the proportions are promised over every window of this many samples


@pytest.fixture
def two_datasets(tmp_path, data):
    rng = np.random.default_rng(0)
    prefixes = []
    for k, n_docs in enumerate((150, 150)):
        docs = [k * OFFSET + rng.integers(1, 1000, rng.integers(5, 60)) for _ in range(n_docs)]
        prefixes.append(data.write_dataset(tmp_path / f"ds{k}", docs, np.int32))
    return prefixes


def _origin(ds, indices) -> np.ndarray:
    return np.array([int(ds[i]["tokens"].max()) // OFFSET for i in indices])


def _check_follows(which: np.ndarray, schedule, num_datasets: int) -> None:
    """Every prefix within one sample of the schedule's cumulative target, and every window of
    WINDOW samples within 1 percentage point of the schedule's mean share over it."""
    n = len(which)
    target = np.stack([schedule.cumulative(d, n) for d in range(num_datasets)], axis=1)
    running = np.zeros((n + 1, num_datasets))
    for d in range(num_datasets):
        running[1:, d] = np.cumsum(which == d)
    assert np.abs(running - target).max() < 1
    realised = (running[WINDOW:] - running[:-WINDOW]) / WINDOW
    wanted = (target[WINDOW:] - target[:-WINDOW]) / WINDOW
    assert np.abs(realised - wanted).max() <= 0.01


def test_two_datasets_follow_a_two_phase_schedule(two_datasets):
    train, valid, _ = build_gpt_datasets(
        two_datasets, None, "9,1,0", SEQ, (6000, 300, 0), 1, None, weights_schedule=TWO_PHASE
    )
    assert len(train) == 6000
    origin = _origin(train, range(len(train)))
    assert np.array_equal(origin, train.dataset_index)  # tokens really come from that dataset
    schedule = parse_weights_schedule(TWO_PHASE, 2, SEQ)
    _check_follows(origin, schedule, 2)
    # The phases themselves, as a user would look at them.
    assert abs(np.mean(origin[:2000] == 1) - 0.1) < 0.001
    assert abs(np.mean(origin[2000:4000] == 1) - 0.45) < 0.001  # the ramp's mean share
    assert abs(np.mean(origin[4000:] == 1) - 0.8) < 0.001
    # Validation is blended by the mixture the schedule ends at.
    assert abs(np.mean(_origin(valid, range(len(valid))) == 1) - 0.8) < 0.01


@pytest.mark.parametrize(
    "points",
    [
        TWO_PHASE,
        [{"tokens": 1000, "weights": [5, 3, 2]}, {"tokens": 7000 * SEQ, "weights": [0, 1, 1]}],
        [
            {"tokens": 0, "weights": [1, 0]},
            {"tokens": 100 * SEQ, "weights": [0, 1]},
            {"tokens": 200 * SEQ, "weights": [1, 0]},
        ],
    ],
)
@pytest.mark.parametrize("size", [1, 999, 10_000])
def test_every_window_follows_the_schedule(points, size):
    n_ds = len(points[0]["weights"])
    schedule = parse_weights_schedule(points, n_ds, SEQ)
    index = build_schedule_index(schedule, size)
    which = index["dataset_index"]
    assert len(which) == size
    if size > WINDOW:
        _check_follows(which, schedule, n_ds)
    for d in range(n_ds):  # each dataset's samples are used in order, each exactly once
        np.testing.assert_array_equal(
            index["dataset_sample_index"][which == d], np.arange(np.sum(which == d))
        )


def test_constant_schedule_is_fixed_weights(two_datasets):
    """One point means fixed weights: the same proportions as data.weights."""
    index = build_schedule_index(
        parse_weights_schedule([{"tokens": 5, "weights": [3, 1]}], 2, SEQ), 4000
    )
    running = np.cumsum(index["dataset_index"] == 0)
    assert np.abs(running - 0.75 * np.arange(1, 4001)).max() <= 1


def test_same_order_for_any_dp_size_and_exact_resume_with_another(two_datasets, tmp_path):
    """Global batches are the same samples for any (micro, dp, accumulation) with the same
    global batch, and a run resumed at step 7 with another DP size continues exactly."""
    cache = str(tmp_path / "cache")
    train, _, _ = build_gpt_datasets(
        two_datasets, None, "1", SEQ, (4800, 0, 0), 3, cache, weights_schedule=TWO_PHASE
    )
    gb = 16
    full = global_batches(total=len(train), consumed=0, micro=2, dp=2, grad_accum=4)
    for micro, dp, accum in [(16, 1, 1), (1, 4, 4), (2, 8, 1)]:
        other = global_batches(total=len(train), consumed=0, micro=micro, dp=dp, grad_accum=accum)
        assert [sorted(b) for b in other] == [sorted(b) for b in full]
    # Resume: a fresh build from the cache (a restarted job) at consumed = 7 global batches,
    # with DP 4 instead of 2.
    again, _, _ = build_gpt_datasets(
        two_datasets, None, "1", SEQ, (4800, 0, 0), 3, cache, weights_schedule=TWO_PHASE
    )
    resumed = global_batches(total=len(again), consumed=7 * gb, micro=1, dp=4, grad_accum=4)
    assert len(resumed) == len(full) - 7
    for before, after in zip(full[7:], resumed):
        assert sorted(before) == sorted(after)
        a = sorted(train[i]["tokens"].tobytes() for i in before)
        b = sorted(again[i]["tokens"].tobytes() for i in after)
        assert a == b  # the same tokens, not only the same indices
    np.testing.assert_array_equal(train.dataset_index, again.dataset_index)
    # Without a cache (every rank builds for itself) the index is the same too.
    alone, _, _ = build_gpt_datasets(
        two_datasets, None, "1", SEQ, (4800, 0, 0), 3, None, weights_schedule=TWO_PHASE
    )
    np.testing.assert_array_equal(alone.dataset_index, train.dataset_index)
    np.testing.assert_array_equal(alone.dataset_sample_index, train.dataset_sample_index)


def test_schedule_is_part_of_the_cache_key(two_datasets, tmp_path):
    cache = str(tmp_path / "cache")
    a, _, _ = build_gpt_datasets(
        two_datasets, None, "1", SEQ, (3000, 0, 0), 1, cache, weights_schedule=TWO_PHASE
    )
    other = [dict(p) for p in TWO_PHASE]
    other[-1] = {"tokens": 4000 * SEQ, "weights": [0.5, 0.5]}
    b, _, _ = build_gpt_datasets(
        two_datasets, None, "1", SEQ, (3000, 0, 0), 1, cache, weights_schedule=other
    )
    assert not np.array_equal(a.dataset_index, b.dataset_index)
    assert np.array_equal(a.dataset_index[:2000], b.dataset_index[:2000])  # same first phase


def test_a_longer_run_keeps_the_order_of_the_shorter_one():
    """The schedule is in absolute tokens: planning more samples (a longer run) leaves the
    blend of the first ones as it was, up to the last few rounded at the end."""
    schedule = parse_weights_schedule(TWO_PHASE, 2, SEQ)
    short, long = build_schedule_index(schedule, 3000), build_schedule_index(schedule, 5000)
    for key in ("dataset_index", "dataset_sample_index"):
        np.testing.assert_array_equal(short[key][:2998], long[key][:2998])


KEY = "data.weights_schedule"


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ([], rf"{KEY} must be a non-empty list"),
        ({"tokens": 0, "weights": [1, 1]}, rf"{KEY} must be a non-empty list"),
        ([{"tokens": 0}], rf"{KEY}\[0\] must be a mapping with exactly the keys"),
        ([{"tokens": 0, "weights": [1, 1], "samples": 3}], rf"{KEY}\[0\] must be a mapping"),
        ([{"tokens": -5, "weights": [1, 1]}], rf"{KEY}\[0\]\.tokens must be a non-negative int"),
        ([{"tokens": "soon", "weights": [1, 1]}], rf"{KEY}\[0\]\.tokens must be"),
        (
            [{"tokens": 10, "weights": [1, 1]}, {"tokens": 10, "weights": [1, 2]}],
            rf"{KEY}\[1\]\.tokens \(10\) must be larger than {KEY}\[0\]\.tokens \(10\)",
        ),
        (
            [{"tokens": 0, "weights": [1, 1, 1]}],
            rf"{KEY}\[0\]\.weights has 3 entries for 2 datasets",
        ),
        ([{"tokens": 0, "weights": 1}], rf"{KEY}\[0\]\.weights has no entries for 2"),
        ([{"tokens": 0, "weights": [1, -1]}], rf"{KEY}\[0\]\.weights \[1, -1\]: must be non-neg"),
        (
            [{"tokens": 0, "weights": [1, 1]}, {"tokens": 9, "weights": [0, 0]}],
            rf"{KEY}\[1\]\.weights \[0, 0\]: .*positive sum",
        ),
        ([{"tokens": 0, "weights": [1, float("nan")]}], rf"{KEY}\[0\]\.weights"),
    ],
)
def test_bad_schedules_name_the_entry(schedule, message):
    with pytest.raises(DataError, match=message):
        parse_weights_schedule(schedule, 2, SEQ)


def test_yaml_style_token_counts_are_accepted():
    schedule = parse_weights_schedule(
        [{"tokens": "0", "weights": [1, 0]}, {"tokens": "1e9", "weights": [0, 1]}], 2, SEQ
    )
    assert [t for t, _ in schedule.points] == [0, 10**9]


def test_schedule_and_weights_together_are_refused(two_datasets):
    with pytest.raises(DataError, match="data.weights or data.weights_schedule, not both"):
        build_gpt_datasets(
            two_datasets, [1, 1], "1", SEQ, (100, 0, 0), 1, None, weights_schedule=TWO_PHASE
        )


def test_config_validation_reports_the_schedule_problem():
    from megagpt.config.loader import load_config
    from megagpt.config.validate import problems

    cfg = load_config(
        None,
        [
            "model.name=gpt3-tiny",
            "data.paths=[a,b]",
            "data.tokenizer=t",
            "data.weights_schedule=[{tokens: 0, weights: [1]}]",
        ],
    )
    found = problems(cfg, 1, cuda=False)
    assert any(f"{KEY}[0].weights has 1 entries for 2 datasets" in p for p in found), found
    cfg.data.weights = [1, 1]
    assert "set data.weights or data.weights_schedule, not both" in problems(cfg, 1, cuda=False)
