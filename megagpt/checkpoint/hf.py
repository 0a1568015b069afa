"""Hugging Face ``GPT2LMHeadModel`` directories in and out.

The megagpt GPT is GPT-2's architecture (pre-LN, learned positions, tied head, biases
everywhere), so the mapping is names plus two layout facts: GPT-2's ``Conv1D`` stores weights
transposed (``[in, out]``), and its fused ``c_attn`` orders output columns all-Q / all-K / all-V
where megagpt interleaves per head. Activation: ``gelu_new`` is the tanh GELU, ``gelu`` the erf
one. Written with safetensors only; transformers is not needed to export.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from megagpt.checkpoint.canonical import (
    POSITION,
    WORD,
    CheckpointError,
    check_heads,
    check_tensors,
    expected_shapes,
    qkv_blocks_to_interleaved,
    qkv_interleaved_to_blocks,
    torch_load_weights,
)
from megagpt.config.schema import ModelConfig

_ACT_OUT = {"gelu_tanh": "gelu_new", "gelu": "gelu"}
_ACT_IN = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
# canonical sub-name in a layer -> (GPT-2 sub-name, transposed Conv1D weight)
_LAYER = {
    "input_layernorm": ("ln_1", False),
    "attention.query_key_value": ("attn.c_attn", True),
    "attention.dense": ("attn.c_proj", True),
    "post_attention_layernorm": ("ln_2", False),
    "mlp.dense_h_to_4h": ("mlp.c_fc", True),
    "mlp.dense_4h_to_h": ("mlp.c_proj", True),
}
_IGNORED = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of older transformers


def is_hf_dir(path: str) -> bool:
    p = Path(path) / "config.json"
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text(encoding="utf-8")).get("model_type") == "gpt2"
    except (ValueError, OSError):
        return False


def _special_id(tokenizer: str | None, token: str) -> int | None:
    if not tokenizer or not tokenizer.endswith("tokenizer.json"):
        return None
    try:
        data = json.loads(Path(tokenizer).read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return None
    for added in data.get("added_tokens", []):
        if added.get("content") == token:
            return int(added["id"])
    vocab = data.get("model", {}).get("vocab", {})
    return int(vocab[token]) if isinstance(vocab, dict) and token in vocab else None


def _bos_eos(tokenizer: str | None) -> tuple[int | None, int | None]:
    """HF's (bos, eos) ids: the tokenizer's end of document (``<|endoftext|>``, BERT's
    ``[SEP]``, CPM's ``<eod>``) as eos, and as bos too unless the family starts every text
    with its own (BERT's ``[CLS]``). lm-eval's ``hf`` model, for one, predicts a text's first
    token from bos; a tokenizer megagpt cannot read leaves both unset."""
    if not tokenizer:
        return None, None
    from megagpt.data.tokenizer import build_tokenizer
    from megagpt.errors import MegagptError

    try:
        tok = build_tokenizer(tokenizer)
    except (MegagptError, OSError, ValueError):
        eod = _special_id(tokenizer, "<|endoftext|>")
        return eod, eod
    return tok.context_id, tok.eod


def config_json(cfg: ModelConfig, tokenizer: str | None = None) -> dict:
    """transformers GPT2Config fields for ``cfg``."""
    bos, eos = _bos_eos(tokenizer)
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.max_position_embeddings,
        "n_ctx": cfg.max_position_embeddings,
        "n_embd": cfg.hidden_size,
        "n_layer": cfg.num_layers,
        "n_head": cfg.num_heads,
        "n_inner": cfg.ffn,
        "activation_function": _ACT_OUT[cfg.activation],
        "layer_norm_epsilon": cfg.layernorm_eps,
        "initializer_range": cfg.init_std,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.attention_dropout,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": "float32",
    }


def _hf_name(name: str) -> tuple[str, bool]:
    """GPT-2 key of canonical ``name`` and whether the tensor is a transposed Conv1D weight."""
    if name == WORD:
        return "transformer.wte.weight", False
    if name == POSITION:
        return "transformer.wpe.weight", False
    if name.startswith("final_norm.final_layernorm."):
        return "transformer.ln_f." + name.rsplit(".", 1)[1], False
    _, i, rest = name.split(".", 2)
    module, leaf = rest.rsplit(".", 1)
    sub, conv = _LAYER[module]
    return f"transformer.h.{i}.{sub}.{leaf}", conv and leaf == "weight"


def to_hf(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """GPT-2 state dict (no ``lm_head.weight``: it is tied) from canonical tensors."""
    out = {}
    for name, t in tensors.items():
        if "attention.query_key_value" in name:
            t = qkv_interleaved_to_blocks(t, cfg.num_heads)
        key, conv = _hf_name(name)
        out[key] = (t.t() if conv else t).contiguous()
    return out


def write(
    directory: str,
    cfg: ModelConfig,
    tensors: dict[str, torch.Tensor],
    *,
    tokenizer: str | None = None,
) -> None:
    """Export a GPT2LMHeadModel directory: config.json, model.safetensors, tokenizer files."""
    check_tensors(tensors, cfg, "Hugging Face export")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file(to_hf(tensors, cfg), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(
        json.dumps(config_json(cfg, tokenizer), indent=2) + "\n", encoding="utf-8"
    )
    (out / "generation_config.json").write_text(
        json.dumps(
            {
                "bos_token_id": config_json(cfg, tokenizer)["bos_token_id"],
                "eos_token_id": config_json(cfg, tokenizer)["eos_token_id"],
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    if tokenizer:
        _write_tokenizer(out, Path(tokenizer), cfg)


def _write_tokenizer(out: Path, src: Path, cfg: ModelConfig) -> None:
    files = [src] if src.is_file() else [f for f in src.iterdir() if f.is_file()]
    for f in files:
        shutil.copy2(f, out / f.name)
    names = {f.name for f in files}
    if "tokenizer.json" in names:
        # The jieba pre-segmentation of the ModelScope 1.3B+ tokenizer lives in Python
        # (megagpt.data), not in tokenizer.json: the fast tokenizer gives the same ids on
        # pre-segmented text only.
        conf = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": cfg.max_position_embeddings,
        }
        eod = _special_id(str(out / "tokenizer.json"), "<|endoftext|>")
        if eod is not None:
            conf.update(eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    elif "vocab.txt" in names:
        # The family reads [CLS] text [SEP] (megagpt.data.tokenizer.BertTokenizer).
        conf = {
            "tokenizer_class": "BertTokenizer",
            "do_lower_case": True,
            "model_max_length": cfg.max_position_embeddings,
            "eos_token": "[SEP]",
            "bos_token": "[CLS]",
        }
    else:
        return
    (out / "tokenizer_config.json").write_text(json.dumps(conf, indent=2) + "\n", encoding="utf-8")


# -- import -------------------------------------------------------------------------------


def model_config(config: dict, source: str) -> ModelConfig:
    """ModelConfig from a GPT2Config dict; refuses variants megagpt does not compute."""
    act = config.get("activation_function", "gelu_new")
    if act not in _ACT_IN:
        raise CheckpointError(
            f"{source}: activation_function={act!r} is not supported "
            f"(supported: {', '.join(_ACT_IN)})"
        )
    for key, ok in (
        ("scale_attn_weights", True),
        ("scale_attn_by_inverse_layer_idx", False),
        ("add_cross_attention", False),
    ):
        if config.get(key, ok) != ok:
            raise CheckpointError(
                f"{source}: {key}={config[key]!r} is not the GPT-3 attention "
                f"megagpt implements (needs {ok})"
            )
    h = int(config.get("n_embd", 768))
    n_pos = int(config.get("n_positions", 1024))
    cfg = ModelConfig(
        num_layers=int(config.get("n_layer", 12)),
        num_heads=int(config.get("n_head", 12)),
        hidden_size=h,
        ffn_hidden_size=int(config.get("n_inner") or 4 * h),
        max_position_embeddings=n_pos,
        seq_length=min(2048, n_pos),
        vocab_size=int(config.get("vocab_size", 50257)),
        activation=_ACT_IN[act],
        layernorm_eps=float(config.get("layer_norm_epsilon", 1e-5)),
        dropout=float(config.get("resid_pdrop", 0.1)),
        attention_dropout=float(config.get("attn_pdrop", 0.1)),
        init_std=float(config.get("initializer_range", 0.02)),
    )
    check_heads(cfg, source)
    return cfg


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """One safetensors file; a truncated or foreign one raises CheckpointError naming it."""
    from megagpt.checkpoint.manifest import safetensors_problem

    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError carries no file name
        raise CheckpointError(
            safetensors_problem(path) or f"{path}: not a readable safetensors file ({e})"
        ) from None


def _load_weights(p: Path) -> dict[str, torch.Tensor]:
    """Weights of a Hugging Face directory: safetensors, else pytorch_model.bin read with
    ``torch.load(weights_only=True)`` (a file that needs full unpickling is refused)."""
    if (p / "model.safetensors").is_file():
        return _load_safetensors(p / "model.safetensors")
    index = p / "model.safetensors.index.json"
    if index.is_file():
        out: dict[str, torch.Tensor] = {}
        for f in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            out.update(_load_safetensors(p / f))
        return out
    if (p / "pytorch_model.bin").is_file():
        sd = torch_load_weights(p / "pytorch_model.bin")
        return {k: v for k, v in sd.items() if torch.is_tensor(v)}
    raise CheckpointError(
        f"{p}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin"
    )


def read_config(path: str) -> ModelConfig:
    """The ModelConfig of a GPT2LMHeadModel directory's config.json (no weights read)."""
    cfg_path = Path(path) / "config.json"
    try:
        return model_config(json.loads(cfg_path.read_text(encoding="utf-8")), str(cfg_path))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: cannot read ({e})") from None


def read(path: str) -> tuple[ModelConfig, dict[str, torch.Tensor], str | None]:
    """Import a GPT2LMHeadModel directory: (config, canonical tensors, tokenizer or None)."""
    p = Path(path)
    cfg = read_config(path)
    sd = _load_weights(p)
    source = str(p)
    if any(k.startswith("transformer.") for k in sd):
        sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    head = sd.pop("lm_head.weight", None)
    if head is not None and "wte.weight" in sd and not torch.equal(head, sd["wte.weight"]):
        raise CheckpointError(
            f"{source}: lm_head.weight differs from transformer.wte.weight; "
            "megagpt ties the output layer to the word embedding"
        )
    want = {_hf_name(n)[0][len("transformer.") :]: n for n in expected_shapes(cfg)}
    tensors = {}
    for key, t in sd.items():
        if key.endswith(_IGNORED):
            continue
        if key not in want:
            raise CheckpointError(
                f"{source}: unexpected tensor {key!r} with shape "
                f"{list(t.shape)} (not a GPT2LMHeadModel parameter of this "
                "config)"
            )
        name = want[key]
        if _hf_name(name)[1]:
            t = t.t()
        if "attention.query_key_value" in name:
            want_rows = 3 * cfg.hidden_size
            if t.shape[0] != want_rows:
                raise CheckpointError(
                    f"{source}: tensor {key!r} has shape {list(t.shape)}, "
                    f"the model expects {want_rows} QKV outputs"
                )
            t = qkv_blocks_to_interleaved(t, cfg.num_heads)
        tensors[name] = t.contiguous()
    check_tensors(tensors, cfg, source)
    tok = next((str(p / n) for n in ("tokenizer.json", "vocab.txt") if (p / n).is_file()), None)
    return cfg, tensors, tok
