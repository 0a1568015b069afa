"""The sampler: greedy, nucleus and top-k filters, seeds, option checks, repetition penalty."""

from __future__ import annotations

import pytest
import torch

from megagpt.inference.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    make_params,
    sample,
    top_k_filter,
    top_p_filter,
)


def test_defaults_are_the_originals_nucleus_sampling():
    p = make_params()
    assert (p.top_k, p.top_p, p.temperature, p.repetition_penalty) == (0, 0.9, 1.0, 1.0)
    assert make_params(top_k=1).greedy and make_params(top_k=1).top_p == 0.0
    assert make_params(top_k=10).top_p == 0.0


def test_top_p_keeps_the_token_that_crosses_p_and_the_top_token():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = torch.isfinite(top_p_filter(probs.log(), 0.7))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.7, 0.8 crosses: kept
    kept = torch.isfinite(top_p_filter(probs.log(), 0.1))
    assert kept.tolist() == [[True, False, False, False]]  # the top token always stays
    shuffled = probs[:, [2, 0, 3, 1]]
    kept = torch.isfinite(top_p_filter(shuffled.log(), 0.7))
    assert kept.tolist() == [[False, True, False, True]]


def test_top_k_filter():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    assert torch.isfinite(top_k_filter(logits, 2)).tolist() == [[False, True, True, False]]


def test_greedy_is_argmax_and_sampling_stays_in_the_nucleus():
    logits = torch.tensor([[0.0, 5.0, 4.9, -3.0], [2.0, 0.0, 0.0, 0.0]])
    assert sample(logits, make_params(top_k=1)).tolist() == [1, 0]
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    draws = {tuple(sample(logits, make_params(top_p=0.6), gens).tolist()) for _ in range(50)}
    assert all(a in (1, 2) and b in (0, 1, 2, 3) for a, b in draws)


def test_seeded_sampling_is_reproducible_and_per_row():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    params = make_params(temperature=1.5)

    def draw(seeds):
        return sample(logits, params, [torch.Generator().manual_seed(s) for s in seeds]).tolist()

    assert draw([1, 2, 3]) == draw([1, 2, 3])
    # Row 1's draw depends only on its own generator, not on the others in the batch.
    gens = [torch.Generator().manual_seed(s) for s in (9, 2, 9)]
    alone = sample(logits[1:2], params, [torch.Generator().manual_seed(2)])
    assert sample(logits, params, gens)[1] == alone[0]


@pytest.mark.parametrize("kw,msg", [
    ({"top_k": 5, "top_p": 0.9}, "cannot be combined"),
    ({"temperature": 0.0}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": 100}, "smaller than the vocabulary"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
])
def test_invalid_options_name_the_option(kw, msg):
    with pytest.raises(ValueError, match=msg):
        make_params(**kw).check(vocab_size=100)


def test_repetition_penalty_lowers_seen_tokens_only():
    logits = torch.tensor([[2.0, -1.0, 3.0, 0.5]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1, 0]]), 2.0)
    assert out.tolist() == [[1.0, -2.0, 3.0, 0.5]]
    assert torch.equal(apply_repetition_penalty(logits, torch.tensor([[0]]), 1.0), logits)


def test_params_are_frozen():
    with pytest.raises(AttributeError):
        SamplingParams().top_k = 3
