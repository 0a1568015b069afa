"""``train.cpu_kernels``: the decoder layer's attention and MLP activation on megagpt's own CPU
kernels (fp32), as autograd functions.

- ``causal_attention``: softmax(Q K^T / sqrt(head_dim)) V, causal, read from the QKV
  projection's ``[s, b, heads, 3 * head_dim]`` output and written as ``[s, b, heads,
  head_dim]``, the layout the output linear reads; the backward writes the gradient straight
  into the projection's layout (``kernels/cpu_attention.c``). torch's path around its CPU
  flash attention splits, permutes, zero-fills the gradients and concatenates dq, dk and dv;
  at the lengths CPU training runs (up to ``ATTENTION_MAX_SEQ`` tokens) ours took half the
  time of that path per gpt3-base layer (docs/training-speed.md). Longer sequences keep
  torch's flash attention, which is faster there.
- ``linear_gelu``: the MLP's first linear, bias and GELU: the GEMM without the bias, then one
  pass writing GELU(x + b) and, over the GEMM's output, the GELU's derivative; the backward
  multiplies by it and sums the bias gradient in the same pass (``kernels/cpu_gelu.c``). It
  replaces torch's bias broadcast inside ``addmm``, its GELU, its GELU backward (erf and exp
  again) and the bias's column sum, and keeps as much memory (the derivative in place of the
  pre-activation).

Results equal torch's within fp32 rounding, and are the same bits from run to run (static
OpenMP schedules, sums in a fixed order), so a resume stays exact. Attention dropout draws its
mask in the kernel from the layer's dropout seed (a hash of the seed, batch row, head and
position pair; not SDPA's masks, the same distribution), recomputed in the backward.
Selective recompute has nothing to recompute there: the kernel keeps no s x s tensor. They
apply to fp32 CPU tensors; everything else (CUDA, bf16, a KV cache, tensor parallelism for
the MLP, an MLP inside a ``torch.compile`` trace, where inductor fuses the GELU itself) keeps
torch's path; a compiled layer calls the attention kernel through a graph break. ``auto`` uses
them on an Intel CPU, where they were measured, when the kernels build
(``megagpt.model.cpu_kernels``: a C compiler and AVX-512).
"""

from __future__ import annotations

import torch

from megagpt.model import cpu_kernels
from megagpt.model.matmul import cpu_vendor, mm_t, weight_grad

CPU_KERNELS_CHOICES = ("auto", "megagpt", "torch")  # not on/off: YAML reads those as booleans
ATTENTION_MAX_SEQ = 512  # causal_attention's longest sequence (longer: torch's flash attention)


def _usable(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and cpu_kernels.available()


# -- attention -------------------------------------------------------------------------------


def attention_applies(qkv: torch.Tensor) -> bool:
    """Whether ``causal_attention`` takes this ``[s, b, heads, 3 * head_dim]`` projection: fp32 on
    the CPU, each head's q | k | v contiguous, ``head_dim`` a multiple of 16, ``s`` at most
    ``ATTENTION_MAX_SEQ`` and the kernels built."""
    return (
        qkv.dim() == 4
        and qkv.shape[-1] % 48 == 0
        and 0 < qkv.shape[0] <= ATTENTION_MAX_SEQ
        and qkv.shape[1] > 0
        and qkv.stride(3) == 1
        and qkv.stride(2) == qkv.shape[3]
        and _usable(qkv)
    )


def _scratch_check(failed: int, s: int, hd: int) -> None:
    if failed:
        raise MemoryError(
            f"causal_attention: a thread could not allocate its scratch for s={s}, "
            f"head_dim={hd} (about {(2 * s * s + 8 * s * hd) * 4 >> 20} MiB)"
        )


class _CausalAttention(torch.autograd.Function):
    """[s, b, nh, 3hd] -> [s, b, nh, hd]. Saves the input, the output and each query's
    log-sum-exp ([b, nh, s]); the backward recomputes the probabilities (and the dropout mask,
    a hash of ``seed``, the batch row, the head ``head0 + h`` and the position pair) from
    them."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, p: float, seed: int, head0: int) -> torch.Tensor:
        s, b, nh, three_hd = qkv.shape
        hd = three_hd // 3
        out = torch.empty(s, b, nh, hd, dtype=qkv.dtype)  # [s, b, nh, hd]
        lse = torch.empty(b, nh, s, dtype=qkv.dtype)
        failed = cpu_kernels.library().attn_train_fwd(
            qkv.data_ptr(),
            qkv.stride(0),
            qkv.stride(1),
            out.data_ptr(),
            out.stride(0),
            out.stride(1),
            lse.data_ptr(),
            b,
            s,
            nh,
            hd,
            p,
            seed,
            head0,
            torch.get_num_threads(),
        )
        _scratch_check(failed, s, hd)
        ctx.save_for_backward(qkv, out, lse)
        ctx.dropout = (p, seed, head0)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        qkv, out, lse = ctx.saved_tensors
        s, b, nh, hd = out.shape
        grad = grad.contiguous()  # out's layout (the output linear's gradient already is)
        # [s, b, nh, 3hd] in qkv's strides (the kernel reads and writes with the same ones);
        # every element is written
        dqkv = torch.empty_strided(qkv.shape, qkv.stride(), dtype=qkv.dtype)
        failed = cpu_kernels.library().attn_train_bwd(
            qkv.data_ptr(),
            qkv.stride(0),
            qkv.stride(1),
            out.data_ptr(),
            grad.data_ptr(),
            out.stride(0),
            out.stride(1),
            lse.data_ptr(),
            dqkv.data_ptr(),
            b,
            s,
            nh,
            hd,
            *ctx.dropout,
            torch.get_num_threads(),
        )
        _scratch_check(failed, s, hd)
        return dqkv, None, None, None


@torch.compiler.disable  # a graph break in a compiled layer: the same kernel and masks as eager
def causal_attention(
    qkv: torch.Tensor, dropout: float = 0.0, seed: int = 0, head0: int = 0
) -> torch.Tensor:
    """``qkv`` [s, b, heads, 3 * head_dim] (each head's q | k | v, the QKV projection's layout)
    -> [s, b, heads, head_dim]: SDPA's result with ``is_causal=True`` and scale
    1/sqrt(head_dim) within fp32 rounding, with its backward. ``dropout``: attention dropout's
    probability, its mask drawn from ``seed`` (0 <= seed < 2**64) and the global head index
    ``head0 + h`` of local head h (each tensor-parallel rank holds other heads); the same
    arguments give the same mask. A ValueError where ``attention_applies(qkv)`` is False or
    ``dropout`` is outside [0, 1)."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"causal_attention: dropout={dropout}: expected 0 <= p < 1")
    if not attention_applies(qkv):
        why = "" if cpu_kernels.available() else f" ({cpu_kernels.unavailable_reason()})"
        raise ValueError(
            f"causal_attention: qkv {tuple(qkv.shape)} {qkv.dtype} on {qkv.device} with strides "
            f"{qkv.stride()}: expected fp32 CPU [s <= {ATTENTION_MAX_SEQ}, b, heads, "
            f"3 * head_dim], head_dim a multiple of 16, each head's q | k | v contiguous{why}"
        )
    return _CausalAttention.apply(qkv, float(dropout), int(seed) % 2**64, int(head0))


# -- the MLP's first linear + bias + GELU ----------------------------------------------------


def linear_gelu_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``linear_gelu`` takes ``x`` [..., in] and ``weight`` [out, in]: fp32 CPU, ``out``
    a multiple of 16, outside a ``torch.compile`` trace and the kernels built."""
    return (
        weight.dim() == 2
        and weight.shape[0] % 16 == 0
        and x.shape[-1] == weight.shape[1]
        and weight.dtype == torch.float32
        and not torch.compiler.is_compiling()
        and _usable(x)
    )


class _LinearGelu(torch.autograd.Function):
    """GELU(x @ W^T + b). Saves x, W and the GELU's derivative at x @ W^T + b."""

    @staticmethod
    def forward(ctx, x, weight, bias, approximate: str, onednn: bool):
        x2 = x.reshape(-1, x.shape[-1])  # [..., in] -> [n, in]
        pre = mm_t(x2, weight, onednn)  # [n, out], a new tensor
        out = torch.empty_like(pre)
        cpu_kernels.library().bias_gelu_fwd(
            pre.data_ptr(),
            None if bias is None else bias.contiguous().data_ptr(),
            out.data_ptr(),
            pre.shape[0],
            pre.shape[1],
            cpu_kernels.ACTIVATIONS[approximate],
            torch.get_num_threads(),
        )  # pre now holds GELU'(x @ W^T + b)
        ctx.save_for_backward(x2, weight, pre)
        ctx.x_shape, ctx.has_bias, ctx.onednn = x.shape, bias is not None, onednn
        return out.view(*x.shape[:-1], weight.shape[0])  # [n, out] -> [..., out]

    @staticmethod
    def backward(ctx, grad):
        x2, weight, slope = ctx.saved_tensors
        grad = grad.reshape(-1, weight.shape[0]).contiguous()  # [..., out] -> [n, out]
        g = torch.empty_like(slope)  # the gradient at the pre-activation
        db = torch.empty(weight.shape[0], dtype=slope.dtype) if ctx.has_bias else None
        failed = cpu_kernels.library().bias_gelu_bwd(
            grad.data_ptr(),
            slope.data_ptr(),
            g.data_ptr(),
            None if db is None else db.data_ptr(),
            g.shape[0],
            g.shape[1],
            torch.get_num_threads(),
        )
        if failed:
            raise MemoryError(
                f"linear_gelu: could not allocate the bias gradient's partial sums "
                f"({(g.shape[0] + 63) // 64} x {g.shape[1]} floats)"
            )
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = mm_t(g, weight.t(), ctx.onednn).view(ctx.x_shape)  # [n, in]
        if ctx.needs_input_grad[1]:
            dw = weight_grad(g, x2) if ctx.onednn else g.t() @ x2  # [out, in]
        return dx, dw, db if ctx.needs_input_grad[2] else None, None, None


def linear_gelu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    approximate: str = "none",
    onednn: bool = False,
) -> torch.Tensor:
    """``F.gelu(F.linear(x, weight, bias), approximate=approximate)`` with the bias and GELU on
    our kernel (``onednn``: the GEMMs as ``matmul.onednn_linear`` runs them). A ValueError where
    ``linear_gelu_applies`` is False."""
    if not linear_gelu_applies(x, weight) or approximate not in ("none", "tanh"):
        raise ValueError(
            f"linear_gelu: x {tuple(x.shape)} {x.dtype} on {x.device}, weight "
            f"{tuple(weight.shape)} {weight.dtype}, approximate={approximate!r}: expected fp32 "
            f"CPU tensors, out_features a multiple of 16, 'none' or 'tanh', and the kernels "
            f"({cpu_kernels.unavailable_reason() or 'built'})"
        )
    return _LinearGelu.apply(x, weight, bias, approximate, onednn)


# -- the setting -----------------------------------------------------------------------------


def _auto_reason() -> str | None:
    """Why ``train.cpu_kernels=auto`` keeps torch's kernels here, or None."""
    if not cpu_kernels.available():
        return f"megagpt's CPU kernels are not available: {cpu_kernels.unavailable_reason()}"
    vendor = cpu_vendor()
    if vendor != "GenuineIntel":
        return f"CPU vendor {vendor or 'unknown'}: measured against torch's on Intel CPUs only"
    return None


def cpu_kernels_enabled(setting: str, device: torch.device) -> bool:
    """Whether ``train.cpu_kernels`` = ``setting`` runs the decoder layers' attention and MLP
    activation on our kernels for a run on ``device``: ``megagpt`` (a ValueError where the
    kernels cannot be built), ``torch``, or ``auto`` = on an Intel CPU where they build. A CUDA run
    never does."""
    if setting not in CPU_KERNELS_CHOICES:
        raise ValueError(f"train.cpu_kernels={setting!r}: expected one of {CPU_KERNELS_CHOICES}")
    if device.type != "cpu" or setting == "torch":
        return False
    if setting == "megagpt":
        if not cpu_kernels.available():
            raise ValueError(
                f"train.cpu_kernels=megagpt: {cpu_kernels.unavailable_reason()}; use auto or torch"
            )
        return True
    return _auto_reason() is None


def cpu_kernels_note(setting: str, device: torch.device) -> str:
    """One log line: whether this run's decoder layers use our CPU kernels."""
    if cpu_kernels_enabled(setting, device):
        return (
            f"attention (up to {ATTENTION_MAX_SEQ} tokens) and the MLP's bias + GELU on "
            f"megagpt's CPU kernels (train.cpu_kernels={setting})"
        )
    if device.type != "cpu":
        return "attention and GELU: torch's (train.cpu_kernels applies to CPU runs)"
    why = "" if setting == "torch" else f": {_auto_reason()}"
    return f"attention and GELU: torch's (train.cpu_kernels={setting}{why})"
