"""Checkpoints a run can trust, end to end on a real run (issue 10, items 1 and 5).

* A pickle payload planted where DeepSpeed's loader would look (``mp_rank_00_model_states.pt``
  and its optimizer file) never runs: train resume of the run's own folder, ``checkpoint.load``,
  ``megagpt convert``, ``megagpt generate``; only ``checkpoint.trust_pickle=true`` reads
  DeepSpeed's native files (and then the payload does run: the control that the test would
  catch the old behaviour).
* A damaged newest checkpoint (truncated safetensors, deleted meta.json, flipped bytes, lost RNG
  file, lost folder) is named and the run resumes from the intact older one, with exactly the
  losses of the uninterrupted run; ``checkpoint.require_latest=true`` fails naming the file.

Offline readers (ModelScope / Hugging Face / model directories, finetune.init_from):
tests/unit/checkpoint/test_pickle_payload.py; the manifest itself: tests/unit/checkpoint/
test_manifest.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.conftest import tiny_recipe
from tests.distributed.launcher import ROOT, run_distributed
from tests.unit.checkpoint.payload import plant

TRAIN = "tests.distributed.workers:train_run"
REPORT = "tests.distributed.test_checkpoint_safety:train_report"
NATIVE = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt")


def train_report(config: str, overrides: list[str]) -> dict:
    """``megagpt train`` in this process; returns the step it resumed from, what the engine
    read, and the final step."""
    from megagpt import parallel
    from megagpt.config import load_config
    from megagpt.training.trainer import Trainer

    trainer = Trainer(load_config(config, overrides))
    resumed = trainer.state.step
    loaded = trainer.checkpoints.loaded_from
    state = trainer.run()
    parallel.destroy()
    return {"resumed": resumed, "loaded_from": loaded, "step": state.step}


def losses(run_dir: Path) -> dict[int, float]:
    """Loss by step; a step logged twice (before and after a resume) keeps the later value."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("loss") is not None:
            out[rec["step"]] = rec["loss"]
    return out


@pytest.fixture(scope="module")
def base(tiny_corpus, tmp_path_factory) -> Path:
    """One real 6-step run: checkpoints step_0000003 and step_0000006 (latest), model/."""
    root = tmp_path_factory.mktemp("base")
    run = root / "run"
    run_distributed(
        TRAIN, 1, config=str(tiny_recipe(root / "r.yaml", tiny_corpus, run)), overrides=[]
    )
    return run


def copy_run(base: Path, tmp_path: Path, corpus: dict) -> tuple[Path, Path]:
    run = tmp_path / "run"
    shutil.copytree(base, run)
    return run, tiny_recipe(tmp_path / "r.yaml", corpus, run)


def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from megagpt.cli import main; sys.exit(main(sys.argv[1:]))",
            *args,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


# -- item 1: no code execution from a checkpoint folder ----------------------------------------


def test_payload_in_own_checkpoint_never_runs(base, tiny_corpus, tmp_path):
    """A payload added next to a valid record: the resume reads the record and never opens the
    pickle; with checkpoint.trust_pickle=true DeepSpeed's loader does open it (the payload runs:
    this is the path every resume took before the fix)."""
    run, cfg = copy_run(base, tmp_path, tiny_corpus)
    marker = tmp_path / "payload_ran"
    for name in NATIVE:
        plant(run / "checkpoints" / "step_0000006" / name, marker)
    res = run_distributed(REPORT, 1, config=str(cfg), overrides=["train.steps=7"])[0]
    assert not marker.exists(), "the planted pickle ran on a plain resume"
    assert res["resumed"] == 6 and res["step"] == 7
    assert "not read: checkpoint.trust_pickle is off" in res["loaded_from"]

    run2, cfg2 = copy_run(base, tmp_path / "trusted", tiny_corpus)
    for name in NATIVE:
        plant(run2 / "checkpoints" / "step_0000006" / name, marker)
    with pytest.raises(AssertionError):  # the payload is no real checkpoint: the load fails
        run_distributed(
            TRAIN, 1, config=str(cfg2), overrides=["train.steps=7", "checkpoint.trust_pickle=true"]
        )
    assert marker.exists(), "control: with trust_pickle the native files are read"


def test_checkpoint_load_of_a_native_only_folder_is_refused(tiny_corpus, tmp_path):
    """checkpoint.load at a folder holding only DeepSpeed pickles: refused, naming the file and
    the key to set; nothing ran."""
    marker = tmp_path / "payload_ran"
    ext = tmp_path / "ext" / "step_0000003"
    for name in NATIVE:
        plant(ext / name, marker)
    cfg = tiny_recipe(tmp_path / "r.yaml", tiny_corpus, tmp_path / "run")
    with pytest.raises(AssertionError) as e:
        run_distributed(TRAIN, 1, config=str(cfg), overrides=[f"checkpoint.load={ext}"])
    assert str(ext / "mp_rank_00_model_states.pt") in str(e.value)
    assert "checkpoint.trust_pickle=true" in str(e.value)
    assert not marker.exists(), "the planted pickle ran through checkpoint.load"


def test_checkpoint_load_reads_the_record_beside_a_payload(base, tiny_corpus, tmp_path):
    marker = tmp_path / "payload_ran"
    ext = tmp_path / "ext"
    shutil.copytree(base / "checkpoints", ext)
    for name in NATIVE:
        plant(ext / "step_0000006" / name, marker)
    cfg = tiny_recipe(tmp_path / "r.yaml", tiny_corpus, tmp_path / "run")
    res = run_distributed(
        REPORT, 1, config=str(cfg), overrides=[f"checkpoint.load={ext}", "train.steps=7"]
    )[0]
    assert res["resumed"] == 6 and res["step"] == 7
    assert not marker.exists(), "the planted pickle ran through checkpoint.load"


def test_convert_and_generate_never_unpickle(base, tmp_path):
    """`megagpt convert` of a checkpoint with planted pickles converts from the record; of a
    native-only folder it fails with one line naming the file. `megagpt generate` (through
    pipeline(...)) ignores pickles beside the weights and refuses one in their place."""
    marker = tmp_path / "payload_ran"
    ckpts = tmp_path / "ckpts"
    shutil.copytree(base / "checkpoints", ckpts)
    for name in NATIVE:
        plant(ckpts / "step_0000006" / name, marker)
    ok = cli("convert", "--input", str(ckpts), "--output", str(tmp_path / "m"), "--to", "megagpt")
    assert ok.returncode == 0, ok.stderr
    native = tmp_path / "native" / "step_0000006"
    plant(native / NATIVE[0], marker)
    bad = cli("convert", "--input", str(native), "--output", str(tmp_path / "m2"), "--to", "hf")
    assert bad.returncode != 0 and NATIVE[0] in bad.stderr

    model = tmp_path / "model"
    shutil.copytree(base / "model", model)
    plant(model / "pytorch_model.bin", marker)
    plant(model / "model.pt", marker)
    gen = cli(
        "generate",
        "--model",
        str(model),
        "--prompt",
        "hello",
        "--max-new-tokens",
        "2",
        "--top-k",
        "1",
    )
    assert gen.returncode == 0, gen.stderr
    (model / "model.safetensors").unlink()
    plant(model / "model.safetensors", marker)
    gen = cli("generate", "--model", str(model), "--prompt", "hello", "--max-new-tokens", "2")
    assert gen.returncode != 0 and str(model / "model.safetensors") in gen.stderr
    assert not marker.exists(), "a planted pickle ran through convert or generate"


def test_trust_pickle_keeps_the_native_resume_exact(tiny_corpus, tmp_path):
    """checkpoint.native + checkpoint.trust_pickle: DeepSpeed's own load is still used and the
    resume is exact (dropout on: the RNG comes back too)."""
    layout = ["checkpoint.native=true", "checkpoint.trust_pickle=true", "model.dropout=0.1"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_distributed(
        TRAIN,
        1,
        config=str(tiny_recipe(tmp_path / "a.yaml", tiny_corpus, straight)),
        overrides=layout,
    )
    cfg = tiny_recipe(tmp_path / "b.yaml", tiny_corpus, split)
    run_distributed(TRAIN, 1, config=str(cfg), overrides=layout + ["train.steps=3"])
    res = run_distributed(REPORT, 1, config=str(cfg), overrides=layout)[0]
    assert res["resumed"] == 3 and "DeepSpeed native" in res["loaded_from"]
    a, b = losses(straight), losses(split)
    assert all(b[s] == a[s] for s in range(1, 7))


# -- item 5: a damaged newest checkpoint --------------------------------------------------------


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


PARAM = "layout_free/tp00-pp00.param.safetensors"
FAULTS = {
    "truncated safetensors": (lambda c: _truncate(c / PARAM), PARAM),
    "missing meta.json": (
        lambda c: (c / "layout_free" / "meta.json").unlink(),
        "layout_free/meta.json",
    ),
    "flipped bytes": (
        lambda c: _flip(c / "layout_free/tp00-pp00.exp_avg.safetensors"),
        "layout_free/tp00-pp00.exp_avg.safetensors",
    ),
    "missing rng file": (lambda c: (c / "rng" / "pp000-tp000.pt").unlink(), "rng/pp000-tp000.pt"),
    "lost folder": (lambda c: shutil.rmtree(c), "step_0000006 does not exist"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_damaged_newest_checkpoint_falls_back(base, tiny_corpus, tmp_path, fault):
    damage, name = FAULTS[fault]
    run, cfg = copy_run(base, tmp_path, tiny_corpus)
    newest = run / "checkpoints" / "step_0000006"
    damage(newest)
    with pytest.raises(AssertionError) as e:
        run_distributed(
            TRAIN, 1, config=str(cfg), overrides=["train.steps=7", "checkpoint.require_latest=true"]
        )
    assert name in str(e.value) and "require_latest" in str(e.value)
    res = run_distributed(REPORT, 1, config=str(cfg), overrides=["train.steps=7"])[0]
    assert res["resumed"] == 3 and res["step"] == 7
    got, want = losses(run), losses(base)
    assert [got[s] for s in (4, 5, 6)] == [want[s] for s in (4, 5, 6)], (
        "the fall-back resume must be the exact continuation of step 3"
    )
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000007"
    if fault != "lost folder":
        assert (run / "checkpoints" / "step_0000006.damaged").is_dir()


def test_fallback_under_two_ranks(tiny_corpus, tmp_path):
    """TP=2: the ranks share the verification (collective) and agree on the fall-back."""
    run = tmp_path / "run"
    cfg = tiny_recipe(tmp_path / "r.yaml", tiny_corpus, run)
    layout = ["parallel.tensor=2", "checkpoint.interval=2"]
    run_distributed(TRAIN, 2, config=str(cfg), overrides=layout + ["train.steps=4"])
    want = losses(run)
    _truncate(run / "checkpoints" / "step_0000004" / "layout_free/tp01-pp00.param.safetensors")
    res = run_distributed(REPORT, 2, config=str(cfg), overrides=layout + ["train.steps=4"])
    assert [r["resumed"] for r in res] == [2, 2]
    got = losses(run)
    assert [got[3], got[4]] == [want[3], want[4]]
