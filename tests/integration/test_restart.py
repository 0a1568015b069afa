"""Faults under torchrun, injected for real on 2 gloo CPU processes.

* A rank killed with SIGKILL mid-run: torchrun restarts the job (plain ``torchrun
  --max-restarts``, and ``launch/torchrun.sh``), the new attempt resumes from the latest
  checkpoint by itself, exits 0, and every step's loss equals an uninterrupted run's.
* A wedged rank (alive, never reaching its collective): its peer reports the collective
  timeout with the phase and step and exits non-zero within ``parallel.timeout_s``; the wedged
  rank itself does not ignore torchrun's SIGTERM, so the whole job ends in bounded time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.distributed.conftest import losses_by_step
from tests.distributed.launcher import free_port
from tests.integration.conftest import ROOT, launcher_env, tiny_recipe

STEPS = 10
COMMON = [f"train.steps={STEPS}", "checkpoint.interval=2", "checkpoint.keep_last=10"]


def _plain_torchrun(
    recipe: Path,
    run_dir: Path,
    log: Path,
    *extra: str,
    module: list[str] | None = None,
    overrides: tuple[str, ...] = (),
) -> subprocess.Popen:
    """``torchrun --nproc-per-node 2`` (static rendezvous, as a user types it)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        *extra,
        "-m",
        *(module or ["megagpt.cli"]),
        "train",
        "--config",
        str(recipe),
        f"run.dir={run_dir}",
        *COMMON,
        *overrides,
    ]
    with open(log, "w") as out:
        return subprocess.Popen(
            cmd, env=launcher_env(), stdout=out, stderr=subprocess.STDOUT, cwd=ROOT
        )


def _launch_script(recipe: Path, run_dir: Path, log: Path) -> subprocess.Popen:
    """``launch/torchrun.sh`` on one node: c10d rendezvous, its default restarts."""
    cmd = [
        "bash",
        str(ROOT / "launch" / "torchrun.sh"),
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        str(recipe),
        f"run.dir={run_dir}",
        *COMMON,
    ]
    with open(log, "w") as out:
        return subprocess.Popen(
            cmd, env=launcher_env(), stdout=out, stderr=subprocess.STDOUT, cwd=ROOT
        )


def _wait(proc: subprocess.Popen, log: Path, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        proc.wait()
        raise AssertionError(
            f"still running after {timeout:.0f} s:\n" + log.read_text()[-4000:]
        ) from None


def _wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path, step: int, log: Path) -> None:
    latest, deadline = run_dir / "checkpoints" / "latest", time.monotonic() + 240
    while time.monotonic() < deadline:
        if latest.is_file() and latest.read_text().strip() >= f"step_{step:07d}":
            return
        assert proc.poll() is None, f"ended early ({proc.returncode}):\n{log.read_text()[-4000:]}"
        time.sleep(0.2)
    raise AssertionError("no checkpoint in time:\n" + log.read_text()[-4000:])


def _worker(proc: subprocess.Popen, rank: int) -> psutil.Process:
    """torchrun's worker process of global ``rank`` (a child of the launcher process)."""
    for child in psutil.Process(proc.pid).children():
        if child.environ().get("RANK") == str(rank):
            return child
    raise AssertionError(f"no worker with RANK={rank} under {proc.pid}")


@pytest.fixture(scope="module")
def uninterrupted(tiny_corpus, tmp_path_factory) -> dict[int, float]:
    """Per-step losses of the same run without a fault."""
    tmp = tmp_path_factory.mktemp("straight")
    run_dir, log = tmp / "run", tmp / "torchrun.log"
    proc = _plain_torchrun(tiny_recipe(tmp / "tiny.yaml", tiny_corpus, run_dir), run_dir, log)
    assert _wait(proc, log, 300) == 0, log.read_text()[-4000:]
    losses = losses_by_step(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "launch/torchrun.sh"])
def test_killed_rank_restarts_and_resumes_exactly(tiny_corpus, tmp_path, uninterrupted, launcher):
    run_dir, log = tmp_path / "run", tmp_path / "torchrun.log"
    recipe = tiny_recipe(tmp_path / "tiny.yaml", tiny_corpus, run_dir)
    if launcher == "torchrun":
        proc = _plain_torchrun(recipe, run_dir, log, "--max-restarts", "2")
    else:
        proc = _launch_script(recipe, run_dir, log)
    _wait_for_checkpoint(proc, run_dir, 4, log)
    os.kill(_worker(proc, 1).pid, signal.SIGKILL)
    code = _wait(proc, log, 300)
    text = log.read_text()
    assert code == 0, f"the job did not recover by itself:\n{text[-4000:]}"
    assert "torchrun restart 1 of" in text and "resumed from" in text, text[-4000:]
    # No attempt waited out torchrun's 30 s SIGTERM -> SIGKILL window on a rank that ignored it.
    assert "forcefully exiting via 9" not in text, text[-4000:]
    losses = losses_by_step(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert losses[step] == uninterrupted[step], (
            f"step {step}: after the restart {losses[step]} != uninterrupted {uninterrupted[step]}"
        )
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:07d}"
    assert (run_dir / "model").is_dir()


@pytest.mark.slow
def test_killed_rank_on_one_of_two_nodes_restarts_both(tiny_corpus, tmp_path, uninterrupted):
    """launch/torchrun.sh on two "nodes" (loopback): node 1's worker is killed; node 0's agent
    joins the new rendezvous round, both restart, resume, and finish as if nothing happened."""
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(tmp_path / "tiny.yaml", tiny_corpus, run_dir)
    port, env = free_port(), launcher_env(MEGAGPT_ALLOW_LOOPBACK="1")
    procs, logs = [], [tmp_path / "node0.log", tmp_path / "node1.log"]
    for node in (0, 1):
        with open(logs[node], "w") as out:
            procs.append(
                subprocess.Popen(
                    [
                        "bash",
                        str(ROOT / "launch" / "torchrun.sh"),
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
                        f"run.dir={run_dir}",
                        *COMMON,
                    ],
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=ROOT,
                )
            )
    _wait_for_checkpoint(procs[0], run_dir, 4, logs[0])
    psutil.Process(procs[1].pid).children()[0].kill()  # node 1's only worker, SIGKILL
    codes = [_wait(p, log, 300) for p, log in zip(procs, logs)]
    text = logs[0].read_text() + logs[1].read_text()
    assert codes == [0, 0], text[-4000:]
    assert "resumed from" in text
    losses = losses_by_step(run_dir)
    assert {s: losses[s] for s in range(1, STEPS + 1)} == uninterrupted


@pytest.mark.slow
def test_wedged_rank_times_out_with_phase_and_step(tiny_corpus, tmp_path):
    """Rank 1 sleeps before step 3 (tests/integration/fault_entry.py); with
    parallel.timeout_s=5 rank 0 says where it waited and exits; the job ends, non-zero."""
    run_dir, log = tmp_path / "run", tmp_path / "torchrun.log"
    recipe = tiny_recipe(tmp_path / "tiny.yaml", tiny_corpus, run_dir)
    proc = _plain_torchrun(
        recipe,
        run_dir,
        log,
        module=["tests.integration.fault_entry", "3", "3600"],
        overrides=("parallel.timeout_s=5",),
    )
    # The tiny config logs every step: wait for the stall, then time the reaction to it.
    deadline = time.monotonic() + 240
    while "[fault] rank 1 stalls" not in log.read_text():
        assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-4000:]
        time.sleep(0.2)
    # Without the config key the wait would be PyTorch's 30 min (megagpt's gloo default: 5):
    # ending inside this 120 s wait, with the lines below, is the proof.
    code = _wait(proc, log, 120)
    text = log.read_text()
    assert code != 0
    assert "rank 0: collective timed out in train_step at step 3 (after 5 s)" in text, text[-4000:]
    # torchrun's SIGTERM reached rank 1 asleep in Python: it exits within the grace, not after
    # torchrun's 30 s SIGKILL.
    assert "rank 1: SIGTERM not honoured within" in text, text[-4000:]
    assert "forcefully exiting via 9" not in text
