"""A tiny real dataset for trainer tests: our tokenizer and preprocessing on shared wiki text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import WIKI, read_jsonl


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> dict:
    """Tokenizer (vocab 1024) and an indexed dataset of 200 wiki articles."""
    from megagpt.data import make_input_spec, preprocess, train_tokenizer

    root = tmp_path_factory.mktemp("corpus")
    docs = read_jsonl(WIKI, 200)
    src = root / "wiki200.jsonl"
    src.write_text(
        "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8"
    )
    train_tokenizer(iter(docs), str(root / "tok"), vocab_size=1024)
    preprocess(
        [make_input_spec(str(src))],
        str(root / "tok"),
        str(root / "wiki"),
        append_eod=True,
        progress=False,
    )
    return {"tokenizer": str(root / "tok"), "prefix": str(root / "wiki"), "root": root}


def losses_by_step(run_dir: Path) -> dict[int, float]:
    """The last logged loss of every step in ``run_dir/metrics.jsonl``."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def tiny_recipe(path: Path, corpus: dict, run_dir: Path, **extra: str) -> Path:
    """A YAML recipe for the gpt3-tiny model on ``corpus`` (fp32, dropout off)."""
    text = f"""model:
  name: gpt3-tiny
  dropout: 0.0
  attention_dropout: 0.0
optim:
  lr: 2.0e-3
  warmup_tokens: 256
  decay_tokens: 100000
train:
  steps: 6
  global_batch_size: 8
  micro_batch_size: 2
  precision: fp32
  log_interval: 1
  eval_interval: 0
data:
  paths: [{corpus["prefix"]}]
  tokenizer: {corpus["tokenizer"]}
  split: "95,5,0"
logging:
  wandb: disabled
checkpoint:
  interval: 3
run:
  dir: {run_dir}
"""
    path.write_text(text, encoding="utf-8")
    return path
