"""Our CPU decode kernels (megagpt/model/cpu_kernels.py, kernels/cpu_decode.c): F.linear's
results for any row count, shape, bias and input stride; the residual form and the fused GELU;
the attention over the cache; the build, reported when it cannot happen and redone when the
cached library is damaged."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from megagpt.model import cpu_kernels

needs_kernel = pytest.mark.skipif(
    not cpu_kernels.available(),
    reason=f"CPU kernels unavailable: {cpu_kernels.unavailable_reason()}",
)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 17, 64])
@pytest.mark.parametrize("out_in", [(100, 37), (48, 64), (5, 3), (2304, 768)], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_equals_f_linear(rows, out_in, bias):
    n, k = out_in
    g = torch.Generator().manual_seed(rows * 1000 + n)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    x = torch.randn(rows, k, generator=g)
    packed = cpu_kernels.pack(w)
    want = F.linear(x, w, b)
    torch.testing.assert_close(cpu_kernels.linear(x, packed, b), want, rtol=1e-5, atol=1e-4)
    residual = torch.randn(rows, n, generator=g)
    out = residual.clone()
    got = cpu_kernels.linear(x, packed, b, out=out)
    assert got is out  # in place
    torch.testing.assert_close(out, residual + want, rtol=1e-5, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
def test_strided_rows_and_thread_counts(threads):
    """Rows of a wider tensor (the attention context's rows, a slice of the cache) are read in
    place at their stride; the result does not depend on the thread count."""
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(200, 96, generator=g), torch.randn(200, generator=g)
    wide = torch.randn(11, 160, generator=g)
    x = wide[:, 10:106]  # [11, 96], rows 160 apart
    assert x.stride() == (160, 1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        got = cpu_kernels.linear(x, cpu_kernels.pack(w), b)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-4)
    col = torch.randn(96, 11, generator=g).t()  # columns: copied first
    torch.testing.assert_close(
        cpu_kernels.linear(col, cpu_kernels.pack(w), b), F.linear(col, w, b), rtol=1e-5, atol=1e-4
    )


@needs_kernel
def test_shapes_that_do_not_fit_are_refused():
    packed = cpu_kernels.pack(torch.randn(10, 8))
    with pytest.raises(ValueError, match=r"x \(3, 9\) torch.float32 for a \[10, 8\] float32"):
        cpu_kernels.linear(torch.randn(3, 9), packed)
    with pytest.raises(ValueError, match=r"x \(3, 8\) torch.bfloat16"):
        cpu_kernels.linear(torch.randn(3, 8, dtype=torch.bfloat16), packed)
    with pytest.raises(ValueError, match=r"pack: .* got \(10, 8\) torch.float64 on cpu"):
        cpu_kernels.pack(torch.randn(10, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"out \(3, 11\)"):
        cpu_kernels.linear(torch.randn(3, 8), packed, out=torch.empty(3, 11))


@needs_kernel
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_the_fused_gelu_is_as_close_to_the_exact_one_as_torchs(approximate):
    """The GELU the linear fuses, against float64's, at least as close as torch's float32 one
    (absolute), and within a few float32 ulps of the value relative to it; also through the
    linear's epilogue."""
    x = torch.cat(
        [torch.linspace(-12, 12, 20001), torch.randn(1000) * 3, torch.tensor([0.0, 90.0, -90.0])]
    )
    exact = F.gelu(x.double(), approximate=approximate)
    ours = cpu_kernels.gelu(x, approximate).double()
    theirs = F.gelu(x, approximate=approximate).double()
    assert (ours - exact).abs().max() <= max((theirs - exact).abs().max(), 6e-7)
    big = exact.abs() > 1e-6
    assert ((ours - exact).abs() / exact.abs())[big].max() < 5e-6
    g = torch.Generator().manual_seed(2)
    w, b, rows = (
        torch.randn(200, 64, generator=g),
        torch.randn(200, generator=g),
        torch.randn(8, 64, generator=g),
    )
    got = cpu_kernels.linear(rows, cpu_kernels.pack(w), b, gelu=approximate)
    torch.testing.assert_close(
        got, F.gelu(F.linear(rows, w, b), approximate=approximate), rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ValueError, match="residual add"):
        cpu_kernels.linear(rows, cpu_kernels.pack(w), b, out=torch.zeros(8, 200), gelu=approximate)


def _reference_attention(qkv, positions, keys, values, rows):
    """torch's path (FastDecoder.verify's): scatter the keys and values, SDPA with a mask."""
    b, nh, length, hd = keys.shape
    s = qkv.shape[0] // rows
    q, k, v = qkv.view(b, s, nh, 3 * hd).transpose(1, 2).split(hd, dim=-1)
    pos = positions.view(b, s)
    at = torch.arange(b).unsqueeze(1).expand(b, s)
    keys[at, :, pos] = k.transpose(1, 2)
    values[at, :, pos] = v.transpose(1, 2)
    mask = (torch.arange(length).view(1, 1, length) <= pos.unsqueeze(2)).unsqueeze(1)
    ctx = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    return ctx.transpose(1, 2).reshape(b * s, nh * hd)


@needs_kernel
@pytest.mark.parametrize(
    "rows,s,hd,starts",
    [(1, 1, 64, [0]), (3, 1, 64, [5, 0, 37]), (2, 5, 32, [3, 17]), (4, 3, 128, [0, 1, 2, 30])],
)
def test_attend_equals_sdpa_over_the_cache(rows, s, hd, starts):
    """Each fed token sees its row's slots up to its own (earlier tokens of the same pass
    included), the cache holds the fed keys and values afterwards, slots past them untouched;
    a softmax over up to 45 slots exercises the vector body and its tail."""
    g = torch.Generator().manual_seed(rows * 100 + s)
    nh, length = 3, 48
    qkv = torch.randn(rows * s, nh * 3 * hd, generator=g) * 2
    positions = (torch.tensor(starts).unsqueeze(1) + torch.arange(s)).view(-1)
    keys, values = (
        torch.randn(rows, nh, length, hd, generator=g),
        torch.randn(rows, nh, length, hd, generator=g),
    )
    ref_keys, ref_values = keys.clone(), values.clone()
    want = _reference_attention(qkv, positions, ref_keys, ref_values, rows)
    got = cpu_kernels.attend(qkv, positions, keys, values, rows)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(keys, ref_keys) and torch.equal(values, ref_values)


@needs_kernel
def test_attend_refuses_slots_outside_the_cache():
    keys = torch.zeros(2, 1, 8, 16)
    qkv = torch.zeros(2, 48)
    before = keys.clone()
    with pytest.raises(
        ValueError, match=r"token 1 \(row 1\) has cache slot 8, outside the cache's 0..7"
    ):
        cpu_kernels.attend(qkv + 1, torch.tensor([3, 8]), keys, keys.clone(), 2)
    assert torch.equal(keys, before)  # nothing written
    with pytest.raises(ValueError, match=r"token 0 \(row 0\) has cache slot -1"):
        cpu_kernels.attend(qkv, torch.tensor([-1, 2]), keys, keys.clone(), 2)
    with pytest.raises(ValueError, match=r"attend: qkv \(2, 48\), positions \(2,\) torch.int32"):
        cpu_kernels.attend(qkv, torch.tensor([3, 4], dtype=torch.int32), keys, keys.clone(), 2)


def _probe(env: dict[str, str]) -> str:
    """available() and unavailable_reason() in a fresh process (the library is built once per
    process) with ``env`` added."""
    code = textwrap.dedent(
        """
        from megagpt.model import cpu_kernels
        print(cpu_kernels.available(), "|", cpu_kernels.unavailable_reason())
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


def test_turned_off_by_the_environment(tmp_path):
    out = _probe({"MEGAGPT_CPU_KERNELS": "0", "MEGAGPT_KERNEL_CACHE": str(tmp_path)})
    assert out == "False | turned off by MEGAGPT_CPU_KERNELS=0"


def test_a_failed_build_is_reported_and_the_decoder_keeps_its_packs(tmp_path):
    """A compiler that fails: cpu_kernels says which and why, and nothing is left in the cache."""
    out = _probe({"CC": "false", "MEGAGPT_KERNEL_CACHE": str(tmp_path)})
    assert out.startswith("False | ") and "false failed on" in out and "cpu_decode.c" in out
    assert list(tmp_path.iterdir()) == []


@needs_kernel
def test_a_damaged_library_in_the_cache_is_built_again(tmp_path):
    """A truncated .so where the build would be (a full disk, a killed copy) is replaced."""
    cc = cpu_kernels._compiler()
    assert cc is not None
    target = cpu_kernels.library_path(cc).name
    (tmp_path / target).write_bytes(b"\x7fELF not a library")
    assert _probe({"MEGAGPT_KERNEL_CACHE": str(tmp_path)}) == "True |"
    assert (tmp_path / target).stat().st_size > 1000
