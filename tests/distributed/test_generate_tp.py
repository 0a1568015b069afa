"""Tensor-parallel generation (gloo, CPU): TP=2 gives TP=1's greedy tokens, for a ragged batch
and for one prompt (the one-row path)."""

from __future__ import annotations

import pytest

from tests.distributed.launcher import run_distributed
from tests.unit.inference.conftest import shared_assets

GEN = "tests.distributed.gen_workers:generate_ids"
PROMPTS = ["中华人民共和国", "床前明月光，疑是地上霜。", "北京"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return shared_assets(tmp_path_factory)["model"]


def test_tp2_greedy_equals_tp1(model_dir):
    options = {"top_k": 1, "max_new_tokens": 24}
    one = run_distributed(GEN, 1, directory=model_dir, prompts=PROMPTS, options=dict(options))
    two = run_distributed(GEN, 2, directory=model_dir, prompts=PROMPTS, options=dict(options))
    assert one[0]["tp"] == 1 and two[0]["tp"] == 2
    assert two[0]["ids"] == two[1]["ids"], "both TP ranks must return the same tokens"
    assert two[0]["ids"] == one[0]["ids"]
    assert two[0]["single"] == two[1]["single"] == one[0]["single"] == one[0]["ids"][:1]
    assert two[0]["texts"] == one[0]["texts"]
    # Beam search: every TP rank keeps the same beams, TP=1's.
    assert two[0]["beams"] == two[1]["beams"] == one[0]["beams"]
    assert all(len(r[0]) > 4 for r in one[0]["ids"])
