"""`megagpt finetune` end to end on poetry and a src+tgt csv: epochs, evaluation, noam, layouts,
start points, padding-free perplexity.

Process starts dominate the time on a small CPU, so one reference run (poetry, one process,
2 epochs) is shared by the tests that compare against it.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from megagpt.training.schedules import noam_multiplier
from tests.distributed.launcher import run_distributed
from tests.conftest import POETRY_TEST, POETRY_TRAIN, shared_path
from tests.unit.inference.conftest import shared_assets

FT = "tests.distributed.gen_workers:finetune_run"


def _short_poems(path: Path, n: int) -> str:
    # 5-character quatrains (24 characters with punctuation) fit a 40-token sample untruncated.
    lines = [x for x in path.read_text("utf-8").splitlines() if len(json.loads(x)["text1"]) <= 24]
    return "".join(x + "\n" for x in lines[:n])


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    assets = shared_assets(tmp_path_factory)
    root = tmp_path_factory.mktemp("ft")
    train, test = root / "poetry_train.jsonl", root / "poetry_test.jsonl"
    train.write_text(_short_poems(shared_path(POETRY_TRAIN), 48), "utf-8")
    test.write_text(_short_poems(shared_path(POETRY_TEST), 12), "utf-8")
    # src+tgt: first line of a poem -> its second line, with renamed columns, as csv.
    qa = root / "qa.csv"
    with open(qa, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["first", "second"])
        for line in shared_path(POETRY_TRAIN).read_text("utf-8").splitlines()[:40]:
            parts = json.loads(line)["text1"].split("，")
            w.writerow([parts[0] + "，", parts[1].split("。")[0] + "。"])
    return {
        "root": root,
        "model": assets["model"],
        "train": str(train),
        "test": str(test),
        "qa": str(qa),
    }


def recipe(path: Path, setup: dict, run_dir: Path, **finetune: str) -> Path:
    keys = {
        "train_file": setup["train"],
        "eval_file": setup["test"],
        "src_column": "text1",
        "seq_length": 40,
        "epochs": 2,
        "init_from": setup["model"],
        "eval_at_start": "true",
        **finetune,
    }
    section = "".join(f"  {k}: {v}\n" for k, v in keys.items())
    path.write_text(
        f"""model:
  dropout: 0.0
  attention_dropout: 0.0
optim:
  lr: 3.0e-3
  schedule: noam
  warmup_steps: 4
train:
  steps: 0
  global_batch_size: 8
  micro_batch_size: 4
  precision: fp32
  log_interval: 1
logging:
  wandb: disabled
checkpoint:
  interval: 6
finetune:
{section}run:
  dir: {run_dir}
""",
        encoding="utf-8",
    )
    return path


def records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def evals(run_dir: Path) -> list[dict]:
    return [r for r in records(run_dir) if "valid_loss" in r]


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory) -> Path:
    """Poetry continuation, one process, 48 poems, 2 epochs of 6 steps."""
    run = tmp_path_factory.mktemp("ref") / "run"
    cfg = recipe(run.parent / "ft.yaml", setup, run)
    res = run_distributed(FT, 1, config=str(cfg), overrides=[])
    assert res[0] == {"step": 12, "consumed_samples": 96}
    return run


def test_poetry_continuation_epochs_noam_and_export(reference):
    ev = evals(reference)
    assert [r["step"] for r in ev] == [0, 6, 12] and [r["epoch"] for r in ev] == [0, 1, 2]
    assert ev[-1]["valid_ppl"] < ev[0]["valid_ppl"] / 5, "fine-tuning must help"
    steps = [r for r in records(reference) if "lr" in r]
    assert len(steps) == 12
    for r in steps:  # the LR of step k (1-based) is lr * noam(k - 1), W = 4
        assert r["lr"] == pytest.approx(3e-3 * noam_multiplier(r["step"] - 1, 4))
    meta = json.loads((reference / "model" / "config.json").read_text())
    assert meta["model"]["seq_length"] == 40 and meta["trained_steps"] == 12


def test_perplexity_ignores_padding(setup, reference, tmp_path):
    """The same poems padded to 40 or 64 tokens give the same starting perplexity."""
    run = tmp_path / "run64"
    cfg = recipe(tmp_path / "64.yaml", setup, run, seq_length="64")
    run_distributed(FT, 1, config=str(cfg), overrides=["train.steps=1"])
    a, b = evals(reference)[0], evals(run)[0]
    assert a["step"] == b["step"] == 0
    assert a["valid_tokens"] == b["valid_tokens"]
    assert b["valid_ppl"] == pytest.approx(a["valid_ppl"], rel=1e-5)


def test_start_from_a_checkpoint_loads_its_weights(setup, reference, tmp_path):
    """init_from the reference's checkpoints: the starting evaluation equals the reference's
    final one (same weights, same data); the step count starts at 0."""
    run = tmp_path / "run"
    cfg = recipe(tmp_path / "c.yaml", setup, run, init_from=str(reference / "checkpoints"))
    res = run_distributed(FT, 1, config=str(cfg), overrides=["train.steps=1"])
    assert res[0]["step"] == 1
    start = evals(run)[0]
    assert start["step"] == 0
    assert start["valid_loss"] == pytest.approx(evals(reference)[-1]["valid_loss"], rel=1e-6)


@pytest.mark.parametrize("layout", [["parallel.pipeline=2"], ["parallel.zero_stage=2"]])
def test_layouts_match_the_single_process(setup, reference, tmp_path, layout):
    """PP=2 and DP=2 (ZeRO-2) fine-tuning: the reference's losses and starting evaluation."""
    run = tmp_path / "run"
    cfg = recipe(tmp_path / "l.yaml", setup, run)
    run_distributed(FT, 2, config=str(cfg), overrides=layout + ["train.steps=3"])
    got = [r["loss"] for r in records(run) if "loss" in r]
    want = [r["loss"] for r in records(reference) if "loss" in r][:3]
    assert got == pytest.approx(want, rel=1e-4)
    assert evals(run)[0]["valid_loss"] == pytest.approx(evals(reference)[0]["valid_loss"], rel=1e-5)


def test_src_tgt_csv_under_tensor_parallel_scores_bleu_and_rouge(setup, tmp_path):
    run = tmp_path / "run"
    cfg = recipe(
        tmp_path / "qa.yaml",
        setup,
        run,
        train_file=setup["qa"],
        eval_file=setup["qa"],
        src_column="first",
        tgt_column="second",
        seq_length=32,
        eval_max_new_tokens=8,
        eval_generate_limit=6,
        eval_at_start="false",
    )
    res = run_distributed(FT, 2, config=str(cfg), overrides=["parallel.tensor=2", "train.steps=3"])
    assert res[0]["step"] == 3
    ev = evals(run)
    assert [r["step"] for r in ev] == [3]
    assert ev[-1]["valid_generated"] == 6
    assert 0.0 <= ev[-1]["valid_bleu"] <= 100.0 and 0.0 <= ev[-1]["valid_rouge_l"] <= 100.0


def test_bleu_and_rouge_pair_each_generation_with_its_own_target(setup, tmp_path):
    """Over two data-parallel ranks, with every continuation known (the source echoed):
    the logged scores are those of (source_i, target_i) for the first rows of the eval file,
    each the tokenizer's rendering; neither the prompt nor another row's text is scored."""
    from megagpt.checkpoint.model_dir import tokenizer_path
    from megagpt.data.tokenizer import build_tokenizer
    from megagpt.training import text_metrics

    pytest.importorskip("sacrebleu")
    pytest.importorskip("rouge_score")
    run, n = tmp_path / "run", 6
    # Targets that share most characters with their own source and few with another row's:
    # the first line of each poem with its comma turned into a full stop.
    with open(setup["qa"], encoding="utf-8", newline="") as f:
        sources = [r["first"] for r in csv.DictReader(f)]
    rows = [(src, src.replace("，", "。")) for src in sources]
    qa = tmp_path / "echo.csv"
    with open(qa, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([("first", "second"), *rows])
    cfg = recipe(
        tmp_path / "qa.yaml",
        setup,
        run,
        train_file=str(qa),
        eval_file=str(qa),
        src_column="first",
        tgt_column="second",
        seq_length=32,
        eval_max_new_tokens=8,
        eval_generate_limit=n,
        eval_at_start="false",
    )
    run_distributed(
        "tests.distributed.gen_workers:finetune_echo_run",
        2,
        config=str(cfg),
        overrides=["train.steps=1"],
    )
    tok = build_tokenizer(tokenizer_path(setup["model"]))
    preds = [tok.decode(tok.encode(src)) for src, _ in rows[:n]]
    refs = [tok.decode(tok.encode(tgt)) for _, tgt in rows[:n]]
    ev = evals(run)[-1]
    assert ev["valid_generated"] == n
    assert ev["valid_bleu"] == pytest.approx(text_metrics.bleu(preds, refs), abs=1e-9)
    assert ev["valid_rouge_l"] == pytest.approx(text_metrics.rouge_l(preds, refs), abs=1e-9)
    # Not vacuous: rows paired in another order, the prompt scored with its continuation, or
    # the source taken as the reference, each scores differently.
    shifted = refs[1:] + refs[:1]
    assert text_metrics.rouge_l(preds, shifted) < ev["valid_rouge_l"] - 10
    assert text_metrics.bleu([p + p for p in preds], refs) != pytest.approx(ev["valid_bleu"])
    assert text_metrics.bleu(preds, preds) > ev["valid_bleu"] + 10


def test_eval_tasks_run_at_each_fine_tuning_evaluation(setup, tmp_path):
    """train.eval_tasks is not a pretraining-only key: fine-tuning logs the task beside its
    validation perplexity (it was silently ignored)."""
    pytest.importorskip("lm_eval")
    run = tmp_path / "run"
    cfg = recipe(tmp_path / "ft.yaml", setup, run)
    run_distributed(
        FT,
        1,
        config=str(cfg),
        overrides=["train.steps=1", "train.eval_tasks=[megagpt_zh_mc]", "train.eval_tasks_limit=4"],
    )
    tasks = [r for r in records(run) if "eval/megagpt_zh_mc/acc" in r]
    # At the start (eval_at_start) and where the run stops, with each validation.
    assert [r["step"] for r in tasks] == [r["step"] for r in evals(run)] == [0, 1]
    assert 0.0 <= tasks[0]["eval/megagpt_zh_mc/acc"] <= 1.0
