"""NaN/Inf in training, injected for real: a NaN loss, a NaN gradient with a finite loss, a NaN
weight. A bad step is skipped with the weights untouched on every layout and precision;
``train.max_bad_steps`` in a row stop the run (exit 3) with no new checkpoint and no model
directory; non-finite weights are never saved; metrics.jsonl stays strict JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.distributed.conftest import tiny_recipe
from tests.distributed.launcher import run_distributed

WORKERS = "tests.distributed.fault_workers"


def _strict(text: str) -> list[dict]:
    """metrics.jsonl parsed as strict JSON (Python's NaN/Infinity literals are refused)."""

    def refuse(name):
        raise ValueError(f"non-JSON literal {name}")

    return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]


@pytest.mark.parametrize(
    "world,mode,layout",
    [
        (1, "grad", ["parallel.zero_stage=0"]),  # torch's AdamW inside DeepSpeed: our guard
        (1, "loss", ["parallel.zero_stage=0"]),
        (2, "loss", ["parallel.zero_stage=0", "parallel.tensor=2"]),
        (2, "grad", ["parallel.zero_stage=0", "parallel.pipeline=2"]),
        (2, "grad", ["parallel.zero_stage=1"]),  # DeepSpeed's ZeRO optimizer, DP=2
        (1, "loss", ["train.precision=bf16", "parallel.zero_stage=0"]),  # BF16_Optimizer
        (1, "grad", ["train.precision=bf16", "parallel.zero_stage=1"]),
    ],
)
def test_nonfinite_step_is_skipped_with_weights_untouched(world, mode, layout):
    """Step 2 of 3 gets a NaN loss or a NaN gradient: that step is skipped with every fp32
    master and the Adam step exactly as before; the next step trains normally."""
    steps = run_distributed(f"{WORKERS}:engine_skip", world, overrides=layout, mode=mode)[0]
    good, bad, after = steps["steps"]
    assert not good["skipped"] and not good["unchanged"], "a good step must change the weights"
    assert bad["skipped"], bad
    assert bad["unchanged"] and bad["adam_step_unchanged"], "a NaN was stepped into the weights"
    assert not after["skipped"] and not after["unchanged"]
    assert after["loss"] == after["loss"], "the weights after the skipped step must be finite"


def _run(tmp_path: Path, tiny_corpus, world: int, overrides: list[str], **fault):
    """``megagpt train`` with a fault; (exit status, rank 0's log) (0 and '' on success)."""
    run = tmp_path / "run"
    cfg = tiny_recipe(tmp_path / "r.yaml", tiny_corpus, run)
    try:
        run_distributed(
            f"{WORKERS}:cli_train_with_fault", world, config=str(cfg), overrides=overrides, **fault
        )
    except AssertionError as e:
        text = str(e)
        code = int(text.split("exited ", 1)[1].split(":", 1)[0])
        return run, code, text
    return run, 0, ""


@pytest.mark.parametrize(
    "world,layout",
    [
        (1, ["parallel.zero_stage=0"]),
        (2, ["parallel.zero_stage=1"]),
        (1, ["train.precision=bf16", "parallel.zero_stage=1"]),
    ],
)
def test_consecutive_bad_steps_stop_without_saving(tiny_corpus, tmp_path, world, layout):
    """NaN gradients from step 3 on, train.max_bad_steps=2, a checkpoint every step: the run
    stops at step 4 with exit 3 and one error line; `latest` stays at step 2, no checkpoint of
    a bad step, no model directory."""
    run, code, log = _run(
        tmp_path,
        tiny_corpus,
        world,
        layout + ["train.max_bad_steps=2", "checkpoint.interval=1"],
        mode="grad",
        from_step=3,
    )
    assert code == 3, log
    assert "megagpt train: error:" in log and "2 consecutive bad steps (steps 3-4" in log, log
    assert "Traceback" not in log
    assert "step 3: bad step (grad norm is" in log and "skipped, weights unchanged" in log
    ckpt = run / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_0000002"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step_0000001", "step_0000002"]
    assert not (run / "model").exists()
    records = _strict((run / "metrics.jsonl").read_text())
    bad = [r for r in records if r["step"] == 4][0]
    assert bad["grad_norm"] is None and bad["grad_norm_nonfinite"] is True
    assert bad["bad_steps"] == 2 and bad["skipped_steps"] == 2


def test_transient_nan_is_skipped_and_the_run_finishes(tiny_corpus, tmp_path):
    """One NaN loss (step 2 of 4): skipped, logged as null plus a flag, and the run ends
    normally with its model directory."""
    run, code, log = _run(tmp_path, tiny_corpus, 1, ["train.steps=4"], mode="loss", at=[2])
    assert code == 0, log
    records = _strict((run / "metrics.jsonl").read_text())
    by_step = {r["step"]: r for r in records}
    assert sorted(by_step) == [1, 2, 3, 4]
    assert by_step[2]["loss"] is None and by_step[2]["loss_nonfinite"] is True
    assert by_step[4]["bad_steps"] == 1 and by_step[4]["skipped_steps"] == 1
    assert all(isinstance(by_step[s]["loss"], float) for s in (1, 3, 4))
    assert (run / "model" / "config.json").is_file()


def test_nonfinite_weights_are_never_saved_or_exported(tiny_corpus, tmp_path):
    """A weight turns NaN at step 4 (below max_bad_steps): the final save and the export see
    it and stop the run; `latest` stays at step 3."""
    run, code, log = _run(
        tmp_path, tiny_corpus, 1, ["train.steps=5", "train.max_bad_steps=10"], mode="weight", at=[4]
    )
    assert code == 3, log
    assert "the weights at step 5 are not finite" in log, log
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000003"
    assert not (run / "checkpoints" / "step_0000005").exists()
    assert not (run / "model").exists()


def test_rewind_to_the_last_checkpoint_skips_the_bad_batches(tiny_corpus, tmp_path):
    """NaN gradients at steps 4 and 5 with train.rewind_on_bad_steps=1: back to the step-2
    checkpoint, the batches of steps 3-5 skipped (samples 16-39), and the run finishes: each
    step logged once, step 3 now reads samples 40-47."""
    run, code, log = _run(
        tmp_path,
        tiny_corpus,
        1,
        ["train.max_bad_steps=2", "train.rewind_on_bad_steps=1", "checkpoint.interval=2"],
        mode="grad",
        at=[4, 5],
    )
    assert code == 0, log
    records = _strict((run / "metrics.jsonl").read_text())
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    by_step = {r["step"]: r for r in records}
    assert by_step[2]["consumed_samples"] == 16 and by_step[3]["consumed_samples"] == 48
    assert by_step[6]["consumed_samples"] == 72 and by_step[6]["bad_steps"] == 2
    assert all(isinstance(r["loss"], float) and isinstance(r["grad_norm"], float) for r in records)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000006"
    assert (run / "model" / "config.json").is_file()


def test_rewinds_are_limited(tiny_corpus, tmp_path):
    """Bad for good from step 3: one rewind, then the second streak stops the run (exit 3)."""
    run, code, log = _run(
        tmp_path,
        tiny_corpus,
        1,
        ["train.max_bad_steps=2", "train.rewind_on_bad_steps=1", "checkpoint.interval=2"],
        mode="grad",
        from_step=3,
    )
    assert code == 3, log
    assert "rewound to step 2 (rewind 1/1); skipping samples 16-31" in log, log
    assert "megagpt train: error:" in log and "Traceback" not in log
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    assert not (run / "model").exists()


def test_loss_spikes_trigger_a_rewind(tiny_corpus, tmp_path):
    """train.loss_spike_factor=3: two batches with a 50x loss (finite, so applied) at steps 12
    and 13 are a streak of bad steps; the run goes back to the step-10 checkpoint, skips the
    batches of steps 11-13 and finishes with each step logged once."""
    run, code, log = _run(
        tmp_path,
        tiny_corpus,
        1,
        [
            "train.steps=14",
            "train.loss_spike_factor=3",
            "train.max_bad_steps=2",
            "train.rewind_on_bad_steps=1",
            "checkpoint.interval=10",
        ],
        mode="spike",
        at=[12, 13],
    )
    assert code == 0, log
    records = _strict((run / "metrics.jsonl").read_text())
    assert [r["step"] for r in records] == list(range(1, 15))
    by_step = {r["step"]: r for r in records}
    assert by_step[10]["consumed_samples"] == 80 and by_step[11]["consumed_samples"] == 112
    assert by_step[14]["bad_steps"] == 2 and by_step[14]["skipped_steps"] == 0
    assert max(r["loss"] for r in records) < 10.0, "no spiked loss is left in the log"
