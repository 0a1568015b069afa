"""Our launch/slurm/train.sbatch on a real Slurm (2 emulated nodes on loopback): a tiny CPU
training across both nodes; the pre-timeout signal makes it checkpoint and requeue itself;
`scontrol requeue` from outside makes it checkpoint, and the requeued job resumes and finishes.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.conftest import ROOT, launcher_env

SBATCH = ROOT / "launch" / "slurm" / "train.sbatch"
STEPS = 300


def _job_state(env: dict, jid: str) -> dict:
    out = subprocess.run(
        ["scontrol", "show", "job", jid],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    ).stdout
    return dict(re.findall(r"(\w+)=(\S+)", out))


def _last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line]
    return max(steps, default=0)


def _latest(run_dir: Path) -> int:
    path = run_dir / "checkpoints" / "latest"
    return int(re.sub(r"\D", "", path.read_text())) if path.is_file() else 0


def _wait(cond, what: str, log: Path, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.3)
    text = log.read_text()[-4000:] if log.is_file() else "(no job log)"
    raise AssertionError(f"timed out waiting for {what}; job log:\n{text}")


@pytest.mark.slow
def test_sbatch_trains_across_two_nodes_and_resumes_after_requeue(
    slurm_cluster, tiny_corpus, tmp_path
):
    run_dir = tmp_path / "run"
    recipe = tiny_recipe_for(tmp_path, tiny_corpus, run_dir)
    env = launcher_env(**slurm_cluster)
    jid = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--nodes=2",
            "--gpus-per-node=1",
            "--time=10",
            f"--chdir={tmp_path}",
            str(SBATCH),
            str(recipe),
            f"train.steps={STEPS}",
            "checkpoint.interval=1000",
            "train.log_interval=5",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    log = tmp_path / f"megagpt-{jid}.out"
    try:
        # 1. training runs on both nodes; the pre-timeout signal (what --signal=B:USR1@N
        #    sends to the batch script) makes it save, exit cleanly and requeue itself.
        _wait(lambda: _last_step(run_dir) >= 10, "training progress", log)
        subprocess.run(["scancel", "--batch", "--signal=USR1", jid], env=env, check=True)
        _wait(lambda: "start 2 (restart count 1)" in log.read_text(), "the self-requeue", log)
        first_stop = _latest(run_dir)
        assert 10 <= first_stop < STEPS
        # 2. the requeued job resumes from that checkpoint; `scontrol requeue` from outside
        #    (SIGTERM to every process) makes it save again, and the job starts a third time.
        _wait(lambda: _last_step(run_dir) >= first_stop + 10, "progress after resume", log)
        subprocess.run(["scontrol", "requeue", jid], env=env, check=True)
        _wait(
            lambda: _job_state(env, jid).get("JobState") == "COMPLETED",
            "completion",
            log,
            timeout=150,
        )
    finally:
        state = _job_state(env, jid)
        if state.get("JobState") not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", None):
            subprocess.run(["scancel", jid], env=env, check=False)
    text = log.read_text()
    assert state["ExitCode"] == "0:0" and state["Restarts"] == "2", text[-3000:]
    assert "2 node(s) [127.0.0.[1-2]] x 1 process(es)" in text
    assert "world 2 = TP 1 x PP 1 x DP 2" in text
    assert f"stop signal received: saved step {first_stop}, exiting" in text
    assert f"requeueing job {jid}: the next start resumes from step {first_stop}" in text
    resumed = [int(s) for s in re.findall(r"resumed from \S+step_(\d+)", text)]
    assert len(resumed) == 2 and resumed[0] == first_stop and resumed[1] > first_stop, text
    assert _latest(run_dir) == STEPS and _last_step(run_dir) == STEPS
    assert (run_dir / "model" / "config.json").is_file() or any((run_dir / "model").iterdir())


def tiny_recipe_for(tmp_path: Path, corpus: dict, run_dir: Path) -> Path:
    from tests.integration.conftest import tiny_recipe

    return tiny_recipe(tmp_path / "tiny.yaml", corpus, run_dir)
