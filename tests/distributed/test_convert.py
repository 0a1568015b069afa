"""Conversions against the real model: Hugging Face logits parity, ModelScope base/large logits
parity, ModelScope shards equal to megatron-core's TP shards, continued pretraining from a
ModelScope checkpoint at any TP/PP."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from megagpt.checkpoint import hf, model_dir, modelscope
from megagpt.config.sizes import from_name
from tests.distributed.conftest import tiny_recipe
from tests.distributed.launcher import run_distributed
from tests.unit.checkpoint.conftest import random_state, small_config, write_bert_vocab

TOKENS = [[5, 17, 90, 2, 9, 41, 7, 8, 63, 0, 11, 95], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]


def write_model_dir(path, cfg, state):
    model_dir.save_tensors(str(path), state)
    model_dir.write_config(str(path), cfg)
    return path


@pytest.mark.parametrize("activation,eps,tp", [("gelu_tanh", 1e-5, 2), ("gelu", 1e-12, 1)])
def test_hf_export_logits_equal_megagpt(tmp_path, activation, eps, tp):
    from transformers import GPT2LMHeadModel

    cfg = small_config(activation=activation, layernorm_eps=eps)  # vocab 96: padded at any TP
    state = random_state(cfg, seed=3)
    write_model_dir(tmp_path / "m", cfg, state)
    hf.write(str(tmp_path / "hf"), cfg, state)
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert conf["activation_function"] == {"gelu_tanh": "gelu_new", "gelu": "gelu"}[activation]
    assert conf["layer_norm_epsilon"] == eps and conf["n_positions"] == 24
    model = GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # tied
    with torch.no_grad():
        want = model(torch.tensor(TOKENS)).logits  # [b, s, V]
    got = torch.tensor(
        run_distributed(
            "tests.distributed.workers:logits_of_model_dir",
            tp,
            directory=str(tmp_path / "m"),
            tokens=TOKENS,
            tp=tp,
        )[0]
    ).transpose(0, 1)  # [s, b, V] -> [b, s, V]
    assert got.shape == want.shape == (2, 12, 96)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()
    # and back: the HF import gives the same tensors
    _, back, _ = hf.read(str(tmp_path / "hf"))
    for k in state:
        assert torch.equal(back[k], state[k]), k


def gpt3model_logits(directory, tokens: list[list[int]]) -> torch.Tensor:
    """ModelScope's base/large GPT3Model forward (reference §1.2, §3.1), written out in plain
    torch from an exported directory's config.json and pytorch_model.bin alone: fused QKV
    split into all-Q / all-K / all-V thirds, score*mask - 10000*(1-mask), erf GELU, tied head."""
    conf = json.loads((directory / "config.json").read_text())
    sd = torch.load(directory / "pytorch_model.bin", weights_only=True)
    h, nh, eps = conf["hidden_size"], conf["num_attention_heads"], conf["layernorm_epsilon"]
    hd = h // nh
    x = torch.tensor(tokens)  # [b, s]
    b, s = x.shape
    mask = torch.tril(torch.ones(s, s))

    def ln(t, key):
        return F.layer_norm(t, (h,), sd[key + ".weight"], sd[key + ".bias"], eps)

    def linear(t, key):
        return F.linear(t, sd[key + ".weight"], sd[key + ".bias"])

    lm = "language_model."
    hidden = sd[lm + "word_embeddings.weight"][x] + sd[lm + "position_embeddings.weight"][:s]
    for i in range(conf["num_hidden_layers"]):
        p = f"{lm}transformer.layers.{i}."
        qkv = linear(ln(hidden, p + "input_layernorm"), p + "attention.query_key_value")
        # [b, s, 3h] -> three [b, s, h] -> [b, nh, s, hd]
        q, k, v = (t.view(b, s, nh, hd).transpose(1, 2) for t in qkv.split(h, dim=-1))
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)  # [b, nh, s, s]
        scores = scores * mask - 10000.0 * (1.0 - mask)
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, h)  # -> [b, s, h]
        hidden = hidden + linear(context, p + "attention.dense")
        inner = F.gelu(linear(ln(hidden, p + "post_attention_layernorm"), p + "mlp.dense_h_to_4h"))
        hidden = hidden + linear(inner, p + "mlp.dense_4h_to_h")
    hidden = ln(hidden, lm + "transformer.final_layernorm")
    return hidden @ sd[lm + "word_embeddings.weight"].t()  # [b, s, V]


def test_modelscope_base_export_logits_equal_megagpt(tmp_path):
    """A model with a BERT vocab.txt exported --to modelscope is the base/large layout, and
    GPT3Model's computation on it gives megagpt's logits."""
    cfg = small_config(activation="gelu")
    state = random_state(cfg, seed=6)
    write_model_dir(tmp_path / "m", cfg, state)
    write_bert_vocab(tmp_path / "vocab.txt", cfg.vocab_size)
    written = modelscope.write(
        str(tmp_path / "ms"), cfg, state, tokenizer=str(tmp_path / "vocab.txt")
    )
    assert written.layout == "base"
    want = gpt3model_logits(tmp_path / "ms", TOKENS)
    got = torch.tensor(
        run_distributed(
            "tests.distributed.workers:logits_of_model_dir",
            1,
            directory=str(tmp_path / "m"),
            tokens=TOKENS,
        )[0]
    ).transpose(0, 1)  # [s, b, V] -> [b, s, V]
    assert got.shape == want.shape == (2, 12, 96)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()


def test_modelscope_shards_are_megatron_tp_shards(tmp_path):
    """Exported ModelScope shard r holds exactly what megagpt's TP rank r holds."""
    cfg = small_config(vocab_size=256)  # a multiple of 128 x 2: no padding differences
    state = random_state(cfg, seed=4)
    write_model_dir(tmp_path / "m", cfg, state)
    modelscope.write(str(tmp_path / "ms"), cfg, state, tp=2)
    ranks = run_distributed(
        "tests.distributed.ckpt_workers:local_shards_of_model_dir",
        2,
        directory=str(tmp_path / "m"),
        tp=2,
    )
    for r, local in enumerate(ranks):
        shard = torch.load(
            tmp_path / "ms" / "model" / f"mp_rank_{r:02d}_model_states.pt", weights_only=True
        )
        for name, value in local.items():
            key = modelscope._from_canonical(name)
            assert torch.equal(torch.tensor(value), shard[key]), f"rank {r} {name}"


def test_continued_pretraining_from_modelscope_at_any_layout(tiny_corpus, tmp_path):
    """checkpoint.load = a 2-shard ModelScope dir: TP=1 and TP=2 x PP=2 train identically from
    its weights."""
    m = from_name("gpt3-tiny")
    cfg = small_config(
        num_layers=m.num_layers,
        num_heads=m.num_heads,
        hidden_size=m.hidden_size,
        max_position_embeddings=m.max_position_embeddings,
        seq_length=m.seq_length,
        vocab_size=1024,
    )
    state = random_state(cfg, seed=5)
    state["embedding.word.word_embeddings.weight"] *= 10  # sharp logits: far from ln(vocab)
    modelscope.write(str(tmp_path / "ms"), cfg, state, tp=2)
    losses = []
    for world, layout in ((1, []), (4, ["parallel.tensor=2", "parallel.pipeline=2"])):
        run = tmp_path / f"run{world}"
        recipe = tiny_recipe(tmp_path / f"r{world}.yaml", tiny_corpus, run)
        res = run_distributed(
            "tests.distributed.workers:train_run",
            world,
            config=str(recipe),
            overrides=layout
            + ["train.steps=2", "model.layernorm_eps=1e-12", f"checkpoint.load={tmp_path / 'ms'}"],
        )
        assert res[0]["step"] == 2
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        losses.append([r["loss"] for r in recs if "loss" in r])
    for a, b in zip(*losses):
        assert a == pytest.approx(b, rel=1e-5)
    # the ModelScope weights were used: a fresh init starts at ~ln(vocab)
    assert abs(losses[0][0] - math.log(1024)) > 0.5, losses[0]
