"""The built GPT: parameter counts, vocab padding, precision."""

from __future__ import annotations

import pytest

from megagpt.config import from_name, parameter_count
from tests.distributed.launcher import run_distributed

COUNT = "tests.distributed.workers:module_parameter_count"
LOSSES = "tests.distributed.workers:engine_losses"
BASE = ["train.global_batch_size=8", "train.micro_batch_size=2"]


@pytest.mark.parametrize(
    "size,tp", [("gpt3-tiny", 1), ("gpt3-tiny", 2), ("gpt3-base", 1), ("gpt3-base", 2)]
)
def test_built_model_has_the_registered_parameter_count(size, tp):
    ranks = run_distributed(COUNT, tp, size=size, tp=tp)
    cfg = from_name(size)
    sharded = sum(r["local"] - r["replicated"] for r in ranks)
    total = sharded + ranks[0]["replicated"]
    padding = (ranks[0]["padded_vocab"] - cfg.vocab_size) * cfg.hidden_size
    assert total - padding == parameter_count(cfg)


def test_vocab_padding_does_not_change_the_model():
    """Vocab 1100 pads to 1152 at TP=1 and 1280 at TP=2; padded logits are masked, so the
    losses and grad norms are the same."""
    one = run_distributed(LOSSES, 1, overrides=BASE + ["model.vocab_size=1100"], steps=3)[0]
    two = run_distributed(
        LOSSES, 2, overrides=BASE + ["model.vocab_size=1100", "parallel.tensor=2"], steps=3
    )[0]
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert two["grad_norms"] == pytest.approx(one["grad_norms"], rel=1e-4)


@pytest.mark.parametrize("extra", [[], ["parallel.pipeline=2"]])
def test_bf16_trains_on_cpu_close_to_fp32(extra):
    world = 2 if extra else 1
    fp32 = run_distributed(LOSSES, 1, overrides=BASE, steps=2)[0]
    bf16 = run_distributed(
        LOSSES, world, overrides=BASE + extra + ["train.precision=bf16"], steps=2
    )[0]
    # bf16 activations: same first loss to bf16 precision; updates keep it finite and close.
    assert bf16["losses"] == pytest.approx(fp32["losses"], rel=2e-2)
    assert all(n > 0 for n in bf16["grad_norms"])
