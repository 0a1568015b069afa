"""Random canonical states for a small GPT, and hand-built ModelScope checkpoints of them."""

from __future__ import annotations

import json

import pytest
import torch

from megagpt.checkpoint.canonical import expected_shapes, qkv_interleaved_to_blocks
from megagpt.config.schema import ModelConfig


def small_config(**kw) -> ModelConfig:
    base = {
        "num_layers": 2,
        "num_heads": 4,
        "hidden_size": 32,
        "max_position_embeddings": 24,
        "seq_length": 24,
        "vocab_size": 96,
        "layernorm_eps": 1e-12,
        "dropout": 0.0,
        "attention_dropout": 0.0,
    }
    base.update(kw)
    return ModelConfig(**base)


def random_state(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every canonical tensor random (LayerNorms and biases too, so no mapping hides)."""
    g = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(shape, generator=g) * 0.2 for name, shape in expected_shapes(cfg).items()
    }


def ms_config_json(cfg: ModelConfig, family: str) -> dict:
    c = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "ffn_hidden_size": cfg.ffn,
        "max_position_embeddings": cfg.max_position_embeddings,
        "layernorm_epsilon": cfg.layernorm_eps,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "init_method_std": 0.02,
    }
    if family == "base":
        c["hidden_act"] = "gelu"
    return c


# Where the stand-in tokenizers below put their end-of-document token: not ModelScope's
# fallback eod_id 1, so that a config.json without the real id cannot pass for one with it.
BERT_SEP_ID = 3
JIEBA_EOD_ID = 7


def write_bert_vocab(path, size: int) -> None:
    """A BERT ``vocab.txt`` of ``size`` entries whose ``[SEP]`` (its eod) is BERT_SEP_ID."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"t{i}" for i in range(5, size)]
    path.write_text("\n".join(words) + "\n")


def write_jieba_tokenizer(path) -> None:
    """A loadable Hugging Face ``tokenizer.json`` (a word-level stand-in for jieba-BPE) with
    ``<sep>``, ``<pad>`` and ``<|endoftext|>`` at JIEBA_EOD_ID."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    vocab = {"[UNK]": 0, "<sep>": 1, "<pad>": 2, "<|endoftext|>": JIEBA_EOD_ID}
    vocab.update({f"t{i}": i for i in range(3, JIEBA_EOD_ID)})
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.save(str(path))


def build_base_dir(path, cfg: ModelConfig, state: dict, wrap: bool = False):
    """A ModelScope base/large directory, keys and QKV order as in reference §3.1."""
    sd = {
        "language_model.word_embeddings.weight": state["embedding.word.word_embeddings.weight"],
        "language_model.position_embeddings.weight": state[
            "embedding.position.position_embeddings.weight"
        ],
    }
    for name, t in state.items():
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            if "query_key_value" in rest:
                t = qkv_interleaved_to_blocks(t, cfg.num_heads)
            prefix = "model.language_model" if wrap else "language_model"
            sd[f"{prefix}.transformer.layers.{i}.{rest}"] = t.clone()
        elif name.startswith("final_norm."):
            sd["language_model.transformer." + name[len("final_norm.") :]] = t.clone()
    path.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": sd} if wrap else sd, path / "pytorch_model.bin")
    (path / "config.json").write_text(json.dumps(ms_config_json(cfg, "base")))
    (path / "configuration.json").write_text(
        json.dumps({"framework": "pytorch", "task": "text-generation"})
    )
    write_bert_vocab(path / "vocab.txt", cfg.vocab_size)
    return path


def build_distributed_dir(path, cfg: ModelConfig, state: dict, tp: int, wrap: bool = True):
    """A ModelScope 1.3B+ directory with ``tp`` shards, split by hand per reference §3.2."""
    split0 = (
        "word_embeddings.weight",
        "query_key_value.weight",
        "query_key_value.bias",
        "dense_h_to_4h.weight",
        "dense_h_to_4h.bias",
    )
    split1 = ("attention.dense.weight", "dense_4h_to_h.weight")
    shards = [{} for _ in range(tp)]
    for name, t in state.items():
        if name.startswith("embedding."):
            key = "language_model.embedding." + name.split(".", 2)[2]
        elif name.startswith("final_norm."):
            key = "language_model.encoder." + name[len("final_norm.") :]
        else:
            _, i, rest = name.split(".", 2)
            rest = rest.replace("attention.", "self_attention.")
            key = f"language_model.encoder.layers.{i}.{rest}"
        if name.endswith(split0):
            parts = t.chunk(tp, 0)
        elif name.endswith(split1):
            parts = t.chunk(tp, 1)
        else:
            parts = [t] * tp
        for r in range(tp):
            shards[r][key] = parts[r].clone()
    (path / "model").mkdir(parents=True, exist_ok=True)
    for r, sd in enumerate(shards):
        torch.save(
            {"module": sd} if wrap else sd, path / "model" / f"mp_rank_{r:02d}_model_states.pt"
        )
    (path / "config.json").write_text(json.dumps(ms_config_json(cfg, "distributed")))
    (path / "configuration.json").write_text(
        json.dumps(
            {
                "framework": "pytorch",
                "task": "text-generation",
                "megatron": {"world_size": tp, "tensor_model_parallel_size": tp},
            }
        )
    )
    write_jieba_tokenizer(path / "tokenizer.json")
    return shards


@pytest.fixture
def cfg():
    return small_config()


@pytest.fixture
def state(cfg):
    return random_state(cfg)
