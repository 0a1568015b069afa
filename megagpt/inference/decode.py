"""The inference-time decoder: the model's forward rewritten for decoding, over its parameters.

``GPTModel.forward`` serves training (sequence-first activations, autograd-aware parallel
layers, dropout, sequence parallelism). Decoding needs less and pays per call for the rest: a
one-token step at batch 1 is bound by reading the weights once (~340 MB of fp32 at gpt3-base),
so every Python op and every slow matmul shows. ``FastDecoder`` reads the same parameters
(``word``, ``position.position_embeddings``, ``layers``, ``final_norm``; it owns no weights of
its own except the optional packed copies below) and runs:

- ``prefill``: all prompts in one pass, right-padded to the longest (positions 0..L-1 for every
  row, causal attention, so no real token ever attends to padding; the linears run on the real
  tokens only, packed), and the output layer only at each row's last prompt token;
- ``step``: one token per row at its own position (a Python int when all rows share it, else a
  [b] tensor with a per-row mask over the cache), keys/values written in place into buffers
  allocated once (``new_cache``).

**Packed weights (CPU).** With few rows, ``F.linear`` on CPU (MKL on an ``[out, in]`` weight) is
far from both the memory and the compute bound: at 8 rows the four linears of a gpt3-base layer
took ~1.7x longer than oneDNN's on a weight packed once (BENCHMARKS-generate.md).
``DecodeWeights`` keeps oneDNN-packed copies (``_reorder_linear_weight`` /
``_linear_pointwise``, the ops inductor's CPU freezing uses) of every linear weight and of the
tied output layer, one set for one-row passes and one for more rows, with the bias, the GELU and
the residual add fused into the matmul. For one-row steps, plain ``[in, out]`` copies
(``one_row_copy``): MKL's gemv streams that layout (HF ``Conv1D``'s) faster than the pack, for
QKV, attention output and fc1 on an AMD CPU (fc2 and the output layer stay packed there), and
for every linear on an Intel one (a one-row gpt3-base step 11-12 % faster than with fc2 and the
output layer packed; BENCHMARKS-generate.md). On an Intel CPU, passes of 2-3 rows multiply by
the model's own weights, faster there than either set (``row_class``).

**Our kernels (CPU).** Where ``cpu_kernels`` builds (a C compiler, an AVX-512 CPU), an Intel
CPU runs every pass of 1-64 rows through them instead: one packed copy of the weights streamed
once per pass for up to 8 rows at a time, bias, GELU and residual add fused (8 rows through
gpt3-base's linears 19 ms against 28 through oneDNN's packs), and the attention of steps and
checks in C over the cache (the keys and values written to their slots, each token's attention
read up to its own position only, not over a masked span). Larger passes (prefills) keep the
packs. Memory: up to twice the
model's weights again; ``prepack=False`` turns them off (big models), and they are off where
oneDNN does not apply (not CPU, not fp32). The packs track the model: they are rebuilt when any
source parameter was replaced (``data_ptr``), modified in place through autograd's view
(``_version``, e.g. a torch optimizer step or ``load_state_dict``) or through ``.data``
(DeepSpeed's bf16 updates bump no version counter: a probe of every 97th row is compared
exactly), checked once per generate call, so a fine-tuning loop that samples between steps
decodes with its current weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megagpt.model import cpu_kernels
from megagpt.model.matmul import cpu_vendor

KERNEL = -1  # row_class of passes through our kernels (cpu_kernels)
KERNEL_MAX_ROWS = 64  # the most rows a pass sends through it on an Intel CPU (row_class)
SMALL_ROWS = 2  # passes of at most this many rows use the one-row set (not on Intel: row_class)
_PROBE_STRIDE = 97  # rows of a weight compared to detect updates made through .data


# A weight as a pass multiplies by it: a oneDNN pack, an [in, out] copy, or our kernel's pack.
Pack = torch.Tensor | cpu_kernels.RowPack


def prepack_available(weight: torch.Tensor) -> bool:
    """Whether oneDNN's prepacked linear applies: CPU, oneDNN built in, fp32 (the measured
    case; bf16 on CPUs without bf16 instructions would be emulated)."""
    return (
        weight.device.type == "cpu"
        and torch.backends.mkldnn.is_available()
        and weight.dtype == torch.float32
    )


def one_row_copy(index: int, count: int) -> bool:
    """Whether one-row steps read source weight ``index`` of ``count`` (``DecodeWeights._sources``:
    QKV, attention output, fc1, fc2 per layer, then the output layer) as an ``[in, out]`` copy
    through MKL's gemv rather than oneDNN's pack. Measured per CPU vendor (fp32, gpt3-base,
    torch 2.13, 2 threads): on an AMD EPYC (Zen 4) the pack was the faster for fc2 and the
    output layer; on an Intel Xeon (Emerald Rapids) the copy for every linear (a one-row step
    19.1 -> 16.9 ms, alternating). Other CPUs keep the AMD choice, measured first."""
    if cpu_vendor() == "GenuineIntel":
        return True
    return index % 4 != 3 and index < count - 1


def row_class(rows: int) -> int:
    """The weights a pass of ``rows`` rows multiplies by: 1, the one-row set (``one_row_copy``);
    0, the model's own ``[out, in]`` weights through ``F.linear``; 8, oneDNN packs made for 8
    rows; ``KERNEL``, our kernels' packs (``cpu_kernels``). Measured per CPU vendor (fp32,
    gpt3-base's 49 linears, torch 2.13, 2 threads; ``bench/decode_linears.py``). On an Intel
    Xeon (Emerald Rapids), where the kernel builds: it for 1-64 rows (1 row 16.1 ms, as fast as
    ``F.linear``; 8 rows 19.1 against 28.1 through oneDNN's packs and 41.5 through
    ``F.linear``; 64 rows 64.5 against 66.4), the packs above (128 rows 106 ms against 112).
    Without it: 2-3 rows through ``F.linear`` (13.7-16.9 ms, the packs 16.8-21.7), from 4 rows
    the packs. On an AMD EPYC (Zen 4) the one-row set up to ``SMALL_ROWS`` and the packs above
    (the kernel is not measured there); other CPUs keep the AMD choice, measured first."""
    if cpu_vendor() == "GenuineIntel":
        if rows <= KERNEL_MAX_ROWS and cpu_kernels.available():
            return KERNEL
        if rows <= 1:
            return 1
        return 0 if rows <= 3 else 8
    return 1 if rows <= SMALL_ROWS else 8


def _pack(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """[out, in] weight -> oneDNN's blocked layout for ``rows``-row inputs (an opaque copy)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)


@dataclass
class _Layer:
    """One decoder layer's parameters as the decoder reads them (``*_p``: oneDNN packs)."""

    ln1: torch.nn.LayerNorm
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor
    dense_w: torch.Tensor
    dense_b: torch.Tensor
    ln2: torch.nn.LayerNorm
    fc1_w: torch.Tensor
    fc1_b: torch.Tensor
    fc2_w: torch.Tensor
    fc2_b: torch.Tensor
    qkv_p: Pack | None = None
    dense_p: Pack | None = None
    fc1_p: Pack | None = None
    fc2_p: Pack | None = None


def _source_layer(layer: torch.nn.Module) -> _Layer:
    att, mlp = layer.attention, layer.mlp
    return _Layer(
        layer.input_layernorm,
        att.query_key_value.weight,
        att.query_key_value.bias,
        att.dense.weight,
        att.dense.bias,
        layer.post_attention_layernorm,
        mlp.dense_h_to_4h.weight,
        mlp.dense_h_to_4h.bias,
        mlp.dense_4h_to_h.weight,
        mlp.dense_4h_to_h.bias,
    )


class DecodeWeights:
    """oneDNN packs of every layer's four linear weights and of the tied output layer, one set
    per row class (one row, or more; for one row, QKV, attention output and fc1 are plain
    [in, out] copies used by ``addmm`` instead), kept in step with the model (module doc).
    ``layers(rows)`` gives the per-layer views; a set is (re)built when a pass of its class asks
    for it and the model's weights changed since it was made."""

    def __init__(self, model: torch.nn.Module, prepack: bool):
        self.model = model
        self.prepack = prepack
        self._stamp: tuple | None = None
        self._probes: list[torch.Tensor] = []
        self._packs: dict[int, list[Pack]] = {}  # pack rows -> packed _sources()

    def _sources(self) -> list[torch.Tensor]:
        return [
            w
            for layer in self.model.layers
            for w in (
                layer.attention.query_key_value.weight,
                layer.attention.dense.weight,
                layer.mlp.dense_h_to_4h.weight,
                layer.mlp.dense_4h_to_h.weight,
            )
        ] + [self.model.word.word_embeddings.weight]

    @staticmethod
    def _stamp_of(sources: list[torch.Tensor]) -> tuple:
        return tuple((w.data_ptr(), w._version, w.dtype, w.device, w.shape) for w in sources)

    def _fresh(self, sources: list[torch.Tensor]) -> bool:
        if self._stamp_of(sources) != self._stamp or len(self._probes) != len(sources):
            return False
        return all(
            torch.equal(w.detach()[::_PROBE_STRIDE], p) for w, p in zip(sources, self._probes)
        )

    def refresh(self) -> None:
        """Drop every pack if any source weight changed since they were made."""
        sources = self._sources()
        if not self._fresh(sources):
            self._packs = {}
            self._probes = [w.detach()[::_PROBE_STRIDE].clone() for w in sources]
            self._stamp = self._stamp_of(sources)

    def invalidate(self) -> None:
        """Free the packs; the next pass rebuilds what it needs."""
        self._stamp, self._probes, self._packs = None, [], {}

    def layers(self, rows: int) -> tuple[list[_Layer], Pack | None]:
        """(per-layer parameters, packed output layer or None) for passes of ``rows`` rows.
        Call ``refresh`` first (once per generate call)."""
        out = [_source_layer(layer) for layer in self.model.layers]
        key = row_class(rows)
        if not self.prepack or key == 0:
            return out, None
        if key not in self._packs:
            sources = self._sources()
            with torch.no_grad():
                self._packs[key] = [
                    cpu_kernels.pack(w)
                    if key == KERNEL
                    else w.detach().t().contiguous()
                    if key == 1 and one_row_copy(i, len(sources))
                    else _pack(w, key)
                    for i, w in enumerate(sources)
                ]
        packs = self._packs[key]
        for i, lw in enumerate(out):
            lw.qkv_p, lw.dense_p, lw.fc1_p, lw.fc2_p = packs[4 * i : 4 * i + 4]
        return out, packs[-1]


@dataclass
class DecodeCache:
    """Keys and values of every layer, [b, heads_local, max_length, head_dim] each, allocated
    once and written in place."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def max_length(self) -> int:
        return self.keys[0].shape[2]


class FastDecoder:
    """Prefill and one-token steps over a GPTModel's parameters (pipeline size 1, any TP size).

    Args:
        model: the GPTModel (its submodules ``word``, ``position``, ``layers``, ``final_norm``).
        tp_group, tp_size: the tensor-parallel group the model is split over.
        prepack: multiply by oneDNN-packed copies of the weights (``DecodeWeights``; memory: up
            to twice the model's weights again, one set per row class). None: where available
            (``prepack_available``: CPU, fp32); False for models too big to copy.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        tp_group=None,
        tp_size: int = 1,
        prepack: bool | None = None,
    ):
        self.model = model
        self.tp_group = tp_group
        self.tp_size = tp_size
        first = model.layers[0]
        self.heads = first.attention.heads_local
        self.head_dim = first.attention.head_dim
        self.approximate = first.mlp.approximate
        weight = model.word.word_embeddings.weight
        if prepack is None:
            prepack = prepack_available(weight)
        elif prepack and not prepack_available(weight):
            raise ValueError(
                f"prepack=True needs oneDNN on CPU with fp32 weights; the "
                f"model is {weight.dtype} on {weight.device}"
            )
        self.weights = DecodeWeights(model, prepack)
        self._plan: dict[int, tuple[list[_Layer], Pack | None]] = {}
        emb = model.word.word_embeddings
        self.vocab_start = int(getattr(emb, "vocab_start_index", 0))

    # -- pieces -----------------------------------------------------------------------------
    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size > 1:
            dist.all_reduce(x, group=self.tp_group)
        return x

    def _embed(self, ids: torch.Tensor, positions: torch.Tensor | int) -> torch.Tensor:
        """ids [b] or [b, s] -> [b, (s,) h]: word + position embeddings (vocab-parallel lookup:
        rows outside this rank's shard are zero, then summed over the group)."""
        w = self.model.word.word_embeddings.weight
        if self.tp_size > 1:
            local = ids - self.vocab_start
            outside = (local < 0) | (local >= w.shape[0])
            words = F.embedding(local.masked_fill(outside, 0), w)
            words = self._all_reduce(words.masked_fill_(outside.unsqueeze(-1), 0.0))
        else:
            words = F.embedding(ids, w)
        pos_w = self.model.position.position_embeddings.weight
        pos = pos_w[positions] if isinstance(positions, int) else F.embedding(positions, pos_w)
        return words + pos  # the model's order: words + positions

    @staticmethod
    def _linear(
        x: torch.Tensor,
        w: torch.Tensor,
        b: torch.Tensor | None,
        packed: Pack | None,
        gelu: str | None = None,
    ) -> torch.Tensor:
        """x [n, in] -> x @ w.T + b, then GELU with approximation ``gelu`` ("none" is the erf
        GELU; None: no activation), through the oneDNN pack when there is one (bias and GELU
        fused into the matmul)."""
        if isinstance(packed, cpu_kernels.RowPack):
            return cpu_kernels.linear(x, packed, b, gelu=gelu)
        if packed is None or not packed.is_mkldnn:
            if packed is None:
                y = F.linear(x, w, b)
            else:  # an [in, out] copy
                y = torch.mm(x, packed) if b is None else torch.addmm(b, x, packed)
            return y if gelu is None else F.gelu(y, approximate=gelu)
        if gelu is None:
            return torch.ops.mkldnn._linear_pointwise.default(x, packed, b, "none", [], "")
        return torch.ops.mkldnn._linear_pointwise.default(x, packed, b, "gelu", [], gelu)

    def _residual_linear(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        w: torch.Tensor,
        b: torch.Tensor,
        packed: Pack | None,
    ) -> torch.Tensor:
        """x + (y @ w.T + b) for a row-parallel linear: the bias joins after the sum over the
        TP group; at TP=1 with a pack, the residual add is fused into the matmul."""
        if self.tp_size > 1:
            return x.add_(self._all_reduce(self._linear(y, w, None, packed)) + b)
        if isinstance(packed, cpu_kernels.RowPack) and x.is_contiguous():
            return cpu_kernels.linear(y, packed, b, out=x)
        if packed is None or not isinstance(packed, torch.Tensor) or not packed.is_mkldnn:
            return x.add_(self._linear(y, w, b, packed))
        return torch.ops.mkldnn._linear_pointwise.binary(y, x, packed, b, "add")

    def _layer(
        self,
        lw: _Layer,
        x: torch.Tensor,
        b: int,
        s: int,
        cache: DecodeCache,
        i: int,
        attend,
        packed: torch.Tensor | None = None,
        slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One pre-LN block on x [b*s, h] (in place); ``attend(q, k, v, keys, values)`` stores
        k, v [b, nh, s, hd] in the layer's cache and returns the context [b, nh, s, hd].

        ``packed`` (ragged prompts): x holds only the real tokens, [N, h], and ``packed`` [N]
        their places in the [b*s] grid; the linears run on the N rows, the attention on the
        grid (padding zero, never attended to by a real token: prompts are right-padded).

        ``slots`` [b*s] (passes through our kernels): each token's cache slot; the attention
        is then ``cpu_kernels.attend`` (``attend`` unused), same semantics: a token sees its
        row's slots up to its own."""
        a = F.layer_norm(x, lw.ln1.normalized_shape, lw.ln1.weight, lw.ln1.bias, lw.ln1.eps)
        qkv = self._linear(a, lw.qkv_w, lw.qkv_b, lw.qkv_p)  # [b*s, 3h/tp], q|k|v per head
        if packed is not None:  # [N, 3h/tp] -> the [b*s, 3h/tp] grid
            grid = qkv.new_zeros(b * s, qkv.shape[1])
            grid[packed] = qkv
            qkv = grid
        if slots is not None:  # [b*s, 3h/tp] -> [b*s, h/tp]
            ctx = cpu_kernels.attend(qkv, slots, cache.keys[i], cache.values[i], b)
        else:
            # [b*s, 3h/tp] -> [b, s, nh, 3hd] -> [b, nh, s, 3hd]
            qkv = qkv.view(b, s, self.heads, 3 * self.head_dim).transpose(1, 2)
            q, k, v = qkv.split(self.head_dim, dim=-1)  # 3 x [b, nh, s, hd]
            ctx = attend(q, k, v, cache.keys[i], cache.values[i])  # [b, nh, s, hd]
            ctx = ctx.transpose(1, 2).reshape(b * s, self.heads * self.head_dim)  # [b*s, h/tp]
        if packed is not None:
            ctx = ctx[packed]  # the real tokens' rows, [N, h/tp]
        x = self._residual_linear(x, ctx, lw.dense_w, lw.dense_b, lw.dense_p)
        a = F.layer_norm(x, lw.ln2.normalized_shape, lw.ln2.weight, lw.ln2.bias, lw.ln2.eps)
        f = self._linear(a, lw.fc1_w, lw.fc1_b, lw.fc1_p, self.approximate)  # [b*s, 4h/tp]
        return self._residual_linear(x, f, lw.fc2_w, lw.fc2_b, lw.fc2_p)

    def _logits(self, x: torch.Tensor, head: Pack | None) -> torch.Tensor:
        """Hidden [b, h] -> this rank's vocab-parallel logits [b, V_padded/tp] (through the
        [h, V/tp] copy ``head`` when there is one)."""
        norm = self.model.final_norm.final_layernorm
        x = F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        return self._linear(x, self.model.word.word_embeddings.weight, None, head)

    def _kernel_slots(self, rows: int, slots: torch.Tensor, cache: DecodeCache):
        """``slots`` (int64 [tokens]) when a pass of ``rows`` linear rows attends through
        ``cpu_kernels.attend`` (it multiplies through our kernels and the head size is a
        multiple of 16, at most 256), else None (torch's attention)."""
        if (
            self.weights.prepack
            and row_class(rows) == KERNEL
            and self.head_dim % 16 == 0
            and self.head_dim <= 256
            and cache.keys[0].is_contiguous()
        ):
            return slots.to(torch.int64).contiguous()
        return None

    def _params(self, rows: int) -> tuple[list[_Layer], Pack | None]:
        """(layers, packed output layer) for a pass of ``rows`` rows, fixed per call."""
        key = row_class(rows)
        if key not in self._plan:
            self._plan[key] = self.weights.layers(rows)
        return self._plan[key]

    # -- public -----------------------------------------------------------------------------
    def begin(self) -> None:
        """Start a generate call: the weights are looked up (and the copies checked against the
        model) once per call, not per step; a call sees the weights as they were at its start."""
        self._plan = {}
        self.weights.refresh()

    def new_cache(self, batch: int, max_length: int, zeroed: bool = False) -> DecodeCache:
        """Buffers for ``batch`` rows of up to ``max_length`` tokens. ``zeroed``: needed when
        steps take per-row positions (a masked slot must not hold NaN: 0 x NaN is NaN)."""
        w = self.model.word.word_embeddings.weight
        shape = (batch, self.heads, max_length, self.head_dim)
        alloc = torch.zeros if zeroed else torch.empty

        def buf() -> torch.Tensor:
            return alloc(shape, dtype=w.dtype, device=w.device)

        n = len(self.model.layers)
        return DecodeCache([buf() for _ in range(n)], [buf() for _ in range(n)])

    @staticmethod
    def keep_rows(cache: DecodeCache, rows: torch.Tensor) -> DecodeCache:
        """A cache of the rows ``rows`` [n] (indices into ``cache``'s batch, in that order) of
        ``cache``: a copy, so passes after it feed those n rows only (e.g. once other rows
        finished)."""
        return DecodeCache(
            [k.index_select(0, rows) for k in cache.keys],
            [v.index_select(0, rows) for v in cache.values],
        )

    @torch.no_grad()
    def prefill(
        self, tokens: torch.Tensor, lengths: torch.Tensor | None, cache: DecodeCache
    ) -> torch.Tensor:
        """Right-padded prompts [b, L] at positions 0..L-1 -> local logits [b, V/tp] at each
        row's last prompt token (``lengths`` [b]; None: all rows have L tokens). Prompts of
        different lengths go through the linears packed (only their real tokens); the padding
        slots of the cache are left holding zeros, for the decode steps to write over."""
        b, s = tokens.shape
        positions = torch.arange(s, device=tokens.device)
        packed = None
        if lengths is not None and int(lengths.min()) < s:
            real = (positions.unsqueeze(0) < lengths.unsqueeze(1)).view(-1)  # [b*s]
            packed = real.nonzero().squeeze(1)  # [N]: row r's tokens at r*s .. r*s+len-1
            x = self._embed(tokens.reshape(-1)[packed], positions.repeat(b)[packed])  # [N, h]
        else:
            x = self._embed(tokens, positions).view(b * s, -1)

        def attend(q, k, v, keys, values):
            keys[:, :, :s] = k
            values[:, :, :s] = v
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        layers, _ = self._params(b * s if packed is None else int(packed.numel()))
        for i, lw in enumerate(layers):
            x = self._layer(lw, x, b, s, cache, i, attend, packed)
        if packed is not None:  # each row's last token: the end of its run of N rows
            last = x[torch.cumsum(lengths, 0) - 1]
        else:  # every row is L tokens long: its last row of the [b, s] grid
            last = x.view(b, s, -1)[:, -1]
        return self._logits(last, self._params(b)[1])

    @torch.no_grad()
    def step(
        self,
        ids: torch.Tensor,
        position: int | torch.Tensor,
        cache: DecodeCache,
        span: int | None = None,
    ) -> torch.Tensor:
        """Feed ids [b] at ``position`` -> local logits [b, V/tp] for the next position.

        ``position``: an int shared by every row (attention reads cache slots 0..position), or
        a [b] long tensor of per-row positions; then ``span`` (an int, > every position) bounds
        the slots read, and each row sees only its slots up to its own position.
        """
        b = ids.shape[0]
        x = self._embed(ids, position)  # [b, h]
        if isinstance(position, int):
            end = position + 1

            def attend(q, k, v, keys, values):
                keys[:, :, position:end] = k
                values[:, :, position:end] = v
                return F.scaled_dot_product_attention(q, keys[:, :, :end], values[:, :, :end])
        else:
            rows = torch.arange(b, device=ids.device)
            mask = (
                torch.arange(span, device=ids.device).unsqueeze(0) <= position.unsqueeze(1)
            ).view(b, 1, 1, span)  # [b, 1, 1, span]

            def attend(q, k, v, keys, values):
                keys[rows, :, position] = k[:, :, 0]  # row r's slot position[r]
                values[rows, :, position] = v[:, :, 0]
                return F.scaled_dot_product_attention(
                    q, keys[:, :, :span], values[:, :, :span], attn_mask=mask
                )

        layers, head = self._params(b)
        slots = self._kernel_slots(
            b,
            torch.full((b,), position) if isinstance(position, int) else position,
            cache,
        )
        for i, lw in enumerate(layers):
            x = self._layer(lw, x, b, 1, cache, i, attend, slots=slots)
        return self._logits(x, head)

    @torch.no_grad()
    def verify(
        self,
        ids: torch.Tensor,
        start: torch.Tensor,
        cache: DecodeCache,
        span: int,
        max_position: int,
        counts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Feed ids [b, s] at per-row positions start[r] .. start[r]+s-1 -> local logits
        [b*s, V/tp], one row of logits per fed token (speculative decoding's check of s-1
        drafted tokens after each row's last accepted one).

        ``counts`` [b] (optional): row r feeds only its first counts[r] tokens (the rest of
        its row in ``ids`` is padding): the linears run on those tokens only and the logits
        are theirs, row after row, [sum(counts), V/tp]. The padding's zero keys and values
        land in slots past the row's fed ones, which no fed token reads.

        Each token attends to its row's cache slots up to its own position, so the logits of a
        row's first j tokens are those of feeding them one at a time, whatever follows: a
        rejected draft's keys and values lie past the accepted position and are overwritten
        before anything reads them. ``span`` (> every fed position) bounds the slots read;
        positions past ``max_position`` (the model's last learned one; only fed past a row's
        limit, where the result is discarded) reuse that position's embedding.
        """
        b, s = ids.shape
        pos = start.unsqueeze(1) + torch.arange(s, device=ids.device)  # [b, s]
        packed = None
        if counts is not None and (
            counts.shape != (b,) or int(counts.min()) < 1 or int(counts.max()) > s
        ):
            raise ValueError(
                f"verify: counts must give 1..{s} fed tokens for each of the {b} rows "
                f"(ids [{b}, {s}]); got {counts.tolist()}"
            )
        if counts is not None and int(counts.min()) < s:
            real = (torch.arange(s, device=ids.device).unsqueeze(0) < counts.unsqueeze(1)).view(-1)
            packed = real.nonzero().squeeze(1)  # [N]: row r's tokens at r*s .. r*s+counts[r]-1
            fed_pos = pos.clamp(max=max_position).view(-1)[packed]
            x = self._embed(ids.reshape(-1)[packed], fed_pos)  # [N, h]
        else:
            x = self._embed(ids, pos.clamp(max=max_position)).view(b * s, -1)  # [b*s, h]
        mask = (
            torch.arange(span, device=ids.device).view(1, 1, span) <= pos.unsqueeze(2)
        ).unsqueeze(1)  # [b, 1, s, span]
        rows = torch.arange(b, device=ids.device).unsqueeze(1).expand(b, s)  # [b, s]

        def attend(q, k, v, keys, values):
            keys[rows, :, pos] = k.transpose(1, 2)  # [b, s, nh, hd] into slots pos[r, i]
            values[rows, :, pos] = v.transpose(1, 2)
            return F.scaled_dot_product_attention(
                q, keys[:, :, :span], values[:, :, :span], attn_mask=mask
            )

        fed = b * s if packed is None else int(packed.numel())
        layers, head = self._params(fed)
        slots = self._kernel_slots(fed, pos.view(-1), cache)
        for i, lw in enumerate(layers):
            x = self._layer(lw, x, b, s, cache, i, attend, packed, slots)
        return self._logits(x, head)

    def greedy(self, local: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """The argmax over the true vocabulary [b] of vocab-parallel logits [b, V/tp], without
        gathering them: each rank's best (value, id) is gathered and the highest value wins,
        the lowest id on ties (= the argmax of the full row)."""
        n_local = local.shape[-1]
        valid = max(0, min(n_local, vocab_size - self.vocab_start))
        if self.tp_size == 1:
            return local[:, :valid].argmax(dim=-1)
        if valid > 0:
            idx = local[:, :valid].argmax(dim=-1)  # [b]
            val = local.gather(1, idx.unsqueeze(1)).squeeze(1).float()
        else:
            idx = torch.zeros(local.shape[0], dtype=torch.long, device=local.device)
            val = torch.full((local.shape[0],), float("-inf"), device=local.device)
        ids = idx + self.vocab_start
        vals = [torch.empty_like(val) for _ in range(self.tp_size)]
        all_ids = [torch.empty_like(ids) for _ in range(self.tp_size)]
        dist.all_gather(vals, val, group=self.tp_group)
        dist.all_gather(all_ids, ids, group=self.tp_group)
        winner = torch.stack(vals).argmax(dim=0)  # [b]: first max = lowest rank = lowest id
        return torch.stack(all_ids).gather(0, winner.unsqueeze(0)).squeeze(0)
