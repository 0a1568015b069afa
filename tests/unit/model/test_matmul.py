"""train.cpu_matmul: fp32 CPU GEMMs on oneDNN (megagpt/model/matmul.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from megagpt.model import matmul
from megagpt.model.matmul import cpu_matmul_enabled, mm_t, onednn_linear, use_onednn

needs_onednn = pytest.mark.skipif(
    matmul.onednn_unavailable() is not None, reason=str(matmul.onednn_unavailable())
)
ONEDNN = "_linear_pointwise"


class Kernels(TorchDispatchMode):
    """Counts the ops run under it, by name."""

    def __init__(self):
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("k,m", [(48, 80), (192, 48)], ids=["narrowing-blas-dw", "wide-onednn-dw"])
def test_onednn_linear_equals_f_linear_on_onednn(bias, needs, k, m):
    """Output and every requested gradient equal F.linear's within fp32 rounding; the forward
    and the input gradient run oneDNN's kernel, and so does the weight gradient of a linear
    with more inputs than outputs (k > m, the MLP's second linear); other weight gradients run
    on the BLAS."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, k, generator=gen).requires_grad_(needs[0])  # [s, b, k]
    w = torch.randn(m, k, generator=gen).requires_grad_(needs[1])
    b = torch.randn(m, generator=gen).requires_grad_(needs[1]) if bias else None
    grad = torch.randn(6, 5, m, generator=gen)
    inputs = [t for t in (x, w, b) if t is not None and t.requires_grad]
    with Kernels() as kernels:
        out = onednn_linear(x, w, b)
        got = torch.autograd.grad(out, inputs, grad)
    ref = F.linear(x, w, b)
    want = torch.autograd.grad(ref, inputs, grad)
    assert out.shape == (6, 5, m)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, r in zip(got, want):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
    if needs[1]:
        assert got[1 if needs[0] else 0].is_contiguous()  # autograd takes it as .grad, no copy
    wide_dw = needs[1] and k > m
    calls = kernels.calls
    assert calls.get(ONEDNN) == 1 + needs[0] + wide_dw, calls  # forward, dx when asked, wide dw
    assert calls.get("mm", 0) == int(needs[1] and not wide_dw), calls  # other dw on the BLAS


@needs_onednn
def test_a_wide_weight_gradient_repeats_bit_for_bit():
    """The oneDNN weight gradient gives the same bits for the same inputs (a resumed run
    repeats the uninterrupted one)."""
    gen = torch.Generator().manual_seed(2)
    g, x = torch.randn(96, 24, generator=gen), torch.randn(96, 80, generator=gen)
    first = matmul.weight_grad(g, x)
    assert torch.equal(matmul.weight_grad(g, x), first)
    torch.testing.assert_close(first, g.t() @ x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k,m", [(48, 80), (192, 48)])
def test_an_empty_batch_gives_empty_outputs_and_zero_weight_gradients(k, m):
    """No rows (for the weight gradient a reduction of length 0, which oneDNN has no primitive
    for): the output is empty, the input gradient empty and the weight and bias gradients zero,
    as with F.linear."""
    x = torch.randn(0, 3, k, requires_grad=True)  # [s=0, b, k]
    w = torch.randn(m, k, requires_grad=True)
    b = torch.randn(m, requires_grad=True)
    out = onednn_linear(x, w, b)
    assert out.shape == (0, 3, m)
    dx, dw, db = torch.autograd.grad(out.sum(), (x, w, b))
    assert dx.shape == x.shape and not dw.any() and not db.any()
    assert matmul.weight_grad(torch.randn(0, m), torch.randn(0, k)).shape == (m, k)
    assert not matmul.weight_grad(torch.randn(0, m), torch.randn(0, k)).any()
    assert mm_t(torch.randn(0, k), w.detach(), True).shape == (0, m)


@needs_onednn
def test_onednn_linear_reads_the_weight_as_it_is_and_repeats_bit_for_bit():
    """oneDNN keeps no stale copy of a weight updated in place (an optimizer step), and the
    same inputs give the same bits (so a resumed run repeats the uninterrupted one)."""
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(64, 32, generator=gen), torch.randn(16, 32, generator=gen)
    first = onednn_linear(x, w)
    assert torch.equal(onednn_linear(x, w), first)
    w.add_(1.0)
    torch.testing.assert_close(onednn_linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    assert torch.equal(mm_t(x, w, True), onednn_linear(x, w))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_other_dtypes_stay_on_f_linear(dtype):
    x, w = torch.randn(8, 16, dtype=dtype), torch.randn(4, 16, dtype=dtype)
    with Kernels() as k:
        out = onednn_linear(x, w)
        mm_t(x, w, True)
    assert ONEDNN not in k.calls
    torch.testing.assert_close(out, F.linear(x, w))


def test_the_setting_resolves_per_device(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not cpu_matmul_enabled("blas", cpu)
    assert not cpu_matmul_enabled("auto", cuda) and not cpu_matmul_enabled("onednn", cuda)
    monkeypatch.setattr(matmul.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(matmul, "onednn_unavailable", lambda: None)
    monkeypatch.setattr(matmul, "cpu_vendor", lambda: "AuthenticAMD")
    assert cpu_matmul_enabled("auto", cpu) and cpu_matmul_enabled("onednn", cpu)
    assert "oneDNN" in matmul.cpu_matmul_note("auto", cpu)
    # An Intel CPU: MKL ran every GEMM of the step as fast or faster, the step 20 % faster.
    monkeypatch.setattr(matmul, "cpu_vendor", lambda: "GenuineIntel")
    assert not cpu_matmul_enabled("auto", cpu) and cpu_matmul_enabled("onednn", cpu)
    assert "an Intel CPU" in matmul.cpu_matmul_note("auto", cpu)
    for vendor in ("HygonGenuine", None):  # not measured: the BLAS
        monkeypatch.setattr(matmul, "cpu_vendor", lambda v=vendor: v)
        assert not cpu_matmul_enabled("auto", cpu)
        assert f"vendor {vendor or 'unknown'}" in matmul.cpu_matmul_note("auto", cpu)
    monkeypatch.setattr(matmul, "cpu_vendor", lambda: "AuthenticAMD")
    monkeypatch.setattr(matmul.platform, "machine", lambda: "aarch64")
    assert not cpu_matmul_enabled("auto", cpu)  # not measured there: the BLAS
    assert cpu_matmul_enabled("onednn", cpu)  # asked for by name
    monkeypatch.setattr(matmul, "onednn_unavailable", lambda: "no kernel in this build")
    assert not cpu_matmul_enabled("auto", cpu)
    with pytest.raises(ValueError, match="train.cpu_matmul=onednn: no kernel in this build"):
        cpu_matmul_enabled("onednn", cpu)
    with pytest.raises(ValueError, match="expected one of"):
        cpu_matmul_enabled("mkl", cpu)


def test_the_cpu_vendor_is_read_from_cpuinfo(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n")
    real_open = open

    def fake_open(path, *a, **k):
        return real_open(cpuinfo if path == "/proc/cpuinfo" else path, *a, **k)

    monkeypatch.setattr("builtins.open", fake_open)
    matmul.cpu_vendor.cache_clear()
    try:
        assert matmul.cpu_vendor() == "AuthenticAMD"
        cpuinfo.unlink()  # no /proc (macOS, Windows): what platform.processor() ends with
        monkeypatch.setattr(
            matmul.platform, "processor", lambda: "Intel64 Family 6 Model 207, GenuineIntel"
        )
        matmul.cpu_vendor.cache_clear()
        assert matmul.cpu_vendor() == "GenuineIntel"
        monkeypatch.setattr(matmul.platform, "processor", lambda: "")
        matmul.cpu_vendor.cache_clear()
        assert matmul.cpu_vendor() is None
    finally:
        matmul.cpu_vendor.cache_clear()


def test_asking_for_onednn_without_the_kernel_fails_validation(monkeypatch):
    """Before any process group: the key, what is missing and what to set instead."""
    from megagpt.config import load_config, validate
    from megagpt.config.loader import ConfigError

    monkeypatch.setattr(matmul, "onednn_unavailable", lambda: "no kernel in this build")
    cfg = load_config(None, ["model.name=gpt3-tiny", "train.cpu_matmul=onednn"])
    with pytest.raises(ConfigError, match="train.cpu_matmul=onednn: no kernel in this build"):
        validate(cfg, 1, cuda=False, need_data=False)
    with pytest.raises(ConfigError, match="cpu_matmul"):
        load_config(None, ["model.name=gpt3-tiny", "train.cpu_matmul=mkl"])


def _gpt():
    from megagpt.config import ParallelConfig, from_name
    from megagpt.model import GPTModel, initialize_weights, megatron_config

    cfg = from_name("gpt3-tiny")
    cfg.num_layers, cfg.dropout, cfg.attention_dropout = 2, 0.0, 0.0
    model = GPTModel(cfg, megatron_config(cfg, ParallelConfig(), torch.float32))
    initialize_weights(model, cfg, 5, 0, 1)
    return model.train(), cfg


@needs_onednn
def test_a_marked_model_runs_its_gemms_on_onednn_and_learns_the_same():
    """use_onednn marks the attention, MLP and word-embedding blocks: a training step runs
    every layer's forward and input-gradient GEMMs and the output layer's on oneDNN, and its
    loss and gradients equal the unmarked model's within fp32 rounding."""
    model, cfg = _gpt()
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, cfg.vocab_size, (2, 32), generator=gen)
    labels = tokens.roll(-1, 1)
    results = []
    for marked in (False, True):
        if marked:
            assert use_onednn(model) == 2 * 2 + 1  # attention + MLP per layer, word embedding
        with Kernels() as k:
            loss = model(tokens, labels)
            grads = torch.autograd.grad(loss, list(model.parameters()))
        results.append((loss, grads, k.calls.get(ONEDNN, 0)))
    (ref, ref_grads, none), (loss, grads, calls) = results
    assert none == 0
    # per layer: QKV, dense, fc1, fc2 forward and input gradient = 8, and fc2's weight gradient
    # (4h inputs, h outputs); output layer: logits and input gradient (one chunk of 64 rows)
    assert calls == 2 * (8 + 1) + 2
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for (name, _), a, b in zip(model.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
