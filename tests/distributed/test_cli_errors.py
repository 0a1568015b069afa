"""User errors through the real CLI on every rank: one line `megagpt train: error: ...`, a
non-zero exit, no traceback (every ``MegagptError``); data whose token ids do not fit the
model's vocabulary is refused before training at TP=1 and TP=2."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.conftest import WIKI, read_jsonl
from tests.distributed.conftest import tiny_recipe
from tests.distributed.launcher import run_distributed

CLI = "tests.distributed.fault_workers:cli_train_with_fault"


def _failing(world: int, **kwargs) -> list[tuple[int, str]]:
    """(exit status, log) of each failing rank of a CLI run that must fail."""
    with pytest.raises(AssertionError) as info:
        run_distributed(CLI, world, **kwargs)
    out = []
    for part in str(info.value).split("\n\nrank ")[:world]:
        code = int(part.split("exited ", 1)[1].split(":", 1)[0])
        out.append((code, part.split(":\n", 1)[1]))
    assert len(out) == world, str(info.value)
    return out


def _one_error_line(log: str) -> str:
    lines = [x for x in log.splitlines() if "error:" in x]
    assert len(lines) == 1 and lines[0].startswith("megagpt train: error:"), log
    assert "Traceback" not in log, log
    return lines[0]


@pytest.fixture(scope="module")
def wide_dataset(tiny_corpus, tmp_path_factory) -> str:
    """The tiny corpus's articles preprocessed with a 2048-token tokenizer (the model's
    tokenizer has 1024)."""
    from megagpt.data import make_input_spec, preprocess, train_tokenizer

    root = tmp_path_factory.mktemp("wide")
    docs = read_jsonl(WIKI, 200)
    train_tokenizer(iter(docs), str(root / "tok2048"), vocab_size=2048)
    preprocess(
        [make_input_spec(str(tiny_corpus["root"] / "wiki200.jsonl"))],
        str(root / "tok2048"),
        str(root / "wide"),
        append_eod=True,
        progress=False,
    )
    return str(root / "wide")


@pytest.mark.parametrize("world,layout", [(1, []), (2, ["parallel.tensor=2"])])
@pytest.mark.parametrize("record", [True, False])
def test_dataset_with_a_larger_vocabulary_is_refused(
    tiny_corpus, wide_dataset, tmp_path, world, layout, record
):
    """With its vocab record (preprocessed by megagpt) and without it (scanned): exit 2 before
    any step, naming data.paths[0], the largest id and the model's vocabulary size."""
    prefix = str(tmp_path / "wide")
    for ext in (".bin", ".idx") + ((".vocab.json",) if record else ()):
        os.symlink(wide_dataset + ext, prefix + ext)  # without the record: a legacy dataset
    run = tmp_path / "run"
    cfg = tiny_recipe(tmp_path / "r.yaml", tiny_corpus, run)
    top = int(np.memmap(wide_dataset + ".bin", dtype=np.uint16, mode="r").max())
    assert top >= 1024
    for code, log in _failing(
        world, config=str(cfg), overrides=layout + [f"data.paths=[{prefix}]"]
    ):
        line = _one_error_line(log)
        assert code == 2
        assert f"data.paths[0]={prefix}" in line and "1024" in line and str(top) in line, line
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()


def test_damaged_checkpoint_load_prints_one_line_per_rank(tiny_corpus, tmp_path):
    """checkpoint.load at a model directory whose config.json is damaged: each of 2 ranks exits
    2 with one line naming the file (it used to print a traceback on every rank)."""
    damaged = tmp_path / "model"
    damaged.mkdir()
    (damaged / "config.json").write_text(
        json.dumps({"format": "megagpt-model", "version": 1, "model": {"num_layerz": 4}})
    )
    cfg = tiny_recipe(tmp_path / "r.yaml", tiny_corpus, tmp_path / "run")
    for code, log in _failing(2, config=str(cfg), overrides=[f"checkpoint.load={damaged}"]):
        line = _one_error_line(log)
        assert code == 2 and str(damaged / "config.json") in line and "num_layerz" in line
