"""train.cpu_kernels: the decoder layer's causal attention and the MLP's bias + GELU on our CPU
kernels (megagpt/model/cpu_training.py, kernels/cpu_attention.c, kernels/cpu_gelu.c): torch's
results and gradients within fp32 rounding at every shape, in the projection's own layout, the
same bits at any thread count, a NaN kept to its own head, the model and the setting."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megagpt.model import cpu_kernels, cpu_training
from megagpt.model.cpu_training import (
    ATTENTION_MAX_SEQ,
    attention_applies,
    causal_attention,
    cpu_kernels_enabled,
    cpu_kernels_note,
    linear_gelu,
)

needs_kernel = pytest.mark.skipif(
    not cpu_kernels.available(),
    reason=f"CPU kernels unavailable: {cpu_kernels.unavailable_reason()}",
)


def sdpa_attention(qkv: torch.Tensor) -> torch.Tensor:
    """The reference: the SelfAttention path this replaces, [s, b, nh, 3hd] -> [s, b, nh, hd]."""
    hd = qkv.shape[-1] // 3
    q, k, v = (t.permute(1, 2, 0, 3) for t in qkv.split(hd, dim=-1))  # 3 x [b, nh, s, hd]
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).permute(2, 0, 1, 3)


def _grads(fn, qkv: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = qkv.detach().clone().requires_grad_()
    out = fn(x)
    out.backward(g)
    return out.detach(), x.grad


def with_threads(n: int, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


@needs_kernel
@pytest.mark.parametrize(
    "s,b,nh,hd",
    [
        (128, 4, 12, 64),
        (37, 2, 3, 32),
        (100, 3, 5, 64),
        (1, 2, 2, 16),
        (17, 1, 1, 16),
        (200, 2, 4, 80),
        (64, 2, 2, 128),
        (512, 1, 2, 64),
    ],
    ids=str,
)
def test_attention_equals_sdpa_forward_and_backward(s, b, nh, hd):
    """Output and gradient against float64: no further from it than SDPA's fp32 is (x4)."""
    gen = torch.Generator().manual_seed(s * 100 + hd)
    qkv = torch.randn(s, b, nh, 3 * hd, generator=gen)
    g = torch.randn(s, b, nh, hd, generator=gen)
    out, grad = _grads(causal_attention, qkv, g)
    ref_out, ref_grad = _grads(sdpa_attention, qkv.double(), g.double())
    fp32_out, fp32_grad = _grads(sdpa_attention, qkv, g)
    assert out.shape == (s, b, nh, hd) and grad.shape == qkv.shape
    for ours, ref, theirs in ((out, ref_out, fp32_out), (grad, ref_grad, fp32_grad)):
        err = (ours.double() - ref).abs().max().item()
        assert err <= 4 * (theirs.double() - ref).abs().max().item() + 1e-6, err


@needs_kernel
def test_attention_reads_and_writes_a_strided_projection():
    """A [s, b, nh, 3hd] view with gaps between rows and tokens (a slice of a wider tensor):
    read in place, and its gradient comes back in the same layout."""
    gen = torch.Generator().manual_seed(3)
    wide = torch.randn(50, 5, 2, 3 * 32, generator=gen)
    base = wide[:, 1:4]  # [50, 3, 2, 96]: tokens 5 * 192 floats apart
    assert not base.is_contiguous() and attention_applies(base)
    g = torch.randn(50, 3, 2, 32, generator=gen)
    leaf = wide.clone().requires_grad_()
    causal_attention(leaf[:, 1:4]).backward(g)
    ref = wide.clone().requires_grad_()
    sdpa_attention(ref[:, 1:4]).backward(g)
    torch.testing.assert_close(leaf.grad, ref.grad, rtol=1e-4, atol=1e-5)
    assert leaf.grad[:, 0].abs().sum() == 0 and leaf.grad[:, 4].abs().sum() == 0


@needs_kernel
def test_attention_is_the_same_bits_at_any_thread_count_and_run():
    """One task per (row, head), sums in a fixed order: a resumed run on more or fewer threads
    computes the same step."""
    gen = torch.Generator().manual_seed(4)
    qkv = torch.randn(96, 3, 4, 3 * 64, generator=gen)
    g = torch.randn(96, 3, 4, 64, generator=gen)
    runs = [with_threads(n, lambda: _grads(causal_attention, qkv, g)) for n in (1, 2, 2, 3)]
    for out, grad in runs[1:]:
        assert torch.equal(out, runs[0][0]) and torch.equal(grad, runs[0][1])


@needs_kernel
def test_a_nan_stays_in_its_own_head():
    """The tasks share each thread's scratch: a NaN planted in one (row, head) leaves every other
    head's output and gradient equal to SDPA's (one thread: every task reuses the scratch the
    poisoned one wrote)."""
    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(40, 2, 3, 3 * 16, generator=gen)
    qkv[7, 0, 1, 3] = float("nan")  # a query of row 0, head 1
    qkv[2, 0, 1, 16 + 5] = float("inf")  # and a key
    g = torch.randn(40, 2, 3, 16, generator=gen)
    out, grad = with_threads(1, lambda: _grads(causal_attention, qkv, g))
    ref_out, ref_grad = _grads(sdpa_attention, qkv, g)
    clean = torch.ones(2, 3, dtype=torch.bool)
    clean[0, 1] = False
    torch.testing.assert_close(out[:, clean], ref_out[:, clean], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad[:, clean], ref_grad[:, clean], rtol=1e-4, atol=1e-5)
    assert not out[:, 0, 1].isfinite().all()


def test_what_the_attention_kernel_does_not_take(monkeypatch):
    """Longer sequences, other dtypes, head sizes off 16 and a split q | k | v go to SDPA; asked
    for anyway, a ValueError that says what was expected."""
    ok = torch.randn(8, 1, 2, 48)
    with pytest.raises(ValueError, match="dropout=1.0: expected 0 <= p < 1"):
        causal_attention(ok, 1.0)
    for bad in (
        torch.randn(ATTENTION_MAX_SEQ + 1, 1, 1, 48),
        ok.to(torch.bfloat16),
        torch.randn(8, 1, 2, 3 * 8),
        torch.randn(8, 1, 48, 2).transpose(2, 3),
    ):
        assert not attention_applies(bad)
        with pytest.raises(ValueError, match=r"causal_attention: qkv .* expected fp32 CPU"):
            causal_attention(bad)
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    assert not attention_applies(ok)


@needs_kernel
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("onednn", [False, True], ids=["blas", "onednn"])
def test_linear_gelu_equals_torch(approximate, bias, onednn):
    """GELU(F.linear(x, W, b)) and the gradients of x, W and b, against float64: as close as
    torch's fp32 (x2 for the bias sum, x1.5 elsewhere), for a [s, b, h] input."""
    from megagpt.model.matmul import onednn_unavailable

    if onednn and onednn_unavailable():
        pytest.skip(onednn_unavailable())
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(33, 3, 64, generator=gen)
    w = torch.randn(272, 64, generator=gen) * 0.2
    b = torch.randn(272, generator=gen) if bias else None
    g = torch.randn(33, 3, 272, generator=gen)

    def run(fn, *ts):
        leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in ts]
        y = fn(*leaves)
        y.backward(g.to(y.dtype))
        return [y.detach()] + [t.grad for t in leaves if t is not None]

    def torch_path(x, w, b):
        return F.gelu(F.linear(x, w, b), approximate=approximate)

    ours = run(lambda x, w, b: linear_gelu(x, w, b, approximate, onednn), x, w, b)
    fp32 = run(torch_path, x, w, b)
    ref = run(torch_path, *(t.double() if t is not None else None for t in (x, w, b)))
    for i, (o, f, r) in enumerate(zip(ours, fp32, ref)):
        assert o.shape == r.shape
        slack = 2.0 if (bias and i == 3) else 1.5
        err = (o.double() - r).abs().max().item()
        assert err <= slack * (f.double() - r).abs().max().item() + 1e-6, (i, err)


@needs_kernel
def test_linear_gelu_is_the_same_bits_at_any_thread_count():
    gen = torch.Generator().manual_seed(7)
    x, w, b = torch.randn(300, 32, generator=gen), torch.randn(320, 32, generator=gen), None
    b = torch.randn(320, generator=gen)
    g = torch.randn(300, 320, generator=gen)

    def run():
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        y = linear_gelu(*leaves, "none")
        y.backward(g)
        return [y.detach()] + [t.grad for t in leaves]

    first = with_threads(1, run)
    for n in (2, 3):
        assert all(torch.equal(a, c) for a, c in zip(first, with_threads(n, run)))


def test_what_linear_gelu_does_not_take():
    x = torch.randn(4, 32)
    with pytest.raises(ValueError, match="linear_gelu: .* out_features a multiple of 16"):
        linear_gelu(x, torch.randn(20, 32), None)
    with pytest.raises(ValueError, match="approximate='sigmoid'"):
        linear_gelu(x, torch.randn(32, 32), None, "sigmoid")
    assert not cpu_training.linear_gelu_applies(x.double(), torch.randn(32, 32).double())


def _tiny_model(marked: bool, layers: int = 2):
    from megagpt.config import ParallelConfig, from_name
    from megagpt.model import GPTModel, initialize_weights, megatron_config
    from megagpt.model.layers import use_cpu_kernels

    cfg = from_name("gpt3-tiny")
    cfg.num_layers, cfg.dropout, cfg.attention_dropout = layers, 0.0, 0.0
    model = GPTModel(cfg, megatron_config(cfg, ParallelConfig()))
    initialize_weights(model, cfg, 5, 0, 1)
    if marked:
        assert use_cpu_kernels(model) == 2 * layers  # each layer's attention and MLP
    return model.train(), cfg


@needs_kernel
def test_the_model_on_our_kernels_trains_as_on_torchs(monkeypatch):
    """The same loss and gradients within fp32 rounding, with both kernels really called."""
    calls = {"attention": 0, "gelu": 0}
    for name, fn in (("attention", "_CausalAttention"), ("gelu", "_LinearGelu")):
        real = getattr(cpu_training, fn).apply

        def counted(*a, _real=real, _name=name):
            calls[_name] += 1
            return _real(*a)

        monkeypatch.setattr(getattr(cpu_training, fn), "apply", counted)
    results = []
    for marked in (True, False):
        model, cfg = _tiny_model(marked)
        tokens = torch.randint(
            0, cfg.vocab_size, (3, 33), generator=torch.Generator().manual_seed(8)
        )
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    assert calls == {"attention": 2, "gelu": 2}
    (ours, ours_g), (theirs, theirs_g) = results
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for name, grad in theirs_g.items():
        torch.testing.assert_close(ours_g[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@needs_kernel
def test_where_the_model_takes_the_attention_kernel(monkeypatch):
    """Training with attention dropout (the mask from the layer's seed), eval mode under no_grad
    and selective recompute all take the kernel; a longer sequence than it covers does not."""
    seen = []
    real = cpu_training._CausalAttention.apply
    monkeypatch.setattr(
        cpu_training._CausalAttention, "apply", lambda *a: (seen.append(a[1:]), real(*a))[1]
    )
    model, cfg = _tiny_model(True, layers=1)
    tokens = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        model.eval()(tokens)
    assert seen == [(0.0, 0, 0)]
    model.train()
    for layer in model.modules():
        if hasattr(layer, "attention_dropout"):
            layer.attention_dropout = 0.1
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    assert len(seen) == 2 and seen[1][0] == 0.1 and seen[1][1] > 0  # a drawn seed
    monkeypatch.setattr(cpu_training, "ATTENTION_MAX_SEQ", 16)
    assert not attention_applies(torch.randn(20, 2, 2, 48))


def _fmix(x):
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & 0xFFFFFFFF
    return x ^ (x >> 16)


def _keep_mask(p: float, seed: int, row: int, head: int, s: int) -> torch.Tensor:
    """kernels/cpu_attention.c's dropout mask of one (row, head), written again here: [s, s]."""
    m64 = (1 << 64) - 1
    z = (seed + 0x9E3779B97F4A7C15 * (row * 65536 + head + 1)) & m64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m64
    z ^= z >> 31
    k0, k1 = z & 0xFFFFFFFF, z >> 32
    i = torch.arange(s, dtype=torch.int64)[:, None]
    j = torch.arange(s, dtype=torch.int64)[None, :]
    x = _fmix(_fmix((i * 4096 + j) ^ k0) ^ k1)
    return ((x >> 8).double() / 2**24) >= p


@needs_kernel
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_attention_dropout_equals_its_mask_applied_in_float64(p):
    """The forward and every gradient are those of softmax(QK^T) * mask / (1 - p) @ V with the
    kernel's mask (rebuilt here from the seed, row and global head), computed in float64; about
    a fraction p of the causal entries is dropped; the same seed gives the same bits, another
    seed another mask."""
    s, b, nh, hd, seed, head0 = 40, 2, 3, 32, 123456789012345, 6
    gen = torch.Generator().manual_seed(9)
    qkv = torch.randn(s, b, nh, 3 * hd, generator=gen)
    g = torch.randn(s, b, nh, hd, generator=gen)
    out, grad = _grads(lambda x: causal_attention(x, p, seed, head0), qkv, g)
    again = _grads(lambda x: causal_attention(x, p, seed, head0), qkv, g)
    assert torch.equal(out, again[0]) and torch.equal(grad, again[1])
    other = _grads(lambda x: causal_attention(x, p, seed + 1, head0), qkv, g)
    assert not torch.equal(out, other[0])

    masks = torch.stack(
        [torch.stack([_keep_mask(p, seed, r, head0 + h, s) for h in range(nh)]) for r in range(b)]
    )  # [b, nh, s, s]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    kept = masks[:, :, causal].double().mean().item()
    assert abs(kept - (1 - p)) < 0.03, kept

    def reference(x):
        q, k, v = (t.permute(1, 2, 0, 3) for t in x.split(hd, dim=-1))  # [b, nh, s, hd]
        scores = (q @ k.transpose(-1, -2)) / hd**0.5
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        return ((probs * masks / (1 - p)) @ v).permute(2, 0, 1, 3)

    ref_out, ref_grad = _grads(reference, qkv.double(), g.double())
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=5e-5)


@needs_kernel
def test_selective_recompute_with_the_kernel_trains_as_without():
    """recompute=selective checkpoints SDPA's attention core; with the kernel there is no s x s
    tensor to drop, and the gradients are the same bits as recompute=none."""
    from megagpt.config import ParallelConfig, from_name
    from megagpt.model import GPTModel, initialize_weights, megatron_config
    from megagpt.model.layers import use_cpu_kernels

    cfg = from_name("gpt3-tiny")
    cfg.num_layers, cfg.dropout, cfg.attention_dropout = 2, 0.0, 0.2
    tokens = torch.randint(0, cfg.vocab_size, (2, 25), generator=torch.Generator().manual_seed(1))
    grads = []
    for recompute in ("none", "selective"):
        model = GPTModel(cfg, megatron_config(cfg, ParallelConfig()), recompute)
        initialize_weights(model, cfg, 5, 0, 1)
        use_cpu_kernels(model)
        model.dropout_rng.seed(7, 0)
        model.train()(tokens[:, :-1], tokens[:, 1:]).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        assert torch.equal(grads[1][name], grad), name


def test_the_setting_resolves_per_device_and_cpu(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not cpu_kernels_enabled("auto", cuda) and not cpu_kernels_enabled("megagpt", cuda)
    assert not cpu_kernels_enabled("torch", cpu)
    assert "train.cpu_kernels=torch" in cpu_kernels_note("torch", cpu)
    monkeypatch.setattr(cpu_kernels, "available", lambda: True)
    monkeypatch.setattr(cpu_training, "cpu_vendor", lambda: "GenuineIntel")
    assert cpu_kernels_enabled("auto", cpu) and cpu_kernels_enabled("megagpt", cpu)
    assert "megagpt's CPU kernels (train.cpu_kernels=auto)" in cpu_kernels_note("auto", cpu)
    for vendor in ("AuthenticAMD", None):  # not measured there: torch's
        monkeypatch.setattr(cpu_training, "cpu_vendor", lambda v=vendor: v)
        assert not cpu_kernels_enabled("auto", cpu) and cpu_kernels_enabled("megagpt", cpu)
        assert f"vendor {vendor or 'unknown'}" in cpu_kernels_note("auto", cpu)
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    monkeypatch.setattr(cpu_kernels, "unavailable_reason", lambda: "no C compiler found")
    assert not cpu_kernels_enabled("auto", cpu)
    with pytest.raises(
        ValueError, match="train.cpu_kernels=megagpt: no C compiler found; use auto"
    ):
        cpu_kernels_enabled("megagpt", cpu)
    with pytest.raises(ValueError, match="expected one of"):
        cpu_kernels_enabled("yes", cpu)


def test_asking_for_the_kernels_where_they_cannot_build_fails_validation(monkeypatch):
    """Before any process group: the key, why, and what to set instead."""
    from megagpt.config import load_config, validate
    from megagpt.config.loader import ConfigError

    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    monkeypatch.setattr(cpu_kernels, "unavailable_reason", lambda: "this CPU has no AVX-512")
    cfg = load_config(
        None, ["model.name=gpt3-tiny", "train.cpu_kernels=megagpt", "train.device=cpu"]
    )
    with pytest.raises(
        ConfigError, match="train.cpu_kernels=megagpt: this CPU has no AVX-512; set"
    ):
        validate(cfg, 1, cuda=False, need_data=False)
    validate(
        load_config(None, ["model.name=gpt3-tiny", "train.device=cpu"]),
        1,
        cuda=False,
        need_data=False,
    )  # auto: falls back, no error


@needs_kernel
@pytest.mark.slow  # one inductor compile of the layer (~30-90 s on a loaded 2-core CPU)
def test_a_compiled_layer_calls_the_same_attention_kernel_and_masks():
    """train.compile with our kernels: the compiled layer reaches the attention kernel through a
    graph break, with the layer's dropout seed, so loss and gradients equal the eager model's."""
    from megagpt.config import ParallelConfig, from_name
    from megagpt.model import GPTModel, initialize_weights, megatron_config
    from megagpt.model.compile import compile_decoder_layers
    from megagpt.model.layers import use_cpu_kernels

    cfg = from_name("gpt3-tiny")
    cfg.num_layers, cfg.dropout, cfg.attention_dropout = 2, 0.1, 0.1
    tokens = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    results = []
    for compiled in (False, True):
        model = GPTModel(cfg, megatron_config(cfg, ParallelConfig()))
        initialize_weights(model, cfg, 5, 0, 1)
        use_cpu_kernels(model)
        if compiled:
            compile_decoder_layers(model)
        torch.manual_seed(3)
        model.dropout_rng.seed(3, 0)
        seen = []
        real = cpu_training._CausalAttention.apply
        cpu_training._CausalAttention.apply = lambda *a, s=seen, r=real: (s.append(a[2]), r(*a))[1]
        try:
            loss = model.train()(tokens[:, :-1], tokens[:, 1:])
            loss.backward()
        finally:
            cpu_training._CausalAttention.apply = real
        results.append((loss.detach(), seen, {n: p.grad for n, p in model.named_parameters()}))
    (eager, eager_seeds, eager_g), (comp, comp_seeds, comp_g) = results
    assert len(eager_seeds) == 2 and comp_seeds == eager_seeds  # the same seeds, so masks
    torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-6)
    for name, grad in eager_g.items():
        torch.testing.assert_close(comp_g[name], grad, rtol=1e-4, atol=1e-6, msg=name)
