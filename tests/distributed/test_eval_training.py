"""train.eval_tasks: lm-eval tasks run at validation during pretraining, logged once per step,
at TP=1 and TP=2, without changing the training itself."""

from __future__ import annotations

import json

import pytest

from tests.distributed.conftest import losses_by_step, tiny_recipe
from tests.distributed.launcher import run_distributed

pytest.importorskip("lm_eval")

TRAIN = "tests.distributed.workers:train_run"
TASK = "megagpt_zh_mc"
EVAL = [f"train.eval_tasks=[{TASK}]", "train.eval_tasks_limit=8", "train.eval_interval=2"]


def _records(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_eval_tasks_are_logged_and_leave_training_unchanged(tiny_corpus, tmp_path):
    # Dropout draws from the torch RNG; 4 steps with evaluations after steps 2 and 4.
    short = ["model.dropout=0.1", "model.attention_dropout=0.1", "train.steps=4"]
    with_tasks, without = tmp_path / "with", tmp_path / "without"
    run_distributed(
        TRAIN,
        1,
        config=str(tiny_recipe(tmp_path / "a.yaml", tiny_corpus, with_tasks)),
        overrides=EVAL + short,
    )
    run_distributed(
        TRAIN,
        1,
        config=str(tiny_recipe(tmp_path / "b.yaml", tiny_corpus, without)),
        overrides=["train.eval_interval=2"] + short,
    )
    evals = [r for r in _records(with_tasks) if f"eval/{TASK}/acc" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert 0.0 <= r[f"eval/{TASK}/acc"] <= 1.0 and f"eval/{TASK}/acc_norm" in r
    # lm-eval reseeds the global generators; they are restored, so the dropout draws and the
    # losses after an evaluation are those of a run without tasks.
    assert losses_by_step(with_tasks) == losses_by_step(without)
    assert not [r for r in _records(without) if any(k.startswith("eval/") for k in r)]


def test_eval_tasks_under_tensor_parallelism(tiny_corpus, tmp_path):
    run = tmp_path / "tp2"
    run_distributed(
        TRAIN,
        2,
        config=str(tiny_recipe(tmp_path / "r.yaml", tiny_corpus, run)),
        overrides=EVAL + ["parallel.tensor=2", "train.steps=2"],
    )
    evals = [r for r in _records(run) if f"eval/{TASK}/acc" in r]
    assert [r["step"] for r in evals] == [2]  # every TP rank ran the model; one rank wrote


def test_eval_tasks_config_is_checked_before_training(tiny_corpus, tmp_path):
    from megagpt.config import ConfigError, load_config, validate

    cfg_path = tiny_recipe(tmp_path / "r.yaml", tiny_corpus, tmp_path / "run")
    cfg = load_config(
        str(cfg_path),
        [f"train.eval_tasks=[{TASK}]", "train.eval_interval=0", "parallel.pipeline=2"],
    )
    with pytest.raises(ConfigError) as err:
        validate(cfg, 2, cuda=False)
    assert "train.eval_tasks needs train.eval_interval > 0" in str(err.value)
    assert "train.eval_tasks cannot run with parallel.pipeline=2" in str(err.value)
