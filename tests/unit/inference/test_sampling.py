"""The sampler: greedy, nucleus and top-k filters, seeds, option checks, repetition penalty."""

from __future__ import annotations

import pytest
import torch

from megagpt.inference.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    exponential_noise,
    make_params,
    penalise_seen,
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
    keys = torch.tensor([1, 2])
    draws = {
        tuple(sample(logits, make_params(top_p=0.6), keys, step).tolist()) for step in range(50)
    }
    assert all(a in (1, 2) and b in (0, 1, 2, 3) for a, b in draws)
    assert len(draws) > 1, "different steps must draw different noise"


def test_seeded_sampling_is_reproducible_and_per_row():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    params = make_params(temperature=1.5)

    def draw(keys, step=7):
        return sample(logits, params, torch.tensor(keys), step).tolist()

    assert draw([1, 2, 3]) == draw([1, 2, 3])
    assert [draw([1, 2, 3], step) for step in range(20)] != [
        draw([4, 5, 6], step) for step in range(20)
    ]
    # Row 1's draw depends only on its own key, not on the other rows of the batch.
    for step in range(20):
        alone = sample(logits[1:2], params, torch.tensor([2]), step)
        assert draw([9, 2, 9], step)[1] == alone[0]


def test_seeded_draws_follow_the_distribution():
    """The counter-based noise must sample like torch.multinomial: over 4,000 (key, step)
    draws each token's frequency is within 4 standard deviations of its probability."""
    probs = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
    logits = probs.log().expand(4000, 5)
    keys = torch.arange(4000) * 7919
    counts = torch.zeros(5)
    for step in range(3):
        counts += torch.bincount(sample(logits, make_params(top_p=1.0), keys, step), minlength=5)
    n = 3 * 4000
    sd = (n * probs * (1 - probs)).sqrt()
    assert ((counts - n * probs).abs() < 4 * sd).all(), counts.tolist()


def test_noise_is_the_same_on_every_call_and_device_independent_bits():
    """Exp(1) noise is a pure function of (key, step, token): no generator state is consumed,
    and the integer hash underneath never overflows int64 (multipliers < 2^31)."""
    keys = torch.tensor([0, 1, 2**32 - 1])
    a = exponential_noise(keys, 5, 1000)
    torch.rand(10)  # the global generator does not matter
    assert torch.equal(a, exponential_noise(keys, 5, 1000))
    assert torch.equal(a, exponential_noise(keys, torch.tensor(5), 1000))
    assert (a > 0).all() and torch.isfinite(a).all()
    assert abs(float(a.mean()) - 1.0) < 0.1


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"top_k": 5, "top_p": 0.9}, "cannot be combined"),
        ({"temperature": 0.0}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": 100}, "smaller than the vocabulary"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ],
)
def test_invalid_options_name_the_option(kw, msg):
    with pytest.raises(ValueError, match=msg):
        make_params(**kw).check(vocab_size=100)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", ["temperature", "top_p", "repetition_penalty"])
def test_non_finite_options_are_refused(name, value):
    """NaN slips through ``x <= 0``-style checks: NaN logits then decode to no text at all."""
    with pytest.raises(ValueError, match=f"^{name} must be"):
        make_params(**{name: value}).check(vocab_size=100)


def test_repetition_penalty_lowers_seen_tokens_only():
    logits = torch.tensor([[2.0, -1.0, 3.0, 0.5]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1, 0]]), 2.0)
    assert out.tolist() == [[1.0, -2.0, 3.0, 0.5]]
    assert torch.equal(apply_repetition_penalty(logits, torch.tensor([[0]]), 1.0), logits)
    seen = torch.tensor([[True, True, False, False]])
    assert torch.equal(penalise_seen(logits, seen, 2.0), out)


def test_params_are_frozen():
    with pytest.raises(AttributeError):
        SamplingParams().top_k = 3


def test_model_defaults_fill_what_a_call_leaves_out():
    from megagpt.inference.sampling import GenerationDefaults

    top10 = GenerationDefaults(top_k=10, top_p=0.0, temperature=0.7, new_tokens=5)
    assert top10.params() == make_params(10, 0.0, 0.7)
    assert top10.params(top_p=0.8) == make_params(0, 0.8, 0.7)  # the call picks the filter
    assert top10.params(top_k=1).greedy
    nucleus = GenerationDefaults(top_p=0.5)
    assert nucleus.params(top_k=0).top_p == 0.5  # top-k off keeps the model's mass
    assert nucleus.params(temperature=2.0) == make_params(0, 0.5, 2.0)
