"""The shard rules of ``megagpt.checkpoint.canonical``: which canonical tensors split along which
dim, padding the vocabulary and cutting it back, splitting into TP shards and gathering them.
Pure functions on small tensors; the last test checks the names and dims against a built model
(no process group: megatron-core's layers build at TP=1 without one)."""

from __future__ import annotations

import pytest
import torch

from megagpt.checkpoint.canonical import (
    POSITION,
    WORD,
    WORD_ATTR,
    WORD_BLOCK,
    CheckpointError,
    expected_shapes,
    gather_shards,
    local_shard,
    merge_tp,
    pad_vocab,
    partition_dim,
    shard,
    split_for_tp,
    unpad_vocab,
)
from tests.unit.checkpoint.conftest import small_config

# Megatron's rules, restated: column-parallel layers (QKV, h -> 4h) split their output rows,
# row-parallel weights (attention output, 4h -> h) their input columns, the vocab-parallel
# embedding its rows; everything else is replicated.
LAYER_SPLIT = {
    "attention.query_key_value.weight": 0,
    "attention.query_key_value.bias": 0,
    "mlp.dense_h_to_4h.weight": 0,
    "mlp.dense_h_to_4h.bias": 0,
    "attention.dense.weight": 1,
    "mlp.dense_4h_to_h.weight": 1,
}


def megatron_dim(name: str) -> int | None:
    if name == WORD:
        return 0
    if name.startswith("layers."):
        return LAYER_SPLIT.get(name.split(".", 2)[2])
    return None


def test_word_embedding_name_is_block_plus_attribute():
    assert WORD == "embedding.word.word_embeddings.weight" == f"{WORD_BLOCK}.{WORD_ATTR}"


def test_partition_dims_follow_megatron(cfg):
    names = expected_shapes(cfg)
    assert {n: partition_dim(n) for n in names} == {n: megatron_dim(n) for n in names}
    # Replicated: LayerNorms, positions, row-parallel biases (added after the all-reduce).
    for name in (
        POSITION,
        "layers.0.attention.dense.bias",
        "layers.1.mlp.dense_4h_to_h.bias",
        "layers.0.input_layernorm.weight",
        "final_norm.final_layernorm.bias",
    ):
        assert name in names and partition_dim(name) is None
    assert sum(d is not None for d in map(partition_dim, names)) == 1 + 6 * cfg.num_layers


def test_pad_vocab_appends_zero_rows_and_unpad_cuts_them(cfg, state):
    word = state[WORD]  # [96, 32]
    padded = pad_vocab(WORD, word, 128)
    assert list(padded.shape) == [128, 32]
    assert torch.equal(padded[:96], word) and not padded[96:].any()
    assert torch.equal(unpad_vocab(WORD, padded, cfg.vocab_size), word)
    assert pad_vocab(WORD, word, 96) is word  # already the padded size: no copy


def test_pad_and_unpad_leave_other_tensors_alone(state):
    t = state[POSITION]
    assert pad_vocab(POSITION, t, 1000) is t
    assert unpad_vocab(POSITION, t, 3) is t


def test_pad_vocab_refuses_a_longer_embedding_naming_tensor_and_source(state):
    with pytest.raises(
        CheckpointError,
        match=rf"ckpt/x: tensor '{WORD}' has 96 rows, more "
        r"than the 64 of the padded vocabulary",
    ):
        pad_vocab(WORD, state[WORD], 64, "ckpt/x")


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_split_then_merge_is_the_identity_for_every_tensor(cfg, state, tp):
    for name, t in state.items():
        t = pad_vocab(name, t, 128)
        shards = split_for_tp(name, t, tp)
        assert len(shards) == tp
        dim = partition_dim(name)
        for r, s in enumerate(shards):
            assert s.is_contiguous()
            if dim is None:
                assert torch.equal(s, t)  # replicated: every rank holds it whole
            else:
                assert s.shape[dim] == t.shape[dim] // tp
                assert torch.equal(s, t.narrow(dim, r * s.shape[dim], s.shape[dim]))
        assert torch.equal(merge_tp(name, shards, "test"), t)


def test_interleaved_qkv_splits_into_whole_heads(cfg):
    """Rows ordered [heads, 3, hd]: TP rank r gets the Q, K and V of heads r*nh/tp .. ."""
    heads, hd, tp = cfg.num_heads, cfg.head_dim, 2
    name = "layers.0.attention.query_key_value.weight"
    # Row value = its head index, so each shard shows which heads it holds.
    t = torch.arange(heads).repeat_interleave(3 * hd).float()[:, None].expand(-1, 4)
    for r, s in enumerate(split_for_tp(name, t, tp)):
        held = sorted(set(s[:, 0].long().tolist()))
        assert held == list(range(r * heads // tp, (r + 1) * heads // tp))


def test_split_that_does_not_divide_names_tensor_and_source():
    t = torch.zeros(6, 4)
    with pytest.raises(
        CheckpointError,
        match=r"out/model: tensor 'layers\.0\.mlp\.dense_4h_to_h"
        r"\.weight' with shape \[6, 4\]: dimension 1 does "
        r"not split into 3 tensor-parallel shards",
    ):
        split_for_tp("layers.0.mlp.dense_4h_to_h.weight", t, 3, "out/model")


def test_shard_cuts_one_rank_along_the_given_dim():
    t = torch.arange(24).reshape(4, 6)
    assert torch.equal(shard("x", t, 1, 2, 3), t[:, 4:6])
    assert shard("x", t, None, 1, 3) is t
    with pytest.raises(CheckpointError, match="'x': TP rank 3 is outside 0..2"):
        shard("x", t, 1, 3, 3, "f")


def test_gather_refuses_shards_of_different_shapes_naming_the_shard():
    shards = [torch.zeros(2, 4), torch.zeros(2, 5)]
    with pytest.raises(
        CheckpointError,
        match=r"rec/tp01\.safetensors: TP shard 1 of 'w' has "
        r"shape \[2, 5\], shard 0 has \[2, 4\]",
    ):
        gather_shards("w", shards, 0, "rec/tp01.safetensors")
    with pytest.raises(CheckpointError, match="no tensor-parallel shards"):
        gather_shards("w", [], 0, "rec")
    # Along dim 1 the other dim (rows) must agree, the joined one may differ.
    assert list(gather_shards("w", shards, 1).shape) == [2, 9]


@pytest.mark.parametrize("tp", [1, 2])
def test_local_shard_pads_the_vocab_then_cuts_this_rank(cfg, state, tp):
    padded = 256  # e.g. padded_vocab_size(96, 2)
    full = pad_vocab(WORD, state[WORD], padded)
    for r in range(tp):
        got = local_shard(WORD, state[WORD], [padded, 32], 0, cfg.vocab_size, r, tp, "src")
        assert torch.equal(got, split_for_tp(WORD, full, tp)[r])
    name = "layers.1.attention.dense.weight"
    got = local_shard(name, state[name], [32, 32], 1, cfg.vocab_size, tp - 1, tp, "src")
    assert torch.equal(got, split_for_tp(name, state[name], tp)[tp - 1])


def test_local_shard_mismatch_names_tensor_source_and_both_shapes(cfg, state):
    with pytest.raises(
        CheckpointError,
        match=rf"run/model\.safetensors: tensor '{WORD}' has "
        r"shape \[96, 32\], the model expects \[100, 32\] "
        r"\(vocab x hidden\)",
    ):
        local_shard(WORD, state[WORD], [128, 32], 0, 100, 0, 1, "run/model.safetensors")
    name = "layers.0.mlp.dense_h_to_4h.weight"
    with pytest.raises(
        CheckpointError,
        match=rf"src: tensor '{name}' has shape \[128, 32\], "
        r"the model expects \[64, 32\]",
    ):
        local_shard(name, state[name], [64, 32], 0, 96, 0, 1, "src")


def test_every_checkpoint_fault_is_one_error_class():
    from megagpt.checkpoint import ModelDirError, reshard
    from megagpt.errors import MegagptError

    assert ModelDirError is CheckpointError and issubclass(CheckpointError, MegagptError)
    assert reshard.CheckpointError is CheckpointError  # the engine imports it from there


def test_names_and_split_dims_match_the_built_model():
    """The table here against the model itself: every parameter's canonical name, full shape
    and the split dim megatron-core marks on it (TP=1 keeps the marks, so no group needed)."""
    from megagpt.config import ParallelConfig
    from megagpt.model import GPTModel, megatron_config, padded_vocab_size
    from megagpt.model.init import canonical_parameters

    cfg = small_config()
    model = GPTModel(cfg, megatron_config(cfg, ParallelConfig()))
    want = expected_shapes(cfg)
    want[WORD] = [padded_vocab_size(cfg.vocab_size, 1), cfg.hidden_size]
    got = {name: p for name, p in canonical_parameters(model)}
    assert list(got) == list(want)  # same names, same (model) order
    for name, p in got.items():
        assert list(p.shape) == want[name], name
        marked = p.partition_dim if getattr(p, "tensor_model_parallel", False) else None
        assert marked == partition_dim(name), name
    assert model.word.word_embeddings.weight is got[WORD]
