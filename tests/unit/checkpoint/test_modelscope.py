"""ModelScope GPT-3 import (both families, 1 and 2 shards), export to the 1.3B+ layout, errors."""

from __future__ import annotations

import json
from argparse import Namespace

import pytest
import torch

from megagpt.checkpoint import modelscope
from megagpt.checkpoint.canonical import (
    CheckpointError,
    qkv_blocks_to_interleaved,
    qkv_interleaved_to_blocks,
)
from tests.unit.checkpoint.conftest import build_base_dir, build_distributed_dir


def assert_same(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k, value in a.items():
        assert torch.equal(value, b[k]), k


def test_qkv_permutation_moves_each_head_row_to_its_place():
    heads, hd = 4, 3
    # blocks layout row r = kind * heads * hd + head * hd + d; encode (kind, head, d) in the value
    blocks = torch.tensor(
        [
            [kind * 100 + head * 10 + d]
            for kind in range(3)
            for head in range(heads)
            for d in range(hd)
        ],
        dtype=torch.float32,
    )
    inter = qkv_blocks_to_interleaved(blocks, heads)
    for head in range(heads):
        for kind in range(3):
            for d in range(hd):
                assert inter[head * 3 * hd + kind * hd + d, 0] == kind * 100 + head * 10 + d
    assert torch.equal(qkv_interleaved_to_blocks(inter, heads), blocks)


@pytest.mark.parametrize("wrap", [False, True])
def test_import_base_family(tmp_path, cfg, state, wrap):
    build_base_dir(tmp_path / "ms", cfg, state, wrap=wrap)
    got_cfg, tensors, tok = modelscope.read(str(tmp_path / "ms"))
    assert_same(tensors, state)
    assert got_cfg.activation == "gelu" and got_cfg.layernorm_eps == 1e-12
    assert (got_cfg.num_layers, got_cfg.num_heads, got_cfg.vocab_size) == (2, 4, 96)
    assert tok.endswith("vocab.txt")


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("wrap", [False, True])
def test_import_distributed_family(tmp_path, cfg, state, tp, wrap):
    build_distributed_dir(tmp_path / "ms", cfg, state, tp, wrap=wrap)
    got_cfg, tensors, tok = modelscope.read(str(tmp_path / "ms"))
    assert_same(tensors, state)
    assert got_cfg.activation == "gelu_tanh"  # bias_gelu_fusion defaults to True
    assert tok.endswith("tokenizer.json")


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_export_matches_hand_built_shards_and_round_trips(tmp_path, cfg, state, tp):
    paths = modelscope.write(str(tmp_path / "out"), cfg, state, tp=tp)
    want = build_distributed_dir(tmp_path / "ref", cfg, state, tp, wrap=False)
    for r, path in enumerate(paths):
        got = torch.load(path, weights_only=True)
        assert_same(got, want[r])
    conf = json.loads((tmp_path / "out" / "configuration.json").read_text())
    assert conf["megatron"]["tensor_model_parallel_size"] == tp
    assert conf["pipeline"]["type"] == "gpt3-generation"
    back_cfg, back, _ = modelscope.read(str(tmp_path / "out"))  # import o export is exact
    assert_same(back, state)
    assert back_cfg.activation == cfg.activation and back_cfg.layernorm_eps == cfg.layernorm_eps


def test_base_import_then_export_then_import(tmp_path, cfg, state):
    build_base_dir(tmp_path / "base", cfg, state)
    c, t, tok = modelscope.read(str(tmp_path / "base"))
    modelscope.write(str(tmp_path / "out"), c, t, tp=2, tokenizer=tok)
    c2, t2, _ = modelscope.read(str(tmp_path / "out"))
    assert_same(t2, state)
    assert c2.activation == "gelu"  # exported with bias_gelu_fusion=false: erf GELU kept


class Evil:
    def __reduce__(self):
        return (print, ("this would run code",))


def test_refuses_files_that_need_unpickling(tmp_path, cfg, state):
    build_base_dir(tmp_path / "ms", cfg, state)
    torch.save({"state_dict": {}, "args": Evil()}, tmp_path / "ms" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refusing to load.*arbitrary unpickling"):
        modelscope.read(str(tmp_path / "ms"))


def test_wrong_shape_names_tensor_and_both_shapes(tmp_path, cfg, state):
    shards = build_distributed_dir(tmp_path / "ms", cfg, state, 1, wrap=False)
    sd = shards[0]
    key = "language_model.encoder.layers.1.mlp.dense_4h_to_h.weight"
    sd[key] = sd[key][:, :100]
    torch.save(sd, tmp_path / "ms" / "model" / "mp_rank_00_model_states.pt")
    with pytest.raises(
        CheckpointError,
        match=r"layers\.1\.mlp\.dense_4h_to_h\.weight.*"
        r"\[32, 100\].*\[32, 128\]",
    ):
        modelscope.read(str(tmp_path / "ms"))


def test_missing_and_unexpected_keys(tmp_path, cfg, state):
    shards = build_distributed_dir(tmp_path / "ms", cfg, state, 1, wrap=False)
    sd = dict(shards[0])
    del sd["language_model.encoder.final_layernorm.bias"]
    torch.save(sd, tmp_path / "ms" / "model" / "mp_rank_00_model_states.pt")
    with pytest.raises(
        CheckpointError,
        match=r"missing tensor 'final_norm\.final_layernorm"
        r"\.bias' \(expected shape \[32\]\)",
    ):
        modelscope.read(str(tmp_path / "ms"))
    sd["language_model.output_layer.weight"] = torch.zeros(96, 32)
    torch.save(sd, tmp_path / "ms" / "model" / "mp_rank_00_model_states.pt")
    with pytest.raises(
        CheckpointError,
        match=r"unexpected key 'language_model\.output_layer"
        r"\.weight' with shape \[96, 32\]",
    ):
        modelscope.read(str(tmp_path / "ms"))


def test_vocab_mismatch_and_head_count(tmp_path, cfg, state):
    build_distributed_dir(tmp_path / "ms", cfg, state, 2)
    conf = json.loads((tmp_path / "ms" / "config.json").read_text())
    (tmp_path / "ms" / "config.json").write_text(json.dumps({**conf, "vocab_size": 100}))
    with pytest.raises(
        CheckpointError,
        match=r"word_embeddings\.weight' has shape \[96, 32\], "
        r"the model expects \[100, 32\]",
    ):
        modelscope.read(str(tmp_path / "ms"))
    (tmp_path / "ms" / "config.json").write_text(json.dumps({**conf, "num_attention_heads": 5}))
    with pytest.raises(CheckpointError, match="5 attention heads do not divide hidden size 32"):
        modelscope.read(str(tmp_path / "ms"))


def test_export_refuses_unsplittable_vocab(tmp_path, cfg, state):
    odd = cfg.__class__(**{**cfg.__dict__, "vocab_size": 95})
    st = dict(state)
    st["embedding.word.word_embeddings.weight"] = state["embedding.word.word_embeddings.weight"][
        :95
    ]
    with pytest.raises(CheckpointError, match=r"vocabulary 95 does not split into 2 TP shards"):
        modelscope.write(str(tmp_path / "out"), odd, st, tp=2)


def test_cli_round_trip_through_every_kind(tmp_path, cfg, state):
    """ModelScope 2 shards -> megagpt model dir -> HF -> megagpt -> ModelScope base-free 1 shard:
    the tensors never change."""
    from megagpt.checkpoint import convert, model_dir
    from megagpt.cli import main

    build_distributed_dir(tmp_path / "ms", cfg, state, 2)
    assert convert.detect(str(tmp_path / "ms")) == "modelscope"
    assert (
        main(
            [
                "convert",
                "--input",
                str(tmp_path / "ms"),
                "--output",
                str(tmp_path / "m1"),
                "--to",
                "megagpt",
            ]
        )
        == 0
    )
    assert convert.detect(str(tmp_path / "m1")) == "megagpt"
    assert_same(model_dir.load_tensors(str(tmp_path / "m1")), state)
    assert (tmp_path / "m1" / "tokenizer" / "tokenizer.json").is_file()
    assert (
        main(
            [
                "convert",
                "--input",
                str(tmp_path / "m1"),
                "--output",
                str(tmp_path / "hf"),
                "--to",
                "hf",
            ]
        )
        == 0
    )
    assert convert.detect(str(tmp_path / "hf")) == "hf"
    assert (
        main(
            [
                "convert",
                "--input",
                str(tmp_path / "hf"),
                "--output",
                str(tmp_path / "m2"),
                "--to",
                "megagpt",
            ]
        )
        == 0
    )
    assert_same(model_dir.load_tensors(str(tmp_path / "m2")), state)
    assert model_dir.read_config(str(tmp_path / "m2")).activation == "gelu_tanh"
    assert (
        main(
            [
                "convert",
                "--input",
                str(tmp_path / "m2"),
                "--output",
                str(tmp_path / "ms2"),
                "--to",
                "modelscope",
                "--tp",
                "4",
            ]
        )
        == 0
    )
    assert_same(modelscope.read(str(tmp_path / "ms2"))[1], state)


def test_cli_errors_are_one_line(tmp_path, capsys):
    from megagpt.checkpoint.convert import run

    (tmp_path / "junk").mkdir()
    rc = run(
        Namespace(
            input=str(tmp_path / "junk"), output=str(tmp_path / "o"), to="hf", tp=None, pp=None
        )
    )
    assert rc == 2 and "not a checkpoint megagpt knows" in capsys.readouterr().err
    rc = run(
        Namespace(
            input=str(tmp_path / "nope"), output=str(tmp_path / "o"), to="hf", tp=None, pp=None
        )
    )
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    rc = run(
        Namespace(input=str(tmp_path / "junk"), output=str(tmp_path / "o"), to="hf", tp=2, pp=None)
    )
    assert rc == 2 and "--to hf takes no --tp/--pp" in capsys.readouterr().err
