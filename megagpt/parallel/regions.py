"""Sequence-parallel communication as autograd functions, on any backend (gloo and NCCL).

megatron-core's own region functions allocate their buffers with ``torch.cuda.current_device()``,
so sequence parallelism could not run on CPU; these use the input's device and the collectives
gloo implements too (``all_gather_into_tensor``, ``reduce_scatter_tensor``). Convention: the
sequence dimension is dim 0 (``[s, b, h]``); ``[s/tp, b, h]`` is one TP rank's chunk.

- ``scatter_to_sequence``   [s] -> this rank's [s/tp]     backward: all-gather
- ``gather_from_sequence``  [s/tp] -> [s]                 backward: reduce-scatter (sum of the
                                                            TP ranks' partial grads)
- ``reduce_scatter_to_sequence`` partial [s] -> summed [s/tp]   backward: all-gather
- ``sequence_parallel_linear``  gather, then x @ W^T + b; saves only the local chunk for the
                                backward and gathers it again there (the memory saving that
                                is the point of sequence parallelism)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed import ProcessGroup


def _all_gather(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """[s/tp, ...] on every rank -> [s, ...] (rank order)."""
    out = torch.empty((x.shape[0] * group.size(), *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


def _reduce_scatter(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """[s, ...] partial sums on every rank -> this rank's [s/tp, ...] chunk of the total."""
    world = group.size()
    if x.shape[0] % world:
        raise ValueError(f"sequence length {x.shape[0]} is not divisible by TP={world}")
    out = torch.empty((x.shape[0] // world, *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
    return out


def _split(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """[s, ...] -> this rank's [s/tp, ...] chunk."""
    world = group.size()
    if x.shape[0] % world:
        raise ValueError(f"sequence length {x.shape[0]} is not divisible by TP={world}")
    n = x.shape[0] // world
    return x[group.rank() * n : (group.rank() + 1) * n].contiguous()


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group), None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, reduce_grad):
        ctx.group, ctx.reduce_grad = group, reduce_grad
        return _all_gather(x, group)

    @staticmethod
    def backward(ctx, grad):
        if ctx.reduce_grad:
            return _reduce_scatter(grad, ctx.group), None, None
        return _split(grad, ctx.group), None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group), None


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, group):
        ctx.group, ctx.has_bias = group, bias is not None
        ctx.save_for_backward(x, weight)
        return F.linear(_all_gather(x, group), weight, bias)  # [s, b, in] -> [s, b, out/tp]

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        total = _all_gather(x, ctx.group)  # [s, b, in], gathered again rather than kept
        grad_x = _reduce_scatter(grad.matmul(weight), ctx.group)  # [s, b, in] -> [s/tp, b, in]
        g2 = grad.reshape(-1, grad.shape[-1])  # [s*b, out]
        grad_w = g2.t().matmul(total.reshape(-1, total.shape[-1]))  # [out, in]
        grad_b = g2.sum(dim=0) if ctx.has_bias else None
        return grad_x, grad_w, grad_b, None


def scatter_to_sequence(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """[s, b, h] replicated on the TP group -> this rank's [s/tp, b, h]."""
    return _Scatter.apply(x, group)


def gather_from_sequence(
    x: torch.Tensor, group: ProcessGroup, reduce_grad: bool = True
) -> torch.Tensor:
    """[s/tp, b, h] -> [s, b, h]. ``reduce_grad``: the consumer is tensor-parallel, so each
    rank's grad is a partial sum to reduce-scatter; else the grad is replicated (split it)."""
    return _Gather.apply(x, group, reduce_grad)


def reduce_scatter_to_sequence(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Partial sums [s, b, h] (a row-parallel output) -> summed chunk [s/tp, b, h]."""
    return _ReduceScatter.apply(x, group)


def sequence_parallel_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, group: ProcessGroup
) -> torch.Tensor:
    """Column-parallel linear on a sequence-parallel input: [s/tp, b, in] -> [s, b, out/tp]."""
    return _Linear.apply(x, weight, bias, group)
