"""`megagpt train` end to end on a tiny real dataset: run directory, exact resume, crash safety."""

from __future__ import annotations

import json

import pytest
import yaml

from megagpt.model.matmul import onednn_unavailable
from tests.distributed.conftest import losses_by_step as losses
from tests.distributed.conftest import tiny_recipe
from tests.distributed.launcher import run_distributed

TRAIN = "tests.distributed.workers:train_run"


def test_run_directory_contents(tiny_corpus, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_recipe(tmp_path / "r.yaml", tiny_corpus, run)
    res = run_distributed(TRAIN, 1, config=str(cfg), overrides=["train.eval_interval=3"])
    assert res[0] == {"step": 6, "consumed_samples": 48, "resumed": 0}
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["model"]["num_layers"] == 4 and resolved["model"]["vocab_size"] == 1024
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "lr", "tokens_per_s", "grad_norm", "tflops_per_device"):
        assert all(isinstance(r[key], float) for r in steps), key
    assert steps[-1]["loss"] < steps[0]["loss"], "loss must go down on real text"
    assert [r["step"] for r in records if "valid_loss" in r] == [3, 6]
    ckpt = run / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_0000006"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step_0000003", "step_0000006"]


@pytest.mark.parametrize(
    "world,layout",
    [
        (1, []),
        # oneDNN's fp32 GEMMs (train.cpu_matmul=auto on an AMD CPU, the BLAS on others)
        pytest.param(
            1,
            ["train.cpu_matmul=onednn"],
            marks=pytest.mark.skipif(
                onednn_unavailable() is not None, reason=str(onednn_unavailable())
            ),
        ),
        (2, ["parallel.tensor=2"]),
        (2, ["parallel.pipeline=2"]),
        # dropout on: the RNG streams must come back too
        (1, ["model.dropout=0.1", "model.attention_dropout=0.1"]),
        # sequence parallel with dropout: the TP-region dropout streams come back per rank
        (
            2,
            [
                "parallel.tensor=2",
                "parallel.sequence_parallel=true",
                "model.dropout=0.1",
                "model.attention_dropout=0.1",
            ],
        ),
        # DeepSpeed's native files as well (checkpoint.native): resume takes them when it can
        (1, ["checkpoint.native=true", "model.dropout=0.1"]),
        # bf16: fp32 masters in DeepSpeed's bf16 optimizer (ZeRO 0) and in ZeRO 1's partitions
        (1, ["train.precision=bf16", "parallel.zero_stage=0"]),
        (1, ["train.precision=bf16", "parallel.zero_stage=1"]),
    ],
)
def test_resume_is_exact(tiny_corpus, tmp_path, world, layout):
    """6 steps straight == 3 steps, stop, resume to 6 (fp32, CPU): identical losses."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    cfg_a = tiny_recipe(tmp_path / "a.yaml", tiny_corpus, straight)
    cfg_b = tiny_recipe(tmp_path / "b.yaml", tiny_corpus, split)
    run_distributed(TRAIN, world, config=str(cfg_a), overrides=layout)
    run_distributed(TRAIN, world, config=str(cfg_b), overrides=layout + ["train.steps=3"])
    assert sorted(losses(split)) == [1, 2, 3]
    res = run_distributed(TRAIN, world, config=str(cfg_b), overrides=layout)
    # Resumed from step 3: a run that ignored its checkpoint would train the same seeded steps
    # 1-6 again and log the same losses.
    assert [r["resumed"] for r in res] == [3] * world
    assert res[0]["step"] == 6
    a, b = losses(straight), losses(split)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert b[step] == a[step], f"step {step}: resumed {b[step]} != straight {a[step]}"


def test_half_written_checkpoint_is_ignored(tiny_corpus, tmp_path):
    """A crash while saving leaves `latest` at the previous checkpoint; resume uses that one."""
    run = tmp_path / "run"
    cfg = tiny_recipe(tmp_path / "r.yaml", tiny_corpus, run)
    run_distributed(TRAIN, 1, config=str(cfg), overrides=["train.steps=3"])
    partial = run / "checkpoints" / "step_0000006"
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    # train_report says which step the run resumed from: 3 (not 0, a fresh start, which would
    # also end at step 4, nor the half-written 6).
    res = run_distributed(
        "tests.distributed.test_checkpoint_safety:train_report",
        1,
        config=str(cfg),
        overrides=["train.steps=4"],
    )
    assert res[0]["resumed"] == 3 and res[0]["step"] == 4
    assert sorted(losses(run)) == [1, 2, 3, 4]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000004"


def test_keep_last_prunes_old_checkpoints(tiny_corpus, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_recipe(tmp_path / "r.yaml", tiny_corpus, run)
    run_distributed(
        TRAIN, 1, config=str(cfg), overrides=["checkpoint.interval=1", "checkpoint.keep_last=2"]
    )
    kept = sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())
    assert kept == ["step_0000005", "step_0000006"]


@pytest.mark.parametrize(
    "world,layout", [(2, ["parallel.pipeline=2"]), (2, ["parallel.zero_stage=3"])]
)
def test_final_model_directory_is_layout_free(tiny_corpus, tmp_path, world, layout):
    """<run.dir>/model written from a sharded run loads at TP=1 and TP=2 with equal logits."""
    run = tmp_path / "run"
    cfg = tiny_recipe(tmp_path / "r.yaml", tiny_corpus, run)
    run_distributed(TRAIN, world, config=str(cfg), overrides=layout + ["train.steps=2"])
    model = run / "model"
    assert (model / "config.json").is_file() and (model / "tokenizer" / "tokenizer.json").is_file()
    tokens = [[5, 17, 300, 2, 9, 41, 7, 8]]
    one = run_distributed(
        "tests.distributed.workers:logits_of_model_dir", 1, directory=str(model), tokens=tokens
    )[0]
    two = run_distributed(
        "tests.distributed.workers:logits_of_model_dir",
        2,
        directory=str(model),
        tokens=tokens,
        tp=2,
    )[0]
    import torch

    a, b = torch.tensor(one), torch.tensor(two)
    assert a.shape == (8, 1, 1024)
    assert torch.allclose(a, b, atol=1e-5)


def test_batch_size_ramp(tiny_corpus, tmp_path):
    """train.rampup_batch_size=[4, 4, 8]: 4-sequence batches until 8 samples, then 8."""
    run = tmp_path / "run"
    cfg = tiny_recipe(tmp_path / "r.yaml", tiny_corpus, run)
    res = run_distributed(
        TRAIN, 1, config=str(cfg), overrides=["train.rampup_batch_size=[4, 4, 8]", "train.steps=5"]
    )
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_batch"] for r in records if "loss" in r] == [4, 4, 8, 8, 8]
    assert res[0]["consumed_samples"] == 32
