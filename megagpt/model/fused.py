"""Fused element-wise work around the decoder's matmuls, and a loss without a full fp32 copy.

Between the four matmuls of a decoder layer sit memory-bound kernels: the bias add and GELU of
the MLP, the bias add, dropout and residual add after each of the two output projections (their
row-parallel linears return the bias apart, ``skip_bias_add``, so it can join the dropout and the
residual add). Each is written here once as a plain function of tensors: eager PyTorch runs them
as a few small kernels, and ``torch.compile`` (``train.compile``, see ``megagpt.model.compile``)
fuses each into one, with the same results: dropout masks are drawn by the same aten call in both
modes (``compile.py`` keeps inductor's ``fallback_random`` on), so a seeded step is the same
function eager or compiled.

``vocab_cross_entropy`` is the loss over (vocab-parallel) logits: per-row log-sum-exp and target
logit computed in fp32 chunks of rows, so neither a full fp32 copy of bf16 logits nor a
full-size softmax is ever held; the backward recomputes the softmax chunk by chunk into the
gradient, which it has to allocate anyway.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None, approximate: str = "none"
              ) -> torch.Tensor:
    """GELU(x + bias): the MLP's first linear (bias returned apart) and its activation."""
    if bias is not None:
        x = x + bias
    return F.gelu(x, approximate=approximate)


def bias_dropout_add(x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor,
                     p: float, training: bool) -> torch.Tensor:
    """residual + dropout(x + bias): the end of each residual branch. The mask comes from the
    current default generator, as ``F.dropout`` draws it (the caller forks the generator where
    the tensor-parallel region's stream applies, ``megagpt.model.rng``). The result has the
    residual's layout ([s, b, h] contiguous) whatever ``x``'s strides."""
    if bias is not None:
        x = x + bias
    if training and p > 0:
        x = F.dropout(x, p=p, training=True)
    return residual + x  # the residual first: the output takes its (contiguous) strides


# Rows of logits per chunk: ~4 MiB of fp32 on CPU (cache-resident); larger on CUDA, where a
# chunk is a kernel launch and memory bandwidth, not cache, bounds the work.
_CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 25}


def _chunks(n_rows: int, vocab: int, device: torch.device):
    rows = max(1, _CHUNK_ELEMENTS.get(device.type, 1 << 25) // max(vocab, 1))
    for start in range(0, n_rows, rows):
        yield start, min(n_rows, start + rows)


class _VocabCrossEntropy(torch.autograd.Function):
    """Cross entropy of logits [N, V_local] (this rank's vocab slice starting at
    ``vocab_start``) against global target ids [N]; returns the per-row loss [N] in fp32."""

    @staticmethod
    def forward(ctx, logits, target, vocab_start, group):
        n, v = logits.shape
        tp = group.size() if group is not None else 1
        local = target - vocab_start
        outside = (local < 0) | (local >= v)  # the target lives on another TP rank
        local = local.masked_fill(outside, 0)
        target_logit = logits.gather(1, local.unsqueeze(1)).squeeze(1).float()
        target_logit = target_logit.masked_fill(outside, 0.0)
        if tp == 1:
            lse = torch.empty(n, dtype=torch.float32, device=logits.device)
            for a, b in _chunks(n, v, logits.device):
                lse[a:b] = torch.logsumexp(logits[a:b].float(), dim=-1)
        else:
            # The softmax spans every rank's slice: a global max for stability, then the
            # global sum of exponentials and the target logit (held by exactly one rank).
            maxes = logits.amax(dim=-1).float()
            dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=group)
            sumexp = torch.empty(n, dtype=torch.float32, device=logits.device)
            for a, b in _chunks(n, v, logits.device):
                sumexp[a:b] = (logits[a:b].float() - maxes[a:b, None]).exp_().sum(dim=-1)
            dist.all_reduce(sumexp, group=group)
            dist.all_reduce(target_logit, group=group)
            lse = maxes + sumexp.log()
        ctx.save_for_backward(logits, local, outside, lse)
        return lse - target_logit

    @staticmethod
    def backward(ctx, grad):
        logits, local, outside, lse = ctx.saved_tensors
        n, v = logits.shape
        out = torch.empty_like(logits)
        hit = (~outside).float()
        grad = grad.float()
        for a, b in _chunks(n, v, logits.device):
            p = (logits[a:b].float() - lse[a:b, None]).exp_()  # softmax rows [b - a, V_local]
            p.scatter_add_(1, local[a:b, None], -hit[a:b, None])  # minus the one-hot target
            out[a:b] = p.mul_(grad[a:b, None])
        return out, None, None, None


def vocab_cross_entropy(logits: torch.Tensor, target: torch.Tensor, vocab_start: int = 0,
                        group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Per-token cross entropy (fp32) of logits [..., V_local] against target ids [...].

    ``vocab_start``/``group``: this rank's first vocabulary row and the tensor-parallel group
    the vocabulary is split over (None or size 1: the whole vocabulary is here). The same
    function as megatron-core's ``vocab_parallel_cross_entropy(logits.float(), target)``,
    without its fp32 copy of the logits and its saved full-size softmax."""
    shape = target.shape
    v = logits.shape[-1]
    loss = _VocabCrossEntropy.apply(logits.reshape(-1, v), target.reshape(-1), vocab_start,
                                    group)  # [..., V] -> [N, V]; loss [N]
    return loss.view(shape)
