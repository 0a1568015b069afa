"""``python -m megagpt.planner.run_state``: where a run stands, for the Slurm requeue loop
(launch/slurm/train.sbatch), read from the config and ``checkpoints/latest`` without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from megagpt.checkpoint.tags import tag_for, write_latest
from megagpt.planner.run_state import main, run_state

ROOT = Path(__file__).resolve().parents[3]
TINY = str(ROOT / "configs" / "pretrain" / "tiny.yaml")


def test_no_checkpoint_is_step_zero(tmp_path):
    run = tmp_path / "run"
    assert run_state(TINY, [f"run.dir={run}", "train.steps=50"]) == (str(run), 0, 50)


def test_latest_gives_the_step(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / tag_for(40)).mkdir(parents=True)
    write_latest(run / "checkpoints", tag_for(40))
    assert run_state(TINY, [f"run.dir={run}", "train.steps=50"]) == (str(run), 40, 50)


def test_unparsable_latest_counts_as_not_started(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("not-a-tag\n")
    assert run_state(TINY, [f"run.dir={run}"])[1] == 0


def test_main_prints_one_line_and_reports_a_bad_config(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints" / tag_for(7)).mkdir(parents=True)
    write_latest(run / "checkpoints", tag_for(7))
    assert main([TINY, f"run.dir={run}", "train.steps=9"]) == 0
    assert capsys.readouterr().out == f"{run} 7 9\n"
    assert main([str(tmp_path / "missing.yaml")]) == 2
    assert "run_state: error:" in capsys.readouterr().err
    assert main([]) == 2


def test_runs_without_importing_torch(tmp_path):
    """It runs at every job start and end on a login node: torch would cost 10+ s there."""
    run = tmp_path / "run"
    code = (
        "import sys\nfrom megagpt.planner.run_state import main\n"
        f"rc = main([{TINY!r}, 'run.dir={run}'])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\nsys.exit(rc)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[1] == "0"
