"""The fused element-wise functions, the chunked loss and the fused output layer + loss equal
the unfused math."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megagpt.model import fused
from megagpt.model.fused import (
    bias_dropout_add,
    bias_gelu,
    linear_cross_entropy,
    vocab_cross_entropy,
)


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
def test_chunked_cross_entropy_equals_torch(dtype):
    """Several chunks (600 rows x 4096 vocab > 2^20 elements): loss and logits grad equal
    F.cross_entropy of the fp32 logits (megatron-core's loss: tests/distributed/
    test_loss_vs_megatron.py, which needs its parallel state)."""
    torch.manual_seed(0)
    s, b, v = 150, 4, 4096
    logits = (torch.randn(s, b, v) * 3).to(dtype).requires_grad_()
    target = torch.randint(0, v, (s, b))
    weight = torch.rand(s, b)  # a loss mask-like upstream gradient
    ours = vocab_cross_entropy(logits, target)
    assert ours.dtype == torch.float32 and ours.shape == (s, b)
    ref_in = logits.detach().float().requires_grad_()
    # [s, b, v] -> [s*b, v] rows, per-token loss back to [s, b]
    ref = F.cross_entropy(ref_in.flatten(0, 1), target.flatten(), reduction="none").view(s, b)
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, ref, **tol)
    (g,) = torch.autograd.grad((ours * weight).sum(), logits)
    (gr,) = torch.autograd.grad((ref * weight).sum(), ref_in)
    assert g.dtype == dtype
    torch.testing.assert_close(
        g.float(), gr, **(tol if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-4))
    )


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


def _unfused(hidden, weight, target, row_weight, vocab_start=0, valid=None):
    """The pre-fusion path: full logits (padding rows at the dtype's minimum, as
    ``WordEmbedding.logits`` writes them), the chunked loss, the weighted sum."""
    logits = F.linear(hidden, weight)
    valid = weight.shape[0] if valid is None else valid
    if valid < weight.shape[0]:
        logits = torch.cat(
            [
                logits[..., :valid],
                torch.full_like(logits[..., valid:], torch.finfo(logits.dtype).min),
            ],
            dim=-1,
        )
    return (vocab_cross_entropy(logits, target, vocab_start) * row_weight).sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_equals_linear_then_loss(dtype, monkeypatch):
    """Several chunks of rows, padding rows, a loss mask (zero rows), an incoming gradient that
    is not 1 (accumulation steps): the loss and both gradients of the unfused path."""
    monkeypatch.setitem(fused._MIN_FUSED_ROWS, dtype, 64)  # 300 rows: 5 chunks
    monkeypatch.setitem(fused._CHUNK_ELEMENTS, "cpu", 1)
    torch.manual_seed(0)
    n, h, v, valid = 300, 48, 384, 330
    hidden = torch.randn(n, h).to(dtype).requires_grad_()
    weight = (torch.randn(v, h) * 0.3).to(dtype).requires_grad_()
    target = torch.randint(0, valid, (n,))
    mask = (torch.rand(n) > 0.2).float()
    rw = mask / mask.sum()
    ours = linear_cross_entropy(hidden, weight, target, rw, valid=valid)
    ref = _unfused(hidden, weight, target, rw, valid=valid)
    assert ours.dtype == torch.float32 and ours.dim() == 0
    loose = dtype == torch.bfloat16
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    g = torch.autograd.grad(ours * 0.25, (hidden, weight), retain_graph=True)
    r = torch.autograd.grad(ref * 0.25, (hidden, weight))
    assert g[0].dtype == g[1].dtype == dtype
    assert torch.count_nonzero(g[1][valid:]) == 0  # padding rows get no gradient
    tol = dict(rtol=2e-2, atol=2e-5) if loose else dict(rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(g[0].float(), r[0].float(), **tol)
    torch.testing.assert_close(g[1].float(), r[1].float(), **tol)
    # The gradients were handed out by that backward: a second one is an error, not a
    # silently rescaled gradient.
    with pytest.raises(RuntimeError, match="backward through the same graph twice"):
        torch.autograd.grad(ours, (hidden, weight))
    # Without autograd (evaluation): the same loss, no gradient work.
    with torch.no_grad():
        torch.testing.assert_close(
            linear_cross_entropy(hidden, weight, target, rw, valid=valid), ours
        )


def test_linear_cross_entropy_of_a_vocab_slice():
    """A TP rank's view without the collectives (group None): targets outside the slice add no
    target logit and no one-hot; a slice of padding only adds nothing to the softmax."""
    torch.manual_seed(1)
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(10, 8, requires_grad=True)
    # This slice holds ids 10..17 and two padding rows; 0, 3 and 25 live on other ranks.
    target = torch.tensor([0, 12, 15, 3, 25, 10])
    rw = torch.full((6,), 1 / 6)
    ours = linear_cross_entropy(hidden, weight, target, rw, vocab_start=10, valid=8)
    ref = _unfused(hidden, weight, target, rw, vocab_start=10, valid=8)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(
        torch.autograd.grad(ours, (hidden, weight)), torch.autograd.grad(ref, (hidden, weight))
    )
    empty = linear_cross_entropy(hidden, weight, target, rw, vocab_start=30, valid=0)
    assert empty.item() == float("-inf")  # log of an empty sum: the other ranks add theirs
    gh, gw = torch.autograd.grad(
        linear_cross_entropy(hidden, weight, target, rw, 30, 0) * 0, (hidden, weight)
    )
    assert torch.count_nonzero(gw) == 0


def test_linear_cross_entropy_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="hidden size 8"):
        linear_cross_entropy(
            torch.randn(4, 8), torch.randn(10, 6), torch.zeros(4, dtype=int), torch.ones(4)
        )
    with pytest.raises(ValueError, match="leading shape"):
        linear_cross_entropy(
            torch.randn(4, 8), torch.randn(10, 8), torch.zeros(3, dtype=int), torch.ones(3)
        )


def _gpt(dtype, vocab=500):
    from megagpt.config import ParallelConfig, from_name
    from megagpt.model import GPTModel, initialize_weights, megatron_config

    cfg = from_name("gpt3-tiny")
    cfg.num_layers, cfg.dropout, cfg.attention_dropout, cfg.vocab_size = 2, 0.0, 0.0, vocab
    model = GPTModel(cfg, megatron_config(cfg, ParallelConfig(), dtype))
    initialize_weights(model, cfg, 5, 0, 1)
    return model.to(dtype).train(), cfg


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_model_loss_equals_lm_loss_of_its_logits(dtype, masked):
    """GPTModel(tokens, labels) (the fused output layer + loss) gives lm_loss of its logits,
    loss and every gradient, the tied embedding's included (its two uses summed); vocab 500 is
    padded to 512."""
    from megagpt.model import lm_loss

    model, cfg = _gpt(dtype)
    assert model.word.word_embeddings.weight.shape[0] == 512
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, cfg.vocab_size, (3, 32), generator=gen)
    labels = tokens.roll(-1, 1)
    mask = (torch.rand(3, 32, generator=gen) > 0.3).float() if masked else None
    fused_loss = model(tokens, labels, mask)
    gf = torch.autograd.grad(fused_loss, list(model.parameters()))
    ref = lm_loss(model(tokens), labels, mask)
    gr = torch.autograd.grad(ref, list(model.parameters()))
    torch.testing.assert_close(fused_loss, ref, rtol=1e-5, atol=1e-5)
    tol = dict(rtol=2e-2, atol=1e-4) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-7)
    for (name, _), a, b in zip(model.named_parameters(), gf, gr):
        torch.testing.assert_close(a.float(), b.float(), **tol, msg=name)
    with torch.no_grad():  # evaluation: the same loss without autograd
        torch.testing.assert_close(model(tokens, labels, mask), fused_loss)
    # An all-zero mask is a zero loss (not NaN), as lm_loss gives.
    zero = model(tokens, labels, torch.zeros(3, 32))
    assert zero.item() == 0.0


def _untied_loss(model, tokens, labels, mask):
    """GPTModel's forward with the tied weight's two gradients left to autograd (the lookup
    without a ``TiedGradient``): the reference for the handoff."""
    h = model.position(model.word(tokens))
    for layer in model.layers:
        h = layer(h)
    return model.word.loss(model.final_norm(h), labels, mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tied_embedding_gradient_is_built_once(dtype):
    """Training forward: the output layer hands its [V, h] gradient to the word lookup, which
    adds its rows into it; autograd never builds the lookup's own zero-filled [V, h] gradient
    (embedding_dense_backward) nor adds the two. Gradients, accumulated over two backward
    passes, equal those of the path without the handoff (fp32: bit for bit)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                self.seen.append((func.__name__, tuple(out.shape)))
            return out

    model, cfg = _gpt(dtype)
    weight = model.word.word_embeddings.weight
    gen = torch.Generator().manual_seed(4)
    batches = [torch.randint(0, cfg.vocab_size, (3, 32), generator=gen) for _ in range(2)]
    grads = []
    for tied in (True, False):
        model.zero_grad(set_to_none=True)
        for i, tokens in enumerate(batches):
            labels = tokens.roll(-1, 1)
            loss = model(tokens, labels) if tied else _untied_loss(model, tokens, labels, None)
            with Ops() as ops:
                loss.backward()
            dense = [  # what computes a [V, h] tensor (a detach is autograd taking one as .grad)
                op
                for op, shape in ops.seen
                if shape == tuple(weight.shape) and not op.startswith("detach")
            ]
            if tied:  # the lookup's rows into the output layer's gradient; from the second
                # pass on, autograd's accumulation into .grad
                assert dense == ["index_add_.default"] + ["add_.Tensor"] * i, dense
            else:  # the reference builds a zero-filled [V, h] and adds the two
                assert "embedding_dense_backward.default" in dense, dense
        grads.append([p.grad.clone() for p in model.parameters()])
    for (name, _), a, b in zip(model.named_parameters(), *grads):
        if dtype == torch.float32:
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-5, msg=name)


def test_tied_gradient_is_not_handed_to_a_lookup_outside_the_graph():
    """A loss given a TiedGradient no lookup took keeps its weight gradient (nothing lost), and
    a lookup whose loss did not hand one over still returns its own rows."""
    from megagpt.model.fused import TiedGradient, tied_lookup

    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(16, 8, generator=gen, requires_grad=True)
    hidden = torch.randn(6, 8, generator=gen, requires_grad=True)
    target = torch.randint(0, 16, (6,), generator=gen)
    linear_cross_entropy(hidden, weight, target, torch.ones(6), tied=TiedGradient()).backward()
    expected = torch.autograd.grad(_unfused(hidden, weight, target, torch.ones(6)), weight)[0]
    torch.testing.assert_close(weight.grad, expected)
    weight.grad = None
    tokens = torch.tensor([[1, 3, 3, 15]])
    tied_lookup(tokens, weight, TiedGradient()).sum().backward()
    assert torch.equal(
        weight.grad, torch.autograd.grad(F.embedding(tokens, weight).sum(), weight)[0]
    )


def test_tied_lookup_leaves_other_devices_to_autograd():
    """Off the CPU the lookup does not take the handoff (not armed), so the loss returns its
    weight gradient to autograd as usual."""
    from megagpt.model.fused import TiedGradient, tied_lookup

    tied = TiedGradient()
    weight = torch.empty(16, 8, device="meta", requires_grad=True)
    out = tied_lookup(torch.zeros(2, 3, dtype=torch.long, device="meta"), weight, tied)
    assert out.shape == (2, 3, 8) and not tied.armed
    tied_lookup(torch.zeros(2, 3, dtype=torch.long), torch.zeros(16, 8, requires_grad=True), tied)
    assert tied.armed
