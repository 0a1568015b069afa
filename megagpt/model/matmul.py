"""``train.cpu_matmul``: the fp32 GEMMs of a CPU training step on oneDNN instead of torch's BLAS.

On an x86-64 CPU torch runs fp32 ``F.linear`` / ``torch.mm`` through its BLAS (MKL in the
official wheels). oneDNN, which the same wheels ship (torch uses it for bf16 GEMMs and for
inductor's CPU linears), ran the forward and input-gradient GEMMs of a GPT training step
faster: on a 2-core AMD EPYC (Zen 4), torch 2.13, fp32, 188-196 against 149-168 GFLOP/s inside
a gpt3-base step, and the whole step took 7.5 % less time (docs/training-speed.md). The weight
gradients stay on the BLAS, which was as fast or faster there, except where a linear has more
inputs than outputs (the MLP's second linear): oneDNN ran those 1.09-1.17x faster.

``onednn_linear(x, weight, bias)`` is ``F.linear`` with that split: an autograd function whose
forward and input gradient call oneDNN's linear (``torch.ops.mkldnn._linear_pointwise``, the
kernel inductor emits for CPU linears; it reads the weight as it is at each call) and whose
weight gradient is ``torch.mm``, or oneDNN for a linear with more inputs than outputs
(``weight_grad``). Results equal ``F.linear`` within fp32 rounding (another
summation order), and are bit-reproducible from run to run like the BLAS's, so a resume stays
exact. It applies to fp32 tensors on the CPU, eager or inside a ``torch.compile``d layer (which
calls the same kernel through the ``megagpt::onednn_linear`` operator); anything else goes to
``F.linear``.

``auto`` uses it where torch has the kernel on an AMD x86-64 CPU. On an Intel one (a 2-core
Xeon, Emerald Rapids, torch 2.13, fp32) MKL, the BLAS of torch's wheels and Intel's own library,
ran every GEMM shape of the gpt3-base step at 242-311 GFLOP/s, oneDNN at 119-314 (the MLP's
second linear: 119-138), and the whole step took 20 % less time on the BLAS; MKL's slower paths
on AMD CPUs are what oneDNN wins back there. Elsewhere (other vendors, other architectures)
oneDNN's fp32 GEMM has not been measured against the BLAS, so ``auto`` keeps the BLAS. The model
is marked once, at construction (``use_onednn``): its TP = 1 linears and the fused output layer
+ loss. Tensor-parallel layers keep megatron-core's autograd functions.
"""

from __future__ import annotations

import functools
import platform

import torch
import torch.nn.functional as F

CPU_MATMUL_CHOICES = ("auto", "onednn", "blas")


def onednn_unavailable() -> str | None:
    """Why this torch cannot run ``onednn_linear``'s kernel here, or None when it can."""
    if not torch.backends.mkldnn.is_available():
        return "this torch was built without oneDNN (torch.backends.mkldnn.is_available() is False)"
    try:
        torch.ops.mkldnn._linear_pointwise  # noqa: B018 - a lookup that raises when absent
    except (AttributeError, RuntimeError):
        return f"this torch ({torch.__version__}) has no torch.ops.mkldnn._linear_pointwise"
    return None


@functools.cache
def cpu_vendor() -> str | None:
    """This machine's CPU vendor as the CPUID instruction names it (``AuthenticAMD``,
    ``GenuineIntel``, ...), or None where it cannot be read: Linux's ``/proc/cpuinfo``
    (``vendor_id``), else the vendor that ``platform.processor()`` ends with on Windows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "vendor_id":
                    return value.strip() or None
    except OSError:
        pass
    words = platform.processor().replace(",", " ").split()
    known = ("AuthenticAMD", "GenuineIntel", "HygonGenuine", "CentaurHauls")
    return next((w for w in words if w in known), None)


def _auto_reason() -> str | None:
    """Why ``auto`` keeps the BLAS on this machine, or None when it takes oneDNN."""
    why = onednn_unavailable()
    if why is not None:
        return why
    arch = platform.machine().lower()
    if arch not in ("x86_64", "amd64"):
        return f"a {platform.machine()} CPU: oneDNN not measured against the BLAS there"
    vendor = cpu_vendor()
    if vendor == "GenuineIntel":
        return "an Intel CPU, where torch's BLAS (MKL) ran faster"
    if vendor != "AuthenticAMD":
        return f"CPU vendor {vendor or 'unknown'}: oneDNN not measured against the BLAS there"
    return None


def cpu_matmul_enabled(setting: str, device: torch.device) -> bool:
    """Whether ``train.cpu_matmul`` = ``setting`` puts the model's fp32 GEMMs on oneDNN for a run
    on ``device``: ``onednn`` (an error where the kernel is missing), ``blas``, or ``auto`` = on a
    CPU device, AMD x86-64, where torch has the kernel. A CUDA run never does."""
    if setting not in CPU_MATMUL_CHOICES:
        raise ValueError(f"train.cpu_matmul={setting!r}: expected one of {CPU_MATMUL_CHOICES}")
    if device.type != "cpu" or setting == "blas":
        return False
    why = onednn_unavailable()
    if setting == "onednn":
        if why is not None:
            raise ValueError(f"train.cpu_matmul=onednn: {why}; use auto or blas")
        return True
    return _auto_reason() is None


def cpu_matmul_note(setting: str, device: torch.device) -> str:
    """One log line: where this run's fp32 GEMMs go under ``train.cpu_matmul`` = ``setting``."""
    if cpu_matmul_enabled(setting, device):
        return f"fp32 GEMMs: oneDNN for forward and input gradients (train.cpu_matmul={setting})"
    if device.type != "cpu":
        return f"fp32 GEMMs: torch's {device.type} matmul (train.cpu_matmul applies to CPU runs)"
    why = "" if setting == "blas" else f": {_auto_reason()}"
    return f"fp32 GEMMs: torch's BLAS (train.cpu_matmul={setting}{why})"


# The schema spelled out: this module's annotations are strings (``from __future__``).
@torch.library.custom_op(
    "megagpt::onednn_linear",
    mutates_args=(),
    schema="(Tensor x, Tensor w, Tensor? bias) -> Tensor",
)
def _dnn_op(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``_dnn`` as an operator that ``torch.compile`` calls as it is (inductor's own lowering of
    ``mkldnn._linear_pointwise`` expects the prepacked weights of frozen inference graphs)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")


@_dnn_op.register_fake
def _(x, w, bias):
    return x.new_empty((x.shape[0], w.shape[0]))


def _dnn(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [n, k] @ w[m, k]^T (+ bias [m]) on oneDNN; ``w`` may be a strided view. Eager calls the
    kernel directly; a compiled graph calls it through ``megagpt::onednn_linear``."""
    if torch.compiler.is_compiling():
        return _dnn_op(x, w, bias)
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")


def _applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32


def weight_grad(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dW = g^T x: g [n, m] (output gradient), x [n, k] (input) -> [m, k] contiguous.

    Where the linear widens its input's features into fewer outputs (k > m: the MLP's second
    linear), oneDNN reading both operands transposed ran 1.09-1.17x the BLAS's rate at every
    shape measured (h 256-2048, 512-2048 tokens, fp32, 2-core Zen 4; docs/training-speed.md);
    at the other shapes it was as often slower as faster, so those stay on the BLAS. The choice
    depends on the shapes alone: a resumed run takes the same one."""
    # No rows is a reduction of length 0, for which oneDNN builds no primitive: the BLAS's zeros.
    if x.shape[1] > g.shape[1] and g.shape[0] > 0:
        return _dnn(g.t(), x.t(), None)  # [m, n] @ ([k, n])^T
    return g.t() @ x


class _OneDNNLinear(torch.autograd.Function):
    """y = x @ w^T + b: forward and dx on oneDNN, dw where ``weight_grad`` puts it."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        x2 = x.reshape(-1, x.shape[-1])  # [..., k] -> [n, k]
        out = _dnn(x2, weight, bias)  # [n, m]
        ctx.save_for_backward(x2, weight)
        ctx.x_shape = x.shape
        ctx.has_bias = bias is not None
        return out.view(*x.shape[:-1], weight.shape[0])  # [n, m] -> [..., m]

    @staticmethod
    def backward(ctx, grad):
        x2, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # [..., m] -> [n, m]
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _dnn(g, weight.t(), None).view(ctx.x_shape)  # [n, m] @ [m, k]
        if ctx.needs_input_grad[1]:
            dw = weight_grad(g, x2)  # [m, n] @ [n, k]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = g.sum(0)
        return dx, dw, db


def onednn_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: x [..., k], weight [m, k], bias [m] -> [..., m], with the
    forward and the input gradient on oneDNN for fp32 CPU tensors (``F.linear`` otherwise)."""
    if not _applies(x, weight):
        return F.linear(x, weight, bias)
    return _OneDNNLinear.apply(x, weight, bias)


def mm_t(x: torch.Tensor, w: torch.Tensor, onednn: bool) -> torch.Tensor:
    """``x @ w.t()`` without autograd: x [n, k], w [m, k] (or a strided view) -> [n, m]; on
    oneDNN when ``onednn`` and the tensors are fp32 on the CPU."""
    if onednn and _applies(x, w):
        return _dnn(x, w, None)
    return x @ w.t()


def use_onednn(module: torch.nn.Module) -> int:
    """Mark ``module``'s blocks (a whole GPT or a pipeline stage) to run their fp32 CPU GEMMs on
    oneDNN: every submodule with an ``onednn`` flag (attention, MLP, word embedding) gets it
    set. Returns how many."""
    n = 0
    for m in module.modules():
        if isinstance(getattr(m, "onednn", None), bool):
            m.onednn = True
            n += 1
    return n
