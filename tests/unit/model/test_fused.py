"""The fused element-wise functions and the chunked loss equal the unfused math."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megagpt.model.fused import bias_dropout_add, bias_gelu, vocab_cross_entropy


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_bias_gelu_is_gelu_of_the_biased_input(approximate):
    x = torch.randn(8, 3, 64, requires_grad=True)
    b = torch.randn(64, requires_grad=True)
    fused = bias_gelu(x, b, approximate)
    ref = F.gelu(x + b, approximate=approximate)
    torch.testing.assert_close(fused, ref, rtol=0, atol=0)
    gx, gb = torch.autograd.grad(fused.square().sum(), (x, b))
    rx, rb = torch.autograd.grad(ref.square().sum(), (x, b))
    torch.testing.assert_close((gx, gb), (rx, rb))


def test_bias_dropout_add_draws_the_masks_of_unfused_dropout():
    """Same seed, same masks as ``residual + F.dropout(x + bias)`` (the pre-fusion layer), and
    the result is laid out like the residual even when x is a transposed view."""
    s, b, h = 16, 4, 32
    x = torch.randn(b, s, h).transpose(0, 1).requires_grad_()  # [s, b, h] view of [b, s, h]
    bias = torch.randn(h, requires_grad=True)
    res = torch.randn(s, b, h, requires_grad=True)
    torch.manual_seed(3)
    fused = bias_dropout_add(x, bias, res, 0.3, True)
    torch.manual_seed(3)
    ref = res + F.dropout(x + bias, p=0.3, training=True)
    assert torch.equal(fused, ref)
    assert fused.is_contiguous()
    assert (fused == res).float().mean() > 0.2  # some elements were dropped: masks compared
    g = torch.autograd.grad(fused.sum(), (x, bias, res))
    r = torch.autograd.grad(ref.sum(), (x, bias, res))
    torch.testing.assert_close(g, r)
    # Not training (or p = 0): no mask drawn, the generator untouched.
    state = torch.get_rng_state()
    out = bias_dropout_add(x, bias, res, 0.3, False)
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(out, res + x + bias)


def test_bias_dropout_add_without_bias():
    x, res = torch.randn(4, 2, 8), torch.randn(4, 2, 8)
    torch.testing.assert_close(bias_dropout_add(x, None, res, 0.0, True), res + x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_equals_megatron_and_torch(process_group, dtype):
    """Several chunks (600 rows x 4096 vocab > 2^20 elements): loss and logits grad equal
    megatron-core's ``vocab_parallel_cross_entropy(logits.float())`` and F.cross_entropy."""
    from megatron.core import tensor_parallel

    torch.manual_seed(0)
    s, b, v = 150, 4, 4096
    logits32 = (torch.randn(s, b, v) * 3)
    logits = logits32.to(dtype).requires_grad_()
    target = torch.randint(0, v, (s, b))
    weight = torch.rand(s, b)  # a loss mask-like upstream gradient
    ours = vocab_cross_entropy(logits, target)
    assert ours.dtype == torch.float32 and ours.shape == (s, b)
    ref_in = logits.detach().float().requires_grad_()
    ref = tensor_parallel.vocab_parallel_cross_entropy(ref_in.clone(), target)
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, ref, **tol)
    torch.testing.assert_close(
        ours, F.cross_entropy(ref_in.detach().flatten(0, 1), target.flatten(),
                              reduction="none").view(s, b), **tol)
    (g,) = torch.autograd.grad((ours * weight).sum(), logits)
    (gr,) = torch.autograd.grad((ref * weight).sum(), ref_in)
    assert g.dtype == dtype
    torch.testing.assert_close(g.float(), gr, **(tol if dtype == torch.float32
                                                else dict(rtol=1e-2, atol=1e-4)))


def test_cross_entropy_of_a_vocab_slice_counts_only_its_own_targets():
    """TP rank view without the collectives (group None): targets outside the slice add no
    target logit and get no one-hot in the gradient."""
    logits = torch.randn(6, 10, requires_grad=True)
    target = torch.tensor([0, 12, 15, 3, 19, 10])  # slice holds ids 10..19
    loss = vocab_cross_entropy(logits, target, vocab_start=10)
    inside = (target >= 10) & (target < 20)
    lse = torch.logsumexp(logits.detach(), -1)
    picked = logits.detach().gather(1, (target - 10).clamp(0, 9)[:, None]).squeeze(1)
    torch.testing.assert_close(loss, lse - torch.where(inside, picked, 0.0))
    (g,) = torch.autograd.grad(loss.sum(), logits)
    onehot = F.one_hot((target - 10).clamp(0, 9), 10).float() * inside[:, None]
    torch.testing.assert_close(g, torch.softmax(logits.detach(), -1) - onehot)
