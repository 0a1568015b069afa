"""metrics.jsonl across a real kill and resume: each step logged once, losses of the re-run
steps equal to an uninterrupted run's."""

from __future__ import annotations

import json

import pytest

from tests.distributed.conftest import tiny_recipe
from tests.distributed.launcher import run_distributed


def test_metrics_after_kill_and_resume_has_each_step_once(tiny_corpus, tmp_path):
    """Checkpoint at step 3, SIGKILL at the start of step 6 (steps 4 and 5 logged, not saved),
    resume: metrics.jsonl holds steps 1-6 once each, and they match a straight run."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    cfg_a = tiny_recipe(tmp_path / "a.yaml", tiny_corpus, straight)
    cfg_b = tiny_recipe(tmp_path / "b.yaml", tiny_corpus, killed)
    run_distributed("tests.distributed.workers:train_run", 1, config=str(cfg_a), overrides=[])
    with pytest.raises(AssertionError, match="exited -9"):
        run_distributed(
            "tests.distributed.fault_workers:train_killed_at",
            1,
            config=str(cfg_b),
            overrides=[],
            kill_at=6,
        )
    before = [json.loads(x)["step"] for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert before == [1, 2, 3, 4, 5]
    assert (killed / "checkpoints" / "latest").read_text().strip() == "step_0000003"
    res = run_distributed("tests.distributed.workers:train_run", 1, config=str(cfg_b), overrides=[])
    assert res[0]["resumed"] == 3  # from the checkpoint, not a fresh start logging steps 1-6
    records = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    reference = {
        json.loads(x)["step"]: json.loads(x)["loss"]
        for x in (straight / "metrics.jsonl").read_text().splitlines()
    }
    assert {r["step"]: r["loss"] for r in records} == reference
