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
gradient, which it has to allocate anyway. The pipeline's last stage uses it (its loss function
only sees the logits).

``linear_cross_entropy`` folds the output layer into the loss (the whole model on one stage):
for each chunk of rows it computes the logits, their log-sum-exp and, right there, the gradient
of the loss with respect to them (softmax minus the one-hot target, times the row's weight),
which it turns at once into that chunk's hidden-state gradient and adds into the weight's. The
full logits never exist, exp runs once per logit instead of twice, and the backward only scales
the two stored gradients by the incoming one.

``tied_lookup`` is the word-embedding lookup of the same (tied) weight on one tensor-parallel
rank, on CPU: ``linear_cross_entropy`` hands it its [V, h] weight gradient (``TiedGradient``)
instead of returning it, and the lookup's backward adds its rows into that tensor, so the weight
receives one gradient. Autograd would otherwise build the lookup's own zero-filled [V, h]
gradient and add the two (at gpt3-base a fresh 79 MB fill, its page faults and an add, per
micro-batch).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megagpt.model.matmul import mm_t


def bias_gelu(
    x: torch.Tensor, bias: torch.Tensor | None, approximate: str = "none"
) -> torch.Tensor:
    """GELU(x + bias): the MLP's first linear (bias returned apart) and its activation."""
    if bias is not None:
        x = x + bias
    return F.gelu(x, approximate=approximate)


def bias_dropout_add(
    x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor, p: float, training: bool
) -> torch.Tensor:
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


def vocab_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    vocab_start: int = 0,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Per-token cross entropy (fp32) of logits [..., V_local] against target ids [...].

    ``vocab_start``/``group``: this rank's first vocabulary row and the tensor-parallel group
    the vocabulary is split over (None or size 1: the whole vocabulary is here). The same
    function as megatron-core's ``vocab_parallel_cross_entropy(logits.float(), target)``,
    without its fp32 copy of the logits and its saved full-size softmax."""
    shape = target.shape
    v = logits.shape[-1]
    loss = _VocabCrossEntropy.apply(
        logits.reshape(-1, v), target.reshape(-1), vocab_start, group
    )  # [..., V] -> [N, V]; loss [N]
    return loss.view(shape)


# Rows per chunk of the fused output layer + loss: at least this many, so the weight-gradient
# GEMM ([V, rows] @ [rows, h], accumulated into [V, h]) is not bound by rewriting its
# accumulator: below ~256 rows each chunk's pass over the [V, h] gradient costs more than the
# chunk's arithmetic on a CPU. 16-bit weights sum their chunks in a separate fp32 buffer (a
# conversion and an add per chunk, ~1/3 of the output layer's time at 2 chunks of gpt3-base on
# a CPU), so they take fewer, larger chunks.
_MIN_FUSED_ROWS = {torch.float32: 256}


def _fused_rows(n_rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> int:
    rows = max(
        _MIN_FUSED_ROWS.get(dtype, 1024), _CHUNK_ELEMENTS.get(device.type, 1 << 25) // max(vocab, 1)
    )
    return min(n_rows, rows)


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_n w_n * CE(hidden_n @ weight^T, target_n): hidden [N, h] (replicated over the TP
    group), weight [V_local, h] (this rank's vocab rows from ``vocab_start``; rows >= ``valid``
    are padding and get logit -inf, zero gradient), global target ids [N], fp32 row weights
    [N]. Returns the fp32 scalar; the gradients are computed in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, target, row_weight, vocab_start, valid, group, tied, onednn):
        want_dh, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, dh, dw = _linear_ce_chunks(
            hidden, weight, target, row_weight, vocab_start, valid, group, want_dh, want_dw, onednn
        )
        # Intermediates, not inputs or outputs: kept as attributes and handed out (scaled in
        # place) by the one backward this graph allows.
        ctx.grads = (dh, dw)
        ctx.want = (want_dh, want_dw)
        ctx.tied = tied if tied is not None and tied.armed else None
        return loss

    @staticmethod
    def backward(ctx, grad):
        if ctx.grads is None:
            raise RuntimeError(
                "linear_cross_entropy: backward through the same graph twice; "
                "its gradients were computed in the forward and handed out once "
                "(run the forward again instead of retain_graph=True)"
            )
        (dh, dw), ctx.grads = ctx.grads, None
        want_dh, want_dw = ctx.want
        # The usual incoming gradient is exactly 1 (or 1 / accumulation steps): scale in place,
        # and on the CPU, where reading the scalar costs nothing, skip a pass that multiplies by 1.
        if not (grad.device.type == "cpu" and grad.numel() == 1 and float(grad) == 1.0):
            if want_dh:
                dh.mul_(grad.to(dh.dtype))
            if want_dw:
                dw.mul_(grad.to(dw.dtype))
        if want_dw and ctx.tied is not None:  # the lookup of this weight returns it (tied_lookup)
            ctx.tied.grad, dw = dw, None
        return (dh if want_dh else None, dw, None, None, None, None, None, None, None)


def _linear_ce_chunks(
    hidden,
    weight,
    target,
    row_weight,
    vocab_start,
    valid,
    group,
    want_dh: bool,
    want_dw: bool,
    onednn: bool = False,
):
    """The work of ``_LinearCrossEntropy`` (also its no-grad path): (loss, dh or None, dw or
    None). Per chunk of rows: logits in the weight's dtype, then fp32 for the softmax; the
    gradient of the chunk's logits is cast back to that dtype for the two GEMMs, and the weight
    gradient is accumulated in fp32 over chunks. ``onednn``: the logits and input-gradient GEMMs
    of fp32 CPU tensors on oneDNN (``matmul.mm_t``, ``train.cpu_matmul``)."""
    n, h = hidden.shape
    v_local = weight.shape[0]
    tp = group.size() if group is not None else 1
    w = weight[:valid]  # padding rows: logit -inf, i.e. left out of the softmax
    local = target - vocab_start
    outside = (local < 0) | (local >= valid)  # the target lives on another TP rank
    local = local.masked_fill(outside, 0).unsqueeze(1)  # [N, 1]
    hit = (~outside).to(torch.float32)
    dtype, fp32 = weight.dtype, weight.dtype == torch.float32
    dh = torch.empty_like(hidden) if want_dh else None
    dw = torch.empty_like(weight) if want_dw else None
    if dw is not None:
        dw[valid if n else 0 :].zero_()  # padding rows (all rows when there are no tokens)
    acc = None  # the weight gradient summed over chunks: fp32 (dw itself for fp32 weights)
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    rows = _fused_rows(n, v_local, dtype, hidden.device)
    for a in range(0, n, rows):
        b = min(n, a + rows)
        h_c = hidden[a:b]
        logits = mm_t(h_c, w, onednn)  # [rows, valid] in the weight's dtype
        z = logits if fp32 else logits.float()  # fp32, worked in place from here
        if valid > 0:
            tgt = z.gather(1, local[a:b]).squeeze(1).masked_fill(outside[a:b], 0.0)
            m = z.amax(dim=-1)
        else:  # a TP rank holding padding only: nothing to add to the softmax
            tgt = torch.zeros(b - a, device=z.device)
            m = torch.full((b - a,), float("-inf"), device=z.device)
        if tp > 1:  # the softmax spans every rank's slice: the global max first
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        p = z.sub_(m[:, None]).exp_()  # exp(logit - max) [rows, valid]
        red = torch.stack([p.sum(dim=-1), tgt])  # [2, rows]: local sum of exp, target logit
        if tp > 1:
            dist.all_reduce(red, group=group)
        sumexp, tgt = red[0], red[1]
        rw = row_weight[a:b]
        loss += ((m + sumexp.log() - tgt) * rw).sum()
        if not (want_dh or want_dw):
            continue
        if valid == 0:  # no logits here: no part of the input gradient either
            if want_dh:
                dh[a:b].zero_()
            continue
        # d loss / d logits = w_n * (softmax - onehot(target)), fp32, then the GEMMs' dtype.
        p.mul_((rw / sumexp)[:, None])
        p.scatter_add_(1, local[a:b], -(hit[a:b] * rw)[:, None])
        g = p if fp32 else p.to(dtype)
        if want_dh and onednn:  # [rows, valid] @ [valid, h]
            dh[a:b] = mm_t(g, w.t(), onednn)
        elif want_dh:
            torch.mm(g, w, out=dh[a:b])
        if want_dw and valid > 0:
            # [valid, rows] @ [rows, h], summed over chunks in fp32
            if fp32:
                dw[:valid].addmm_(g.t(), h_c, beta=0.0 if a == 0 else 1.0)
            elif rows >= n:  # one chunk: the GEMM's own fp32 accumulation, rounded once
                torch.mm(g.t(), h_c, out=dw[:valid])
            elif acc is None:
                acc = (g.t() @ h_c).float()
            else:
                acc.add_(g.t() @ h_c)
    if acc is not None:
        dw[:valid].copy_(acc)
    return loss, dh, dw


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    row_weight: torch.Tensor,
    vocab_start: int = 0,
    valid: int | None = None,
    group: dist.ProcessGroup | None = None,
    tied: TiedGradient | None = None,
    onednn: bool = False,
) -> torch.Tensor:
    """``sum_n row_weight_n * CE(hidden_n @ weight^T, target_n)`` (fp32 scalar) without the
    logits: hidden [..., h], target ids and row weights [...] of the same leading shape.
    With ``tied`` (from ``tied_lookup`` of the same weight in this graph), the weight's
    gradient goes to that lookup, which returns it with its own rows added. ``onednn``: fp32
    CPU logits and input-gradient GEMMs on oneDNN (``megagpt.model.matmul``).

    ``weight`` [V_local, h] holds vocabulary rows ``vocab_start`` to ``vocab_start + V_local``
    of the tensor-parallel ``group`` (None or size 1: all of them); its rows from ``valid`` on are
    padding (left out of the softmax, zero gradient). ``hidden`` must be the same on every rank
    of the group (the caller's region function sums its gradient). Equal, within float
    tolerance, to ``(vocab_cross_entropy(F.linear(hidden, weight) with padding logits at -inf,
    target) * row_weight).sum()``, loss and gradients; bf16 weights get their gradient summed
    in fp32 over chunks."""
    h = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != h:
        raise ValueError(
            f"linear_cross_entropy: weight {tuple(weight.shape)} does not match hidden size {h}"
        )
    if target.shape != hidden.shape[:-1] or row_weight.shape != target.shape:
        raise ValueError(
            f"linear_cross_entropy: hidden {tuple(hidden.shape)}, target "
            f"{tuple(target.shape)}, row_weight {tuple(row_weight.shape)}: "
            "target and row_weight must have hidden's leading shape"
        )
    valid = weight.shape[0] if valid is None else max(0, min(valid, weight.shape[0]))
    x = hidden.reshape(-1, h)  # [..., h] -> [N, h]
    t, rw = target.reshape(-1), row_weight.reshape(-1).float()
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(x, weight, t, rw, vocab_start, valid, group, tied, onednn)
    return _linear_ce_chunks(x, weight, t, rw, vocab_start, valid, group, False, False, onednn)[0]


class TiedGradient:
    """The output layer's weight gradient on its way from ``linear_cross_entropy``'s backward to
    the backward of ``tied_lookup`` of the same weight (which autograd runs after it: the lookup
    feeds everything the loss depends on). One per forward pass; the loss hands the gradient
    over only once a lookup has taken this (``armed``), so that no gradient is handed to a lookup
    that is not in the graph."""

    __slots__ = ("armed", "grad")

    def __init__(self) -> None:
        self.armed = False
        self.grad: torch.Tensor | None = None


class _TiedLookup(torch.autograd.Function):
    """``F.embedding(tokens, weight)`` whose weight gradient is the output layer's (handed over
    in ``tied``) plus the rows of this lookup, added in place."""

    @staticmethod
    def forward(ctx, tokens, weight, tied):
        ctx.save_for_backward(tokens)
        ctx.tied, ctx.weight_meta = tied, (weight.shape, weight.dtype)
        tied.armed = True
        return F.embedding(tokens, weight)

    @staticmethod
    def backward(ctx, grad):
        (tokens,) = ctx.saved_tensors
        (shape, dtype), h = ctx.weight_meta, grad.shape[-1]
        dw, ctx.tied.grad = ctx.tied.grad, None
        if dw is None:  # no output-layer gradient arrived (the loss was not in this backward)
            dw = torch.zeros(shape, dtype=dtype, device=grad.device)
        # Each token's rows summed in fp32 first, then one add per vocabulary row: the rounding
        # of dw + (sum of the lookup's rows) that autograd's add of the two gradients has.
        ids, inverse = torch.unique(tokens.reshape(-1), return_inverse=True)
        rows = torch.zeros(ids.numel(), h, dtype=torch.float32, device=grad.device)
        rows.index_add_(0, inverse, grad.reshape(-1, h).float())
        dw.index_add_(0, ids, rows.to(dw.dtype))
        return None, dw, None


def tied_lookup(tokens: torch.Tensor, weight: torch.Tensor, tied: TiedGradient) -> torch.Tensor:
    """``F.embedding(tokens, weight)``; pass the same ``tied`` to ``linear_cross_entropy`` over
    ``weight`` in this forward, so the weight's gradient is built once (see the module's
    docstring). One tensor-parallel rank only (the whole vocabulary here).

    CPU only: there the extra [V, h] costs page faults and memory passes. On a GPU the caching
    allocator reuses it and a memset is cheap, while the in-place row adds would sum with
    atomics (a run no longer bit-reproducible) and ``unique`` would wait for the device; the
    lookup does not take ``tied`` there, and autograd adds the two gradients as before."""
    if torch.is_grad_enabled() and weight.requires_grad and weight.device.type == "cpu":
        return _TiedLookup.apply(tokens, weight, tied)
    return F.embedding(tokens, weight)
