"""`megagpt train --dry-run`: layout, per-stage layers and parameters without process groups."""

from __future__ import annotations

from pathlib import Path

import pytest

from megagpt.cli import main
from megagpt.config import load_config
from megagpt.planner.dryrun import dry_run, meta_stage_params
from megagpt.planner.memory import stage_parameters

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (4, 2), (1, 4), (2, 2)])
def test_meta_device_counts_match_the_analytic_model(tp, pp):
    cfg = load_config(
        None, ["model.name=gpt3-tiny", f"parallel.tensor={tp}", f"parallel.pipeline={pp}"]
    )
    assert meta_stage_params(cfg, tp, pp) == [s.params for s in stage_parameters(cfg.model, tp, pp)]
    reports, lines, ok = dry_run(cfg, tp * pp * 2)
    assert ok, "\n".join(lines)
    assert [len(r.layers) for r in reports] == [4 // pp] * pp


def test_175b_on_1024_ranks_dry_run(capsys):
    """The 175B recipe planned for 1,024 ranks without starting any (how long it takes is a
    benchmark's business, not this test's)."""
    code = main(
        [
            "train",
            "--config",
            str(ROOT / "configs/pretrain/175b.yaml"),
            "--dry-run",
            "--world-size",
            "1024",
            "parallel.tensor=8",
            "parallel.pipeline=8",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "1024 ranks = TP 8 x PP 8 x DP 16" in out
    assert "accumulation 192 x DP 16" in out
    assert "match the analytic model" in out and "vs parameter_count 174,301,274,112" in out
    assert "84-95" in out  # the last of 8 stages holds layers 84..95


def test_dry_run_rejects_impossible_world_sizes(capsys):
    code = main(
        [
            "train",
            "--config",
            str(ROOT / "configs/pretrain/175b.yaml"),
            "--dry-run",
            "--world-size",
            "100",
            "parallel.tensor=8",
            "parallel.pipeline=8",
        ]
    )
    assert code == 2
    assert (
        "world size 100 is not divisible by parallel.tensor x parallel.pipeline"
        in capsys.readouterr().err
    )


def test_world_size_needs_dry_run(capsys):
    assert (
        main(["train", "--config", str(ROOT / "configs/pretrain/175b.yaml"), "--world-size", "8"])
        == 2
    )
    assert "--world-size only applies with --dry-run" in capsys.readouterr().err
