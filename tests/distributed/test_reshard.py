"""Resharded resume: a checkpoint saved under one TP / PP / DP / ZeRO layout resumes under
another with the same losses as an unresharded resume (fp32, CPU, 1e-5 relative).

The unresharded reference is the source run itself: it saves at step 2 and trains on to step 4,
and a same-layout resume is bit-exact (tests/distributed/test_trainer.py::test_resume_is_exact),
so its steps 3-4 are what an unresharded resume from step 2 produces.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.distributed.conftest import tiny_recipe
from tests.distributed.launcher import run_distributed

TRAIN = "tests.distributed.workers:train_run"
STEPS = ["train.steps=4", "checkpoint.interval=2", "checkpoint.keep_last=5"]


def records(run_dir: Path) -> dict[int, dict]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec
    return out


SOURCES = {
    "single_zero0": (1, ["parallel.zero_stage=0"]),
    "tp2_pp2_zero1": (4, ["parallel.tensor=2", "parallel.pipeline=2"]),
    "dp2_zero2": (2, ["parallel.zero_stage=2"]),
}


@pytest.fixture(scope="module")
def sources(tiny_corpus, tmp_path_factory):
    """Source runs, trained on first use (so a -k selection runs only the sources it needs)."""
    root = tmp_path_factory.mktemp("reshard")
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            world, layout = SOURCES[name]
            run = root / name
            cfg = tiny_recipe(root / f"{name}.yaml", tiny_corpus, run)
            run_distributed(TRAIN, world, config=str(cfg), overrides=layout + STEPS)
            done[name] = run
        return done[name]

    return get, root


# (source, target world, target layout): together TP 1<->2, PP 1<->2, DP 1<->2 and ZeRO
# 0 -> 1, 0 -> 3, 1 -> 0, 2 -> 1.
CASES = {
    "tp1pp1_to_tp2pp2_zero0_to_1": (
        "single_zero0",
        4,
        ["parallel.tensor=2", "parallel.pipeline=2"],
    ),
    "dp1_to_dp2_zero0_to_3": ("single_zero0", 2, ["parallel.zero_stage=3"]),
    "tp2pp2_to_tp1pp1_zero1_to_0": ("tp2_pp2_zero1", 1, ["parallel.zero_stage=0"]),
    "dp2_to_dp1_zero2_to_1": ("dp2_zero2", 1, ["parallel.zero_stage=1"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_resharded_resume_matches_unresharded(case, sources, tiny_corpus):
    get, root = sources
    src, world, layout = CASES[case]
    run = root / case
    cfg = tiny_recipe(root / f"{case}.yaml", tiny_corpus, run)
    load = get(src) / "checkpoints" / "step_0000002"
    res = run_distributed(
        TRAIN, world, config=str(cfg), overrides=layout + STEPS + [f"checkpoint.load={load}"]
    )
    # Resumed at step 2 (a run that ignored checkpoint.load would also end at step 4), step
    # and data position continue.
    assert res[0] == {"step": 4, "consumed_samples": 32, "resumed": 2}
    want, got = records(get(src)), records(run)
    assert sorted(got) == [3, 4], "the resumed run starts at step 3"
    for step in (3, 4):
        assert got[step]["lr"] == pytest.approx(want[step]["lr"], rel=1e-12), "LR schedule"
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-5), (
            f"{case}: step {step} loss {got[step]['loss']} after a resharded resume != "
            f"{want[step]['loss']} unresharded"
        )
    # Not vacuous: the moments and weights moved the loss between the two steps.
    assert got[3]["loss"] != got[4]["loss"]


def test_offline_convert_to_new_layout_then_resume(sources, tiny_corpus):
    """`megagpt convert --to megagpt --tp 2 --pp 2` re-cuts a checkpoint (weights, Adam moments
    and step) offline; resuming from it continues like the unresharded run."""
    from megagpt.cli import main

    get, root = sources
    src = get("single_zero0")
    out = root / "converted_tp2"
    assert (
        main(
            [
                "convert",
                "--input",
                str(src / "checkpoints" / "step_0000002"),
                "--output",
                str(out),
                "--to",
                "megagpt",
                "--tp",
                "2",
                "--pp",
                "2",
            ]
        )
        == 0
    )
    assert (out / "latest").read_text().strip() == "step_0000002"
    files = sorted(p.name for p in (out / "step_0000002" / "layout_free").iterdir())
    assert "tp01-pp01.exp_avg_sq.safetensors" in files
    run = root / "from_converted"
    cfg = tiny_recipe(root / "from_converted.yaml", tiny_corpus, run)
    run_distributed(
        TRAIN,
        4,
        config=str(cfg),
        overrides=["parallel.tensor=2", "parallel.pipeline=2"] + STEPS + [f"checkpoint.load={out}"],
    )
    want, got = records(src), records(run)
    for step in (3, 4):
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-5)


def test_training_checkpoint_converts_to_the_run_model_directory(sources, tmp_path):
    """The record of the last checkpoint holds exactly the weights of <run.dir>/model."""
    import torch

    from megagpt.checkpoint import load_tensors
    from megagpt.cli import main

    get, _ = sources
    src = get("single_zero0")
    assert (
        main(["convert", "--input", str(src), "--output", str(tmp_path / "m"), "--to", "megagpt"])
        == 0
    )
    got, want = load_tensors(str(tmp_path / "m")), load_tensors(str(src / "model"))
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert (tmp_path / "m" / "tokenizer" / "tokenizer.json").is_file()


@pytest.mark.parametrize(
    "target",
    [
        ["parallel.tensor=2", "parallel.zero_stage=0"],
        ["parallel.pipeline=2", "parallel.zero_stage=1"],
    ],
)
def test_bf16_resharded_resume(target, tiny_corpus, tmp_path):
    """bf16 (fp32 masters in DeepSpeed's bf16 optimizer / ZeRO): a DP1 ZeRO-1 checkpoint resumes
    at TP2 ZeRO-0 or PP2 ZeRO-1 and continues like the source run, to bf16 precision."""
    bf16 = ["train.precision=bf16"]
    src = tmp_path / "src"
    run_distributed(
        TRAIN,
        1,
        config=str(tiny_recipe(tmp_path / "s.yaml", tiny_corpus, src)),
        overrides=bf16 + STEPS,
    )
    run = tmp_path / "dst"
    res = run_distributed(
        TRAIN,
        2,
        config=str(tiny_recipe(tmp_path / "d.yaml", tiny_corpus, run)),
        overrides=bf16
        + target
        + STEPS
        + [f"checkpoint.load={src / 'checkpoints' / 'step_0000002'}"],
    )
    assert res[0] == {"step": 4, "consumed_samples": 32, "resumed": 2}
    want, got = records(src), records(run)
    assert sorted(got) == [3, 4], "the resumed run starts at step 3"
    for step in (3, 4):
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=2e-2)
        assert got[step]["lr"] == pytest.approx(want[step]["lr"], rel=1e-6)
