"""Hugging Face GPT-2 directories: export loads in transformers, import of a transformers-made
model, refusals. (Logits parity with megagpt: tests/distributed/test_convert.py.)"""

from __future__ import annotations

import json

import pytest
import torch

from megagpt.checkpoint import hf
from megagpt.checkpoint.canonical import CheckpointError, qkv_interleaved_to_blocks
from tests.conftest import BERT_VOCAB, shared_path
from tests.unit.checkpoint.conftest import random_state, small_config


def test_export_layout_in_transformers(tmp_path, cfg, state):
    from transformers import GPT2LMHeadModel

    hf.write(str(tmp_path / "hf"), cfg, state)
    model = GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf"))
    sd = model.state_dict()
    qkv = state["layers.1.attention.query_key_value.weight"]
    assert torch.equal(
        sd["transformer.h.1.attn.c_attn.weight"], qkv_interleaved_to_blocks(qkv, cfg.num_heads).t()
    )  # Conv1D [in, out]
    assert torch.equal(
        sd["transformer.h.0.mlp.c_fc.weight"], state["layers.0.mlp.dense_h_to_4h.weight"].t()
    )
    assert torch.equal(sd["lm_head.weight"], state["embedding.word.word_embeddings.weight"])


def test_import_of_a_transformers_model(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    conf = GPT2Config(
        vocab_size=80,
        n_positions=16,
        n_embd=24,
        n_layer=2,
        n_head=3,
        activation_function="gelu_new",
        layer_norm_epsilon=1e-5,
    )
    model = GPT2LMHeadModel(conf)
    model.save_pretrained(str(tmp_path / "orig"))
    cfg, tensors, _ = hf.read(str(tmp_path / "orig"))
    assert (cfg.num_layers, cfg.num_heads, cfg.hidden_size, cfg.vocab_size) == (2, 3, 24, 80)
    assert cfg.activation == "gelu_tanh"
    hf.write(str(tmp_path / "again"), cfg, tensors)
    again = GPT2LMHeadModel.from_pretrained(str(tmp_path / "again")).state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(again[k], v), k


def test_refusals(tmp_path, cfg, state):
    hf.write(str(tmp_path / "hf"), cfg, state)
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(
        json.dumps({**conf, "activation_function": "relu"})
    )
    with pytest.raises(CheckpointError, match="activation_function='relu' is not supported"):
        hf.read(str(tmp_path / "hf"))
    (tmp_path / "hf" / "config.json").write_text(json.dumps(conf))
    from safetensors.torch import load_file, save_file

    sd = load_file(str(tmp_path / "hf" / "model.safetensors"))
    sd["lm_head.weight"] = sd["transformer.wte.weight"] + 1
    save_file(sd, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="lm_head.weight differs"):
        hf.read(str(tmp_path / "hf"))
    del sd["lm_head.weight"]
    key = "transformer.h.0.attn.c_attn.weight"
    sd[key] = sd[key][:, :90].clone()
    save_file(sd, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(
        CheckpointError,
        match=r"c_attn.weight' has shape \[90, 32\], the model "
        r"expects 96 QKV outputs",
    ):
        hf.read(str(tmp_path / "hf"))


def test_export_names_the_end_of_document_token_of_a_bert_vocabulary(tmp_path):
    """HF's eos is the tokenizer's end-of-document id whatever its family (here BERT's [SEP]);
    it was null, and lm-eval's `hf` model then fails to score continuations. BOS is the token
    the family's texts start with: BERT's [CLS] (ModelScope's base/large read [CLS] text)."""
    bert_vocab = shared_path(BERT_VOCAB)  # skips without ../shared/data
    from transformers import AutoTokenizer, GPT2LMHeadModel

    vocab = tmp_path / "tok"
    vocab.mkdir()
    (vocab / "vocab.txt").write_bytes(bert_vocab.read_bytes())
    big = small_config(vocab_size=21128)
    hf.write(str(tmp_path / "hf"), big, random_state(big), tokenizer=str(vocab))
    tokens = bert_vocab.read_text(encoding="utf-8").splitlines()
    sep, cls = tokens.index("[SEP]"), tokens.index("[CLS]")
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (conf["eos_token_id"], conf["bos_token_id"]) == (sep, cls)
    model_conf = GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).config
    assert (model_conf.eos_token_id, model_conf.bos_token_id) == (sep, cls)
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert (hf_tok.eos_token_id, hf_tok.bos_token_id) == (sep, cls)
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert (generation["eos_token_id"], generation["bos_token_id"]) == (sep, cls)
