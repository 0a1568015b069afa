"""Our few-row linear (megagpt/inference/rowgemm.py, kernels/rowgemm.c): F.linear's results for
any row count, shape, bias and input stride; the residual form; its build, reported when it
cannot happen and redone when the cached library is damaged."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from megagpt.inference import rowgemm

needs_kernel = pytest.mark.skipif(
    not rowgemm.available(), reason=f"rowgemm unavailable: {rowgemm.unavailable_reason()}"
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
    packed = rowgemm.pack(w)
    want = F.linear(x, w, b)
    torch.testing.assert_close(rowgemm.linear(x, packed, b), want, rtol=1e-5, atol=1e-4)
    residual = torch.randn(rows, n, generator=g)
    out = residual.clone()
    got = rowgemm.linear(x, packed, b, out=out)
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
        got = rowgemm.linear(x, rowgemm.pack(w), b)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-4)
    col = torch.randn(96, 11, generator=g).t()  # columns: copied first
    torch.testing.assert_close(
        rowgemm.linear(col, rowgemm.pack(w), b), F.linear(col, w, b), rtol=1e-5, atol=1e-4
    )


@needs_kernel
def test_shapes_that_do_not_fit_are_refused():
    packed = rowgemm.pack(torch.randn(10, 8))
    with pytest.raises(ValueError, match=r"x \(3, 9\) for a \[10, 8\] weight"):
        rowgemm.linear(torch.randn(3, 9), packed)
    with pytest.raises(ValueError, match=r"out \(3, 11\)"):
        rowgemm.linear(torch.randn(3, 8), packed, out=torch.empty(3, 11))


def _probe(env: dict[str, str]) -> str:
    """available() and unavailable_reason() in a fresh process (the library is built once per
    process) with ``env`` added."""
    code = textwrap.dedent(
        """
        from megagpt.inference import rowgemm
        print(rowgemm.available(), "|", rowgemm.unavailable_reason())
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
    out = _probe({"MEGAGPT_ROWGEMM": "0", "MEGAGPT_KERNEL_CACHE": str(tmp_path)})
    assert out == "False | turned off by MEGAGPT_ROWGEMM=0"


def test_a_failed_build_is_reported_and_the_decoder_keeps_its_packs(tmp_path):
    """A compiler that fails: rowgemm says which and why, and nothing is left in the cache."""
    out = _probe({"CC": "false", "MEGAGPT_KERNEL_CACHE": str(tmp_path)})
    assert out.startswith("False | ") and "false failed on" in out and "rowgemm.c" in out
    assert list(tmp_path.iterdir()) == []


@needs_kernel
def test_a_damaged_library_in_the_cache_is_built_again(tmp_path):
    """A truncated .so where the build would be (a full disk, a killed copy) is replaced."""
    cc = rowgemm._compiler()
    assert cc is not None
    target = rowgemm.library_path(cc).name
    (tmp_path / target).write_bytes(b"\x7fELF not a library")
    assert _probe({"MEGAGPT_KERNEL_CACHE": str(tmp_path)}) == "True |"
    assert (tmp_path / target).stat().st_size > 1000
