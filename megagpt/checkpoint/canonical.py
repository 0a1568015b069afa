"""Canonical tensors: the layout-free vocabulary every converter and the reshard record share.

A *canonical state* is ``{canonical name: full (unsharded) tensor}`` with the word embedding cut
to the true vocabulary, exactly what a megagpt model directory stores (``model_dir.py``). This
module is the one place that knows

* the names (``WORD``, ``POSITION``, ...) and their full shapes for a ``ModelConfig``;
* the shard rules: which names Megatron splits across tensor-parallel ranks along which dim,
  padding the word embedding to the padded vocabulary and cutting it back, splitting a full
  tensor into TP shards and gathering shards into the full tensor;
* the two fused-QKV row orders, and how to read a pickled weight file safely;
* ``CheckpointError``, the one error class of all of it, whose message names the tensor and the
  file (or other source) it came from.

The model directory, the layout-free record, the engine's weight loading and the converters
all cut and join tensors through the functions here.
"""

from __future__ import annotations

import argparse
import contextlib

import pickle
from pathlib import Path

import torch

from megagpt.config.schema import ModelConfig
from megagpt.errors import MegagptError

# The word embedding: block ``WordEmbedding.canonical_name`` (model/layers.py), parameter
# ``word_embeddings.weight`` inside it. DeepSpeed's pipeline ties that attribute between the
# first and the last stage (engine.py), so it is named here once.
WORD_BLOCK = "embedding.word"
WORD_ATTR = "word_embeddings.weight"
WORD = f"{WORD_BLOCK}.{WORD_ATTR}"
POSITION = "embedding.position.position_embeddings.weight"

# Megatron column-parallel tensors split their output rows (dim 0), row-parallel weights their
# input columns (dim 1); everything else (LayerNorms, positions, row-parallel biases) is
# replicated on every TP rank. Matched as name suffixes (layer names carry ``layers.N.``).
_DIM0 = (
    WORD,
    "attention.query_key_value.weight",
    "attention.query_key_value.bias",
    "mlp.dense_h_to_4h.weight",
    "mlp.dense_h_to_4h.bias",
)
_DIM1 = ("attention.dense.weight", "mlp.dense_4h_to_h.weight")


class CheckpointError(MegagptError, ValueError):
    """A checkpoint, model directory or weight file that cannot be read or does not fit the
    model; the message names the file or tensor, and both shapes on a mismatch."""


def _at(source: str) -> str:
    """Message prefix naming where a tensor came from (empty when the caller has no name)."""
    return f"{source}: " if source else ""


def partition_dim(name: str) -> int | None:
    """The tensor-parallel split dimension of canonical tensor ``name`` (None: replicated)."""
    if name.endswith(_DIM0):
        return 0
    if name.endswith(_DIM1):
        return 1
    return None


def expected_shapes(cfg: ModelConfig) -> dict[str, list[int]]:
    """Full shape of every canonical tensor of the GPT ``cfg`` (true vocabulary), in model order."""
    h, f = cfg.hidden_size, cfg.ffn
    out = {WORD: [cfg.vocab_size, h], POSITION: [cfg.max_position_embeddings, h]}
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        out.update(
            {
                p + "input_layernorm.weight": [h],
                p + "input_layernorm.bias": [h],
                p + "attention.query_key_value.weight": [3 * h, h],
                p + "attention.query_key_value.bias": [3 * h],
                p + "attention.dense.weight": [h, h],
                p + "attention.dense.bias": [h],
                p + "post_attention_layernorm.weight": [h],
                p + "post_attention_layernorm.bias": [h],
                p + "mlp.dense_h_to_4h.weight": [f, h],
                p + "mlp.dense_h_to_4h.bias": [f],
                p + "mlp.dense_4h_to_h.weight": [h, f],
                p + "mlp.dense_4h_to_h.bias": [h],
            }
        )
    out["final_norm.final_layernorm.weight"] = [h]
    out["final_norm.final_layernorm.bias"] = [h]
    return out


def check_tensors(tensors: dict[str, torch.Tensor], cfg: ModelConfig, source: str) -> None:
    """Raise CheckpointError unless ``tensors`` holds exactly the canonical tensors of ``cfg``.

    The message names the first missing, unexpected or mis-shaped tensor with both shapes.
    """
    want = expected_shapes(cfg)
    for name, shape in want.items():
        if name not in tensors:
            raise CheckpointError(f"{source}: missing tensor {name!r} (expected shape {shape})")
        got = list(tensors[name].shape)
        if got != shape:
            hint = (
                " (vocab x hidden: the vocabulary or hidden size does not fit)"
                if name == WORD
                else ""
            )
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {got}, the model expects {shape}{hint}"
            )
    extra = sorted(set(tensors) - set(want))
    if extra:
        raise CheckpointError(
            f"{source}: unexpected tensor {extra[0]!r} with shape "
            f"{list(tensors[extra[0]].shape)} (the model has no such "
            f"parameter; {len(extra)} unexpected in all)"
        )


# The model keys that fix the weights' shapes or the function they compute: weights trained under
# one value do not fit a model of another. The others may change between runs of the same
# weights: ``name``, ``seq_length`` (up to ``max_position_embeddings``), the dropouts and
# ``init_std`` (unused once weights are loaded); so may the whole parallel layout, since the
# record is resharded on load (reshard.py).
WEIGHT_KEYS = (
    "num_layers",
    "num_heads",
    "hidden_size",
    "ffn_hidden_size",
    "max_position_embeddings",
    "vocab_size",
    "activation",
    "layernorm_eps",
)


def weight_key(cfg: ModelConfig, key: str) -> object:
    """The value of WEIGHT_KEYS ``key`` in ``cfg``; ``ffn_hidden_size`` resolved (0 = 4 * h)."""
    return cfg.ffn if key == "ffn_hidden_size" else getattr(cfg, key)


def model_differences(here: ModelConfig, there: ModelConfig) -> list[tuple[str, object, object]]:
    """(key, value in ``here``, value in ``there``) of every WEIGHT_KEYS key on which two model
    configs differ, in WEIGHT_KEYS order; empty when weights of one fit a model of the other."""
    return [
        (k, weight_key(here, k), weight_key(there, k))
        for k in WEIGHT_KEYS
        if weight_key(here, k) != weight_key(there, k)
    ]


def check_heads(cfg: ModelConfig, source: str, tp: int = 1) -> None:
    """Heads must divide the hidden size, and the TP degree must divide heads and FFN width."""
    if cfg.num_heads <= 0 or cfg.hidden_size % cfg.num_heads:
        raise CheckpointError(
            f"{source}: {cfg.num_heads} attention heads do not divide hidden size {cfg.hidden_size}"
        )
    if cfg.num_heads % tp or cfg.ffn % tp:
        raise CheckpointError(
            f"{source}: {tp} tensor-parallel shards do not divide "
            f"{cfg.num_heads} heads / FFN width {cfg.ffn}"
        )


# -- fused QKV row orders -----------------------------------------------------------------
# megagpt (and ModelScope 1.3B+) interleave per head: rows [heads, 3, hd]. ModelScope base/large
# and Hugging Face GPT-2 put all Q rows, then all K, then all V: rows [3, heads, hd].


def qkv_blocks_to_interleaved(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[3h, ...] rows ordered [3, heads, hd] -> rows ordered [heads, 3, hd]."""
    rest = t.shape[1:]
    hd = t.shape[0] // (3 * heads)
    t = t.reshape(3, heads, hd, *rest)  # [3h, ...] -> [3, nh, hd, ...]
    return t.transpose(0, 1).reshape(3 * heads * hd, *rest).contiguous()  # -> [nh*3*hd, ...]


def qkv_interleaved_to_blocks(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[3h, ...] rows ordered [heads, 3, hd] -> rows ordered [3, heads, hd]."""
    rest = t.shape[1:]
    hd = t.shape[0] // (3 * heads)
    t = t.reshape(heads, 3, hd, *rest)  # [3h, ...] -> [nh, 3, hd, ...]
    return t.transpose(0, 1).reshape(3 * heads * hd, *rest).contiguous()  # -> [3*nh*hd, ...]


# -- the padded vocabulary ---------------------------------------------------------------
# The model's embedding has ``padded_vocab_size(vocab, tp)`` rows (megagpt.model.gpt), so every
# TP rank holds the same number; the rows past the true vocabulary are zero and never scored.
# Canonical states and model directories store the true vocabulary only.


def pad_vocab(name: str, t: torch.Tensor, rows: int, source: str = "") -> torch.Tensor:
    """The word embedding padded with zero rows to ``rows`` (the padded vocabulary); any other
    tensor unchanged. A word embedding longer than ``rows`` raises CheckpointError."""
    if name != WORD:
        return t
    if t.shape[0] > rows:
        raise CheckpointError(
            f"{_at(source)}tensor {name!r} has {t.shape[0]} rows, more than "
            f"the {rows} of the padded vocabulary"
        )
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])], dim=0)


def unpad_vocab(name: str, t: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The word embedding cut to the true vocabulary (a view); any other tensor unchanged."""
    return t[:vocab_size] if name == WORD else t


# -- tensor-parallel shards ---------------------------------------------------------------


def shard(
    name: str, t: torch.Tensor, dim: int | None, tp_rank: int, tp: int, source: str = ""
) -> torch.Tensor:
    """Rank ``tp_rank``'s shard of full tensor ``t`` split along ``dim`` into ``tp`` equal parts
    (a view; ``dim`` None: replicated, ``t`` itself)."""
    if dim is None or tp == 1:
        return t
    if not 0 <= tp_rank < tp:
        raise CheckpointError(
            f"{_at(source)}tensor {name!r}: TP rank {tp_rank} is outside 0..{tp - 1}"
        )
    if t.shape[dim] % tp:
        raise CheckpointError(
            f"{_at(source)}tensor {name!r} with shape {list(t.shape)}: "
            f"dimension {dim} does not split into {tp} tensor-parallel shards"
        )
    return t.chunk(tp, dim=dim)[tp_rank]


def split_for_tp(name: str, t: torch.Tensor, tp: int, source: str = "") -> list[torch.Tensor]:
    """The ``tp`` Megatron shards of full tensor ``name`` (replicated tensors repeat), each
    contiguous, split along ``partition_dim(name)``.

    Per-head interleaved QKV rows split into whole heads, so plain contiguous chunks are right.
    """
    dim = partition_dim(name)
    if dim is None or tp == 1:
        return [t] * tp
    return [shard(name, t, dim, r, tp, source).contiguous() for r in range(tp)]


def gather_shards(
    name: str, shards: list[torch.Tensor], dim: int | None, source: str = ""
) -> torch.Tensor:
    """The full tensor from its TP shards in rank order, joined along ``dim`` (None: replicated,
    shard 0 is the tensor). Shards whose other dimensions differ raise CheckpointError."""
    if not shards:
        raise CheckpointError(f"{_at(source)}tensor {name!r}: no tensor-parallel shards")
    if dim is None or len(shards) == 1:
        return shards[0]
    ref = list(shards[0].shape)
    for r, s in enumerate(shards):
        if s.ndim != len(ref) or any(n != ref[i] for i, n in enumerate(s.shape) if i != dim):
            raise CheckpointError(
                f"{_at(source)}TP shard {r} of {name!r} has shape "
                f"{list(s.shape)}, shard 0 has {ref}"
            )
    return torch.cat(shards, dim=dim)


def merge_tp(name: str, shards: list[torch.Tensor], source: str) -> torch.Tensor:
    """The full tensor from its Megatron TP shards (rank order), joined along
    ``partition_dim(name)``."""
    return gather_shards(name, shards, partition_dim(name), source)


def local_shard(
    name: str,
    full: torch.Tensor,
    shape: list[int],
    dim: int | None,
    vocab_size: int,
    tp_rank: int,
    tp: int,
    source: str,
) -> torch.Tensor:
    """This rank's shard of canonical tensor ``name`` for a parameter whose full (TP-unsharded)
    shape is ``shape`` and partition dim ``dim``.

    ``full`` is canonical: the word embedding has the true ``vocab_size`` rows and is padded
    here to ``shape[0]``. A mismatch raises CheckpointError naming the tensor, ``source`` and
    both shapes.
    """
    if name == WORD:
        if list(full.shape) != [vocab_size, *shape[1:]]:
            raise CheckpointError(
                f"{_at(source)}tensor {name!r} has shape {list(full.shape)}, "
                f"the model expects {[vocab_size, *shape[1:]]} "
                "(vocab x hidden)"
            )
        full = pad_vocab(name, full, shape[0], source)
    elif list(full.shape) != list(shape):
        raise CheckpointError(
            f"{_at(source)}tensor {name!r} has shape {list(full.shape)}, the "
            f"model expects {list(shape)}"
        )
    return shard(name, full, dim, tp_rank, tp, source)


# -- safe reading of pickled weight files -------------------------------------------------


def _weights_only_globals():
    """A context allowing argparse.Namespace in weights_only loads: torch's ``safe_globals``
    (torch >= 2.5); on torch 2.4 ``add_safe_globals``, for the process (Namespace runs no
    code when read, so allowing it for every later load is as safe)."""
    scoped = getattr(torch.serialization, "safe_globals", None)
    if scoped is not None:
        return scoped([argparse.Namespace])
    torch.serialization.add_safe_globals([argparse.Namespace])
    return contextlib.nullcontext()


def torch_load_weights(path: str | Path) -> dict:
    """``torch.load(path, weights_only=True)`` on CPU; refuse files that need arbitrary code.

    A file whose pickle references anything beyond tensors, plain containers and
    ``argparse.Namespace`` (the ``args`` Megatron saves beside the weights: a bag of attributes,
    which runs no code when read) raises CheckpointError naming the file and what to do.
    """
    try:
        with _weights_only_globals():
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: refusing to load this file: it needs arbitrary unpickling, which can run "
            f"code from the file ({first}). megagpt reads weights only with "
            "torch.load(weights_only=True) or safetensors. If you trust the file, re-save its "
            "state dict as plain tensors (torch.save(sd)) or as safetensors and convert that."
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read weights ({e})") from None
