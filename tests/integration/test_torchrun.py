"""launch/torchrun.sh on two "nodes" (two launchers on loopback, --nnodes 2): a tiny CPU
training across both, then SIGTERM to both launchers saves a checkpoint that a restart resumes.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.distributed.launcher import free_port
from tests.integration.conftest import ROOT, launcher_env, tiny_recipe

SCRIPT = ROOT / "launch" / "torchrun.sh"


def _launch(recipe: Path, port: int, logs: Path, *extra: str) -> list[subprocess.Popen]:
    env = launcher_env(MEGAGPT_ALLOW_LOOPBACK="1")
    procs = []
    for node in (0, 1):
        with open(logs / f"node{node}.log", "a") as out:  # the child keeps its own handle
            procs.append(
                subprocess.Popen(
                    [
                        "bash",
                        str(SCRIPT),
                        "--nnodes",
                        "2",
                        "--node-rank",
                        str(node),
                        "--master-addr",
                        "127.0.0.1",
                        "--master-port",
                        str(port),
                        "--nproc-per-node",
                        "1",
                        str(recipe),
                        *extra,
                    ],
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=ROOT,
                )
            )
    return procs


def _wait_all(procs, logs: Path, timeout: float = 150) -> None:
    for p in procs:
        try:
            code = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            code = "timeout"
        if code != 0:
            raise AssertionError(
                f"launcher exited {code}:\n" + (logs / "node0.log").read_text()[-3000:]
            )


@pytest.mark.slow
def test_two_node_torchrun_trains_and_resumes(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(tmp_path / "tiny.yaml", tiny_corpus, run_dir)
    _wait_all(_launch(recipe, free_port(), tmp_path, "train.steps=4"), tmp_path)
    text = (tmp_path / "node0.log").read_text()
    assert "node 0 of 2 x 1 process(es)" in text
    assert "world 2 = TP 1 x PP 1 x DP 2" in text
    steps = [
        json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().split("\n") if x
    ]
    assert steps[-1] == 4
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000004"
    # Restart with more steps; SIGTERM both launchers mid-run: torchrun forwards it, the ranks
    # save and exit; the next start resumes from that step and finishes.
    procs = _launch(
        recipe,
        free_port(),
        tmp_path,
        "train.steps=400",
        "checkpoint.interval=1000",
        "train.log_interval=2",
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        lines = (run_dir / "metrics.jsonl").read_text().split("\n")
        if any(x and json.loads(x)["step"] >= 10 for x in lines):
            break
        time.sleep(0.3)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        p.wait(timeout=120)
    text = (tmp_path / "node0.log").read_text()
    assert "resumed from" in text and "stop signal received: saved step" in text, text[-3000:]
    stopped = int((run_dir / "checkpoints" / "latest").read_text().strip()[5:])
    assert 10 <= stopped < 400
    _wait_all(_launch(recipe, free_port(), tmp_path, "train.steps=" + str(stopped + 4)), tmp_path)
    text = (tmp_path / "node0.log").read_text()
    assert f"resumed from {run_dir}/checkpoints/step_{stopped:07d}" in text
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{stopped + 4:07d}"
