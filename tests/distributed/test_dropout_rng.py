"""Dropout across tensor-parallel ranks: heads held by different TP ranks get their own masks,
replicated activations get the same mask on every TP rank (megagpt/model/rng.py)."""

from __future__ import annotations

from tests.distributed.conftest import tiny_recipe
from tests.distributed.launcher import run_distributed

DRAWS = "tests.distributed.workers:dropout_draws"
DROPOUT = [
    "model.dropout=0.1",
    "model.attention_dropout=0.1",
    "train.steps=1",
    "checkpoint.interval=0",
    "parallel.tensor=2",
]


def _draws(tiny_corpus, tmp_path, extra):
    cfg = tiny_recipe(tmp_path / "r.yaml", tiny_corpus, tmp_path / "run")
    return run_distributed(DRAWS, 2, config=str(cfg), overrides=DROPOUT + extra)


def test_tp_ranks_draw_their_own_attention_masks(tiny_corpus, tmp_path):
    rank0, rank1 = _draws(tiny_corpus, tmp_path, [])
    # 1 step x 4 micro-batches x 4 layers
    assert len(rank0["attention"]) == len(rank1["attention"]) == 16
    for a, b in zip(rank0["attention"], rank1["attention"]):
        assert a != b, "attention heads on different TP ranks share a dropout mask"
    # Without sequence parallelism the residual stream is replicated over TP: same masks.
    assert rank0["residual"] and rank0["residual"] == rank1["residual"]


def test_sequence_parallel_chunks_draw_their_own_masks(tiny_corpus, tmp_path):
    rank0, rank1 = _draws(tiny_corpus, tmp_path, ["parallel.sequence_parallel=true"])
    assert len(rank0["attention"]) == 16
    assert all(a != b for a, b in zip(rank0["attention"], rank1["attention"]))
    # Each rank holds its own sequence chunk: embedding + 2 residual dropouts per layer differ.
    assert len(rank0["residual"]) == len(rank1["residual"]) == 4 * (1 + 2 * 4)
    assert all(a != b for a, b in zip(rank0["residual"], rank1["residual"]))
