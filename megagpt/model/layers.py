"""GPT building blocks on megatron-core's tensor-parallel layers.

Convention: activations are sequence-first ``[s, b, h]`` between blocks (megatron-core's layout);
token ids and labels are ``[b, s]``. With sequence parallelism the ``s`` between blocks is the
local ``s / tp`` chunk. Each top-level block has a ``canonical_name`` that does not depend on the
parallel layout; initialisation and checkpoints key parameters by it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig, tensor_parallel
from torch import nn
from torch.utils.checkpoint import checkpoint

from megagpt.config.schema import ModelConfig
from megagpt.model.fused import (
    bias_dropout_add,
    bias_gelu,
    TiedGradient,
    linear_cross_entropy,
    tied_lookup,
    vocab_cross_entropy,
)
from megagpt.model import cpu_training
from megagpt.model.matmul import onednn_linear
from megagpt.model.rng import TensorParallelRNG, forked_rng
from megagpt.parallel.regions import (
    gather_from_sequence,
    reduce_scatter_to_sequence,
    scatter_to_sequence,
    sequence_parallel_linear,
)


def _tp_size(mp: ModelParallelConfig) -> int:
    return mp.tensor_model_parallel_size


def _single_rank(layer: nn.Module) -> bool:
    """True when the layer's tensor-parallel group is this rank alone (TP = 1)."""
    return layer.tp_group is None or layer.tp_group.size() == 1


def column_linear(
    layer: tensor_parallel.ColumnParallelLinear, x: torch.Tensor, onednn: bool = False
) -> torch.Tensor:
    """A column-parallel linear (bias added, output left split).

    Sequence parallel: our device-agnostic gather + linear (megatron-core's allocates on CUDA).
    At TP = 1, and without autograd (generation, evaluation), the forward is a plain F.linear on
    the local shard: megatron-core's autograd wrapper is the same matmul there, adds the bias in
    a separate kernel (F.linear folds it into the GEMM) and costs a Python call that dominates
    one-token decoding steps and that ``torch.compile`` would have to trace. ``onednn``: that
    local matmul's fp32 CPU GEMMs on oneDNN (``matmul.onednn_linear``, ``train.cpu_matmul``)."""
    if layer.sequence_parallel:
        return sequence_parallel_linear(x, layer.weight, layer.bias, layer.tp_group)
    out, bias = column_linear_apart(layer, x, onednn)
    return out if bias is None else out + bias


def _local_linear(onednn: bool):
    """The matmul of a local shard: ``F.linear``, or its oneDNN form (``train.cpu_matmul``)."""
    return onednn_linear if onednn else F.linear


def column_linear_apart(
    layer: tensor_parallel.ColumnParallelLinear, x: torch.Tensor, onednn: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``column_linear`` with the bias returned apart where it cannot be folded into the GEMM
    (tensor parallel with autograd, sequence parallel), for a fused bias + activation; None
    when the output already holds it."""
    if layer.sequence_parallel:
        return sequence_parallel_linear(x, layer.weight, None, layer.tp_group), layer.bias
    if torch.is_grad_enabled() and not _single_rank(layer):
        out, bias = layer(x)  # built with skip_bias_add=True: the bias comes back apart
        return (out, bias) if layer.skip_bias_add else (out, None)
    return _local_linear(onednn)(x, layer.weight, layer.bias), None


def row_linear(
    layer: tensor_parallel.RowParallelLinear, x: torch.Tensor, onednn: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """A row-parallel linear with its bias returned apart (skip_bias_add), same paths as
    ``column_linear``: local matmul, then the sum over the tensor-parallel group (sequence
    parallel: a reduce-scatter to this rank's sequence chunk)."""
    if layer.sequence_parallel:
        return reduce_scatter_to_sequence(F.linear(x, layer.weight), layer.tp_group), layer.bias
    if torch.is_grad_enabled() and not _single_rank(layer):
        return layer(x)
    out = _local_linear(onednn)(x, layer.weight)
    if layer.tp_group is not None and layer.tp_group.size() > 1:
        torch.distributed.all_reduce(out, group=layer.tp_group)
    return out, layer.bias


def _mark_partitioned(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """Tag a megatron-core weight as split along ``dim``. megatron-core only sets these
    attributes when it initialises the weight itself, which we skip (megagpt.model.init); the
    grad-norm, init and checkpoint code all read them."""
    tensor_parallel.set_tensor_model_parallel_attributes(weight, True, dim, 1)
    return weight


class WordEmbedding(nn.Module):
    """Vocab-parallel token embedding; also the (tied) output layer via ``logits``."""

    canonical_name = "embedding.word"

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig, padded_vocab: int):
        super().__init__()
        self.true_vocab = cfg.vocab_size
        self.padded_vocab = padded_vocab
        self.sequence_parallel = mp.sequence_parallel
        self.onednn = False  # fp32 CPU GEMMs on oneDNN (matmul.use_onednn, train.cpu_matmul)
        self.word_embeddings = tensor_parallel.VocabParallelEmbedding(
            padded_vocab, cfg.hidden_size, init_method=nn.init.zeros_, config=mp
        )
        _mark_partitioned(self.word_embeddings.weight, 0)

    def forward(self, tokens: torch.Tensor, tied: TiedGradient | None = None) -> torch.Tensor:
        """[b, s] -> [b, s, h]. ``tied`` (TP = 1): this forward's ``loss`` over the same weight
        gets it too, and the weight receives one gradient (``fused.tied_lookup``)."""
        if _single_rank(self.word_embeddings):
            # TP = 1: megatron-core's lookup is this plus a sum over a group of one, which it
            # asserts exists; a model used without process groups (generation, tests) has none.
            if tied is not None:
                return tied_lookup(tokens, self.word_embeddings.weight, tied)
            return F.embedding(tokens, self.word_embeddings.weight)
        return self.word_embeddings(tokens)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[s, b, h] -> vocab-parallel logits [s, b, V_padded / tp].

        Logits of padding rows (ids >= the true vocab) are pushed to the dtype's minimum, so the
        softmax, the loss and generation never see them: the model is then the same function
        whatever padding the TP size implies.
        """
        weight = self.word_embeddings.weight
        if self.sequence_parallel:  # [s/tp, b, h] gathered inside the linear
            logits = sequence_parallel_linear(hidden, weight, None, self.word_embeddings.tp_group)
        else:
            if not _single_rank(self.word_embeddings):  # identity; backward: sum over TP
                hidden = tensor_parallel.copy_to_tensor_model_parallel_region(hidden)
            logits = _local_linear(self.onednn)(hidden, weight)
        start = self.word_embeddings.vocab_start_index
        n_local = weight.shape[0]
        valid = max(0, min(n_local, self.true_vocab - start))
        if valid < n_local:
            logits = torch.cat(
                [
                    logits[..., :valid],
                    torch.full_like(logits[..., valid:], torch.finfo(logits.dtype).min),
                ],
                dim=-1,
            )
        return logits

    def loss(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor,
        loss_mask: torch.Tensor | None,
        tied: TiedGradient | None = None,
    ) -> torch.Tensor:
        """``lm_loss(self.logits(hidden), labels, loss_mask)`` without the logits: hidden
        [s, b, h] (sequence parallel: [s/tp, b, h]), labels and mask [b, s]. The output layer and
        the loss run as one function (``fused.linear_cross_entropy``) that never holds the full
        logits; padding rows stay out of the softmax as in ``logits``. ``tied``: the one given
        to this forward's lookup (``forward``), TP = 1 only."""
        weight = self.word_embeddings.weight
        group = self.word_embeddings.tp_group
        if self.sequence_parallel:  # [s/tp, b, h] -> [s, b, h]; backward: reduce-scatter
            hidden = gather_from_sequence(hidden, group)
        elif not _single_rank(self.word_embeddings):
            # identity; backward: the sum of the TP ranks' partial input gradients
            hidden = tensor_parallel.copy_to_tensor_model_parallel_region(hidden)
        start = self.word_embeddings.vocab_start_index
        tp = group.size() if group is not None else 1
        labels_sb = labels.transpose(0, 1)  # [b, s] -> [s, b]
        return linear_cross_entropy(
            hidden,
            weight,
            labels_sb,
            _row_weights(loss_mask, labels_sb),
            start,
            self.true_vocab - start,
            group if tp > 1 else None,
            tied if tp == 1 else None,
            self.onednn,
        )


class PositionEmbedding(nn.Module):
    """Adds learned absolute positions; turns [b, s, h] into sequence-first [s, b, h].

    Sequence parallel: returns this rank's [s/tp, b, h] chunk, whose dropout draws from the
    tensor-parallel region's stream (``rng``) so chunks do not share masks."""

    canonical_name = "embedding.position"

    def __init__(
        self, cfg: ModelConfig, mp: ModelParallelConfig, rng: TensorParallelRNG | None = None
    ):
        super().__init__()
        self.position_embeddings = nn.Embedding(
            cfg.max_position_embeddings, cfg.hidden_size, dtype=mp.params_dtype
        )
        self.dropout = nn.Dropout(cfg.dropout)
        self.sequence_parallel = mp.sequence_parallel
        self.rng = rng if rng is not None else TensorParallelRNG()

    def forward(self, words: torch.Tensor, position_offset: int = 0) -> torch.Tensor:
        s = words.shape[1]
        pos = torch.arange(position_offset, position_offset + s, device=words.device)
        h = words + self.position_embeddings(pos).unsqueeze(0)  # [b, s, h] + [1, s, h]
        h = h.transpose(0, 1).contiguous()  # [b, s, h] -> [s, b, h]
        if self.sequence_parallel:
            from megatron.core import parallel_state

            h = scatter_to_sequence(h, parallel_state.get_tensor_model_parallel_group())
            # -> [s/tp, b, h]
            if self.training and self.dropout.p > 0:
                with forked_rng(self.rng.next_seed(), h.device):
                    return self.dropout(h)
        return self.dropout(h)


def reorder_rows(buffer: torch.Tensor, index: torch.Tensor, filled: int) -> torch.Tensor:
    """``buffer`` [b, heads, slots, hd] with rows ``index`` in its first ``filled`` slots: in
    place when the row count stays (only the filled slots are copied, nothing when ``index``
    is every row in order), a new buffer when it changes (a prompt's one row -> k beams)."""
    rows = index.numel()
    if rows != buffer.shape[0]:
        return buffer.index_select(0, index)
    if not torch.equal(index, torch.arange(rows, device=index.device)):
        buffer[:, :, :filled] = buffer[index, :, :filled]
    return buffer


class KVCache:
    """Key/value buffers for incremental decoding, allocated once: [b, heads_local, max_length,
    hd] per layer, written in place (no concatenation per token).

    A layer's buffers are allocated on its first ``update`` (the layer knows b, heads, head_dim,
    dtype and device), sized to ``max_length``: the longest row (prompt + new tokens). Two ways
    to index them:

    - by ``length`` (a Python int, the tokens already cached; ``GPTModel.forward`` advances it):
      ``update`` writes at ``[length, length + s)`` and returns views of the filled prefix, so
      attention reads only cached keys. The eager path.
    - by ``position`` (a 0-d long tensor on the device, set by the caller): ``update`` writes one
      token at that index and returns the whole buffers; ``mask()`` says which slots are filled.
      Shapes and addresses never change, so a decode step written this way can be captured by
      ``torch.compile`` / CUDA graphs. Buffers are zeroed then: masked slots must not hold NaN.
    """

    def __init__(self, num_layers: int, max_length: int = 2048, static: bool = False):
        self.max_length = max_length
        self.static = static
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.length = 0  # tokens already cached (the eager path)
        self.position: torch.Tensor | None = None  # the slot of the next token (static path)
        self._slots: torch.Tensor | None = None

    def _allocate(self, layer: int, k: torch.Tensor) -> None:
        b, nh, _, hd = k.shape
        alloc = torch.zeros if self.static else torch.empty
        self.keys[layer] = alloc(b, nh, self.max_length, hd, dtype=k.dtype, device=k.device)
        self.values[layer] = alloc(b, nh, self.max_length, hd, dtype=k.dtype, device=k.device)
        if self.static and k.is_cuda:
            # CUDA graphs replay fixed addresses: torch.compile must treat these mutated buffers
            # as static inputs rather than copy them around (or skip the graph).
            torch._dynamo.mark_static_address(self.keys[layer])
            torch._dynamo.mark_static_address(self.values[layer])

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [b, nh, s_new, hd] for ``layer``; returns the keys/values to attend to."""
        if self.keys[layer] is None:
            self._allocate(layer, k)
        keys, values = self.keys[layer], self.values[layer]
        if self.position is not None:  # one token at a tensor index: static shapes
            keys.index_copy_(2, self.position.view(1), k)
            values.index_copy_(2, self.position.view(1), v)
            return keys, values
        end = self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(
                f"KV cache holds {self.max_length} positions; {end} requested "
                "(size it to the longest row: prompt + new tokens)"
            )
        keys[:, :, self.length : end] = k
        values[:, :, self.length : end] = v
        return keys[:, :, :end], values[:, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Rows ``index`` (a long tensor of row numbers, repeats allowed) become the cache's
        rows over its filled slots: beam search continues the beams it keeps (eager path)."""
        for layer, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is not None and v is not None:
                self.keys[layer] = reorder_rows(k, index, self.length)
                self.values[layer] = reorder_rows(v, index, self.length)

    def begin_static(self, device: torch.device) -> None:
        """Switch to the static path: the next token goes to slot ``length``; the caller
        advances ``position`` in place (``position.add_(1)``) after each step."""
        self.position = torch.tensor(self.length, device=device)
        self._slots = torch.arange(self.max_length, device=device)

    def mask(self) -> torch.Tensor:
        """Static path: [1, max_length] bool, True for the slots at or before ``position``."""
        return (self._slots <= self.position).unsqueeze(0)


class SelfAttention(nn.Module):
    """Causal multi-head attention; QKV fused with rows interleaved per head (q|k|v of head 0,
    then head 1, ...), the layout of the 1.3B+ ModelScope/Megatron checkpoints, so a TP shard
    holds whole heads."""

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig, recompute_core: bool):
        super().__init__()
        tp = _tp_size(mp)
        self.heads_local = cfg.num_heads // tp
        self.head_dim = cfg.head_dim
        self.attention_dropout = cfg.attention_dropout
        self.recompute_core = recompute_core
        self.onednn = False  # fp32 CPU GEMMs on oneDNN (matmul.use_onednn, train.cpu_matmul)
        # the causal attention on our CPU kernel where cpu_training.attention_applies
        # (use_cpu_kernels, train.cpu_kernels)
        self.cpu_kernels = False
        self.query_key_value = tensor_parallel.ColumnParallelLinear(
            cfg.hidden_size,
            3 * cfg.hidden_size,
            config=mp,
            init_method=nn.init.zeros_,
            bias=True,
            gather_output=False,
        )
        self.dense = tensor_parallel.RowParallelLinear(
            cfg.hidden_size,
            cfg.hidden_size,
            config=mp,
            init_method=nn.init.zeros_,
            bias=True,
            input_is_parallel=True,
            skip_bias_add=True,
        )
        _mark_partitioned(self.query_key_value.weight, 0)
        _mark_partitioned(self.dense.weight, 1)

    def _core(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        causal: bool,
        dropout_seed: int | None,
    ) -> torch.Tensor:
        if dropout_seed is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        # This rank's heads draw their dropout masks from the TP-region stream (model/rng.py).
        with forked_rng(dropout_seed, q.device):
            return F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attention_dropout, is_causal=causal
            )

    @torch.compiler.disable
    def _core_eager(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        causal: bool,
        dropout_seed: int | None,
    ) -> torch.Tensor:
        """The attention core where it forks the RNG or is checkpointed: always eager, so a
        compiled layer (``train.compile``) breaks its graph here and the dropout masks and the
        recompute are exactly the eager ones."""
        if self.recompute_core and self.training:
            return checkpoint(self._core, q, k, v, causal, dropout_seed, use_reentrant=False)
        return self._core(q, k, v, causal, dropout_seed)

    def forward(
        self,
        x: torch.Tensor,
        kv_cache: KVCache | None = None,
        layer: int = 0,
        dropout_seed: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``dropout_seed``: the attention-dropout seed drawn by the layer (None: no dropout)."""
        qkv = column_linear(
            self.query_key_value, x, self.onednn
        )  # [s, b, h] -> [s, b, 3h/tp] (SP: s gathered)
        s, b, _ = qkv.shape
        qkv = qkv.view(s, b, self.heads_local, 3 * self.head_dim)  # -> [s, b, nh, 3hd]
        if self.cpu_kernels and kv_cache is None and cpu_training.attention_applies(qkv):
            # Our kernel keeps no s x s tensor: selective recompute has nothing to save here.
            p = self.attention_dropout if self.training and dropout_seed is not None else 0.0
            group = self.query_key_value.tp_group
            head0 = (group.rank() if group is not None else 0) * self.heads_local
            ctx = cpu_training.causal_attention(qkv, p, dropout_seed or 0, head0)
            return row_linear(self.dense, ctx.view(s, b, -1), self.onednn)  # -> [s, b, h]
        q, k, v = qkv.split(self.head_dim, dim=-1)  # 3 x [s, b, nh, hd]
        # [s, b, nh, hd] -> [b, nh, s, hd], the layout of scaled_dot_product_attention
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        causal = True
        if kv_cache is not None:
            past = kv_cache.length
            k, v = kv_cache.update(layer, k, v)
            if kv_cache.position is not None:
                # Static decode step: one query against the whole buffer, unfilled slots masked.
                ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=kv_cache.mask())
                return self._out(ctx, s, b)
            if past > 0:
                # New queries sit at positions past..past+s-1 and see every cached key.
                causal = False
                if s > 1:
                    q_pos = torch.arange(past, past + s, device=q.device).unsqueeze(1)
                    mask = torch.arange(k.shape[2], device=q.device).unsqueeze(0) <= q_pos
                    ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                    return self._out(ctx, s, b)
        if dropout_seed is None and not (self.recompute_core and self.training):
            ctx = self._core(q, k, v, causal, None)
        else:
            ctx = self._core_eager(q, k, v, causal, dropout_seed)
        return self._out(ctx, s, b)

    def _out(self, ctx: torch.Tensor, s: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        # [b, nh, s, hd] -> [s, b, nh*hd]. No copy on the flash/efficient kernels: q is a
        # permuted view of the [s, b, nh, hd] projection and their output keeps q's layout, so
        # the permute gives back a contiguous [s, b, nh, hd] (the math kernel, taken with
        # attention dropout on CPU, returns [b, nh, s, hd] and the reshape copies there).
        ctx = ctx.permute(2, 0, 1, 3).reshape(s, b, -1)
        return row_linear(self.dense, ctx, self.onednn)  # -> ([s, b, h], bias [h])


def use_cpu_kernels(module: nn.Module) -> int:
    """Mark ``module``'s attention and MLP blocks (a whole GPT or a pipeline stage) to run their
    causal self-attention and their bias + GELU on our CPU kernels where they apply
    (``megagpt.model.cpu_training``, ``train.cpu_kernels``; a KV cache, a longer sequence or
    tensor parallelism for the MLP keep torch's). Returns how many."""
    n = 0
    for m in module.modules():
        if isinstance(m, (SelfAttention, MLP)):
            m.cpu_kernels = True
            n += 1
    return n


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig):
        super().__init__()
        self.approximate = "tanh" if cfg.activation == "gelu_tanh" else "none"
        self.onednn = False  # fp32 CPU GEMMs on oneDNN (matmul.use_onednn, train.cpu_matmul)
        # bias + GELU on our CPU kernel where cpu_training.linear_gelu_applies (use_cpu_kernels)
        self.cpu_kernels = False
        # skip_bias_add: where the bias cannot join the GEMM it joins the GELU (bias_gelu).
        self.dense_h_to_4h = tensor_parallel.ColumnParallelLinear(
            cfg.hidden_size,
            cfg.ffn,
            config=mp,
            init_method=nn.init.zeros_,
            bias=True,
            gather_output=False,
            skip_bias_add=True,
        )
        self.dense_4h_to_h = tensor_parallel.RowParallelLinear(
            cfg.ffn,
            cfg.hidden_size,
            config=mp,
            init_method=nn.init.zeros_,
            bias=True,
            input_is_parallel=True,
            skip_bias_add=True,
        )
        _mark_partitioned(self.dense_h_to_4h.weight, 0)
        _mark_partitioned(self.dense_4h_to_h.weight, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fc1 = self.dense_h_to_4h
        if (
            self.cpu_kernels
            and not fc1.sequence_parallel
            and _single_rank(fc1)
            and cpu_training.linear_gelu_applies(x, fc1.weight)
        ):  # [s, b, h] -> [s, b, 4h]
            h = cpu_training.linear_gelu(x, fc1.weight, fc1.bias, self.approximate, self.onednn)
        else:
            h, bias = column_linear_apart(fc1, x, self.onednn)  # [s, b, h] -> [s, b, 4h/tp]
            h = bias_gelu(h, bias, self.approximate)
        return row_linear(self.dense_4h_to_h, h, self.onednn)  # -> ([s, b, h], bias)


class DecoderLayer(nn.Module):
    """Pre-LN block: x + drop(attn(LN(x))), then + drop(mlp(LN(.))).

    ``rng`` is the tensor-parallel region's dropout stream shared by the model's layers (attention
    dropout always; the residual dropouts too under sequence parallelism)."""

    def __init__(
        self,
        cfg: ModelConfig,
        mp: ModelParallelConfig,
        layer_number: int,
        recompute: str = "none",
        rng: TensorParallelRNG | None = None,
    ):
        super().__init__()
        self.rng = rng if rng is not None else TensorParallelRNG()
        self.sequence_parallel = mp.sequence_parallel
        self.layer_number = layer_number
        self.canonical_name = f"layers.{layer_number}"
        self.recompute_full = recompute == "full"
        self.input_layernorm = nn.LayerNorm(
            cfg.hidden_size, eps=cfg.layernorm_eps, dtype=mp.params_dtype
        )
        self.attention = SelfAttention(cfg, mp, recompute_core=recompute == "selective")
        self.post_attention_layernorm = nn.LayerNorm(
            cfg.hidden_size, eps=cfg.layernorm_eps, dtype=mp.params_dtype
        )
        self.mlp = MLP(cfg, mp)
        self.dropout = cfg.dropout
        self._compiled = None  # torch.compile'd ``_forward`` (compile_forward)
        if mp.sequence_parallel:
            # Under sequence parallelism each TP rank sees s/tp tokens, so the grads of these
            # replicated parameters are partial sums: mark them for the engine's TP all-reduce.
            for p in (
                *self.input_layernorm.parameters(),
                *self.post_attention_layernorm.parameters(),
                self.attention.dense.bias,
                self.mlp.dense_4h_to_h.bias,
            ):
                p.sequence_parallel = True

    def _residual(
        self, out: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor, seed: int | None
    ) -> torch.Tensor:
        """x + dropout(out + bias), fused (``bias_dropout_add``)."""
        if seed is None:  # replicated region: the default stream, the same on every TP rank
            return bias_dropout_add(out, bias, x, self.dropout, self.training)
        return self._residual_forked(out, bias, x, seed)

    @torch.compiler.disable
    def _residual_forked(
        self, out: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor, seed: int
    ) -> torch.Tensor:
        """Sequence parallel: this rank's own chunk draws from the TP-region stream; eager
        under ``train.compile`` (a graph break) so the forked generator is the eager one."""
        with forked_rng(seed, x.device):
            return bias_dropout_add(out, bias, x, self.dropout, self.training)

    def _forward(
        self,
        x: torch.Tensor,
        kv_cache: KVCache | None,
        seeds: tuple[int | None, int | None, int | None],
    ) -> torch.Tensor:
        attn_seed, seed1, seed2 = seeds
        out, bias = self.attention(self.input_layernorm(x), kv_cache, self.layer_number, attn_seed)
        x = self._residual(out, bias, x, seed1)
        out, bias = self.mlp(self.post_attention_layernorm(x))
        return self._residual(out, bias, x, seed2)

    def _dropout_seeds(self) -> tuple[int | None, int | None, int | None]:
        """TP-region seeds of this call, drawn before any checkpointing so a recompute reuses
        them: (attention, first residual, second residual); None where the default stream (or
        no dropout) applies."""
        if not self.training:
            return None, None, None
        attn = self.rng.next_seed() if self.attention.attention_dropout > 0 else None
        if self.sequence_parallel and self.dropout > 0:
            return attn, self.rng.next_seed(), self.rng.next_seed()
        return attn, None, None

    def compile_forward(self, **kwargs) -> None:
        """Run training forwards through ``torch.compile`` (``train.compile``; see
        ``megagpt.model.compile``). Generation and evaluation (a KV cache, or eval mode) stay
        eager; the parts that fork the RNG or checkpoint run eagerly inside (graph breaks)."""
        self._compiled = torch.compile(self._forward, **kwargs)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        seeds = self._dropout_seeds()
        fn = self._forward
        if self._compiled is not None and self.training and kv_cache is None:
            fn = self._compiled
        if self.recompute_full and self.training and torch.is_grad_enabled():
            # Non-reentrant checkpointing restores the default RNG state and the TP-region seeds
            # are arguments, so the recompute draws the same dropout masks.
            return checkpoint(fn, x, None, seeds, use_reentrant=False)
        return fn(x, kv_cache, seeds)


class FinalNorm(nn.Module):
    canonical_name = "final_norm"

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig):
        super().__init__()
        self.final_layernorm = nn.LayerNorm(
            cfg.hidden_size, eps=cfg.layernorm_eps, dtype=mp.params_dtype
        )
        if mp.sequence_parallel:
            for p in self.final_layernorm.parameters():
                p.sequence_parallel = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_layernorm(x)


def lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None
) -> torch.Tensor:
    """Mean token cross entropy over ``loss_mask``: logits [s, b, V/tp]; labels, mask [b, s].

    An all-zero mask gives 0 (not NaN), so a micro-batch of padding cannot poison a step.
    """
    from megatron.core import parallel_state

    labels_sb = labels.transpose(0, 1).contiguous()  # [b, s] -> [s, b]
    # (a model used without process groups is at TP = 1)
    tp = (
        parallel_state.get_tensor_model_parallel_world_size()
        if parallel_state.model_parallel_is_initialized()
        else 1
    )
    group = parallel_state.get_tensor_model_parallel_group() if tp > 1 else None
    start = parallel_state.get_tensor_model_parallel_rank() * logits.shape[-1] if tp > 1 else 0
    # In the logits' dtype: the chunked loss upcasts a chunk at a time (fused.py).
    ce = vocab_cross_entropy(logits, labels_sb, start, group)  # [s, b]
    return (ce * _row_weights(loss_mask, labels_sb)).sum()


def _row_weights(loss_mask: torch.Tensor | None, labels_sb: torch.Tensor) -> torch.Tensor:
    """Each token's weight in the mean masked loss, fp32 [s, b]: mask / max(sum(mask), 1), or
    1 / tokens without a mask. An all-zero mask gives 0 (not NaN), so a micro-batch of padding
    cannot poison a step."""
    if loss_mask is None:
        return torch.full(labels_sb.shape, 1.0 / labels_sb.numel(), device=labels_sb.device)
    mask = loss_mask.transpose(0, 1).float()  # [b, s] -> [s, b]
    return mask / mask.sum().clamp(min=1.0)


def output_init_std(cfg: ModelConfig) -> float:
    """Megatron's scaled init for the two residual output projections."""
    return cfg.init_std / math.sqrt(2.0 * cfg.num_layers)
