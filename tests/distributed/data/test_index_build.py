"""Sample-index building under torch.distributed (2 gloo ranks on CPU): one rank builds, the
others wait and load; errors reach every rank instead of hanging them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from megagpt.data.indexed import IndexedDatasetWriter

_spec = importlib.util.spec_from_file_location(
    "_launcher", Path(__file__).resolve().parents[1] / "launcher.py"
)
launcher = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(launcher)

TARGET = "tests.distributed.data.workers_data:build_indices"


@pytest.fixture
def prefix(tmp_path):
    rng = np.random.default_rng(0)
    prefix = str(tmp_path / "ds")
    with IndexedDatasetWriter(prefix, np.dtype(np.uint16)) as w:
        for _ in range(50):
            w.add_document(rng.integers(1, 1000, rng.integers(5, 80)))
    return prefix


def test_rank0_builds_once_and_all_ranks_see_the_same_samples(prefix, tmp_path):
    cache = str(tmp_path / "cache")
    results = launcher.run_distributed(
        TARGET,
        2,
        timeout=120,
        prefix=prefix,
        cache_dir=cache,
        split="9,1,0",
        num_samples=[100, 10, 0],
    )
    assert [r["error"] for r in results] == [None, None]
    assert [r["builds"] for r in results] == [2, 0]  # train + valid index, built by rank 0 only
    assert results[0]["train"] == results[1]["train"] and results[0]["len"] >= 100
    # A second run reuses the cache: nobody builds.
    again = launcher.run_distributed(
        TARGET,
        2,
        timeout=120,
        prefix=prefix,
        cache_dir=cache,
        split="9,1,0",
        num_samples=[100, 10, 0],
    )
    assert [r["builds"] for r in again] == [0, 0] and again[1]["train"] == results[0]["train"]


def test_too_small_split_raises_on_every_rank(prefix, tmp_path):
    results = launcher.run_distributed(
        TARGET,
        2,
        timeout=120,
        prefix=prefix,
        cache_dir=str(tmp_path / "cache"),
        split="1000,1,0",
        num_samples=[10, 10, 0],
    )
    for r in results:
        assert r["error"].startswith("DataError: valid split") and r["builds"] == 0


def test_builder_failure_reaches_the_waiting_ranks(prefix, tmp_path):
    results = launcher.run_distributed(
        TARGET,
        2,
        timeout=120,
        prefix=prefix,
        cache_dir=str(tmp_path / "cache"),
        split="1",
        num_samples=[10, 0, 0],
        fail_on_rank=0,
    )
    assert results[0]["error"] == "RuntimeError: disk full"
    assert "rank 0 failed to build the gpt-index cache" in results[1]["error"]
    assert "disk full" in results[1]["error"]


def test_weights_schedule_index_is_built_once_and_shared(tmp_path):
    """data.weights_schedule under 2 ranks: one build, and the two ranks' micro-batches
    together are exactly the blend a single process makes (the same sample order for DP 1
    and DP 2)."""
    from megagpt.data import build_gpt_datasets

    rng = np.random.default_rng(1)
    prefixes = []
    for k in range(2):
        prefixes.append(str(tmp_path / f"ds{k}"))
        with IndexedDatasetWriter(prefixes[-1], np.dtype(np.uint16)) as w:
            for _ in range(60):
                w.add_document(rng.integers(1, 1000, rng.integers(5, 80)))
    schedule = [{"tokens": 0, "weights": [1, 0]}, {"tokens": 16 * 400, "weights": [0, 1]}]
    results = launcher.run_distributed(
        "tests.distributed.data.workers_data:build_scheduled",
        2,
        timeout=120,
        prefixes=prefixes,
        cache_dir=str(tmp_path / "cache"),
        schedule=schedule,
        num_samples=400,
    )
    assert sorted(r["builds"] for r in results) == [0, 1]
    single, _, _ = build_gpt_datasets(
        prefixes, None, "1", 16, (400, 0, 0), 5, None, weights_schedule=schedule
    )
    seen = {**results[0]["samples"], **results[1]["samples"]}
    assert sorted(int(i) for i in seen) == list(range(400))
    assert [seen[i] for i in sorted(seen, key=int)] == single.dataset_index.tolist()
