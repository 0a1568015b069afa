"""ModelScope Chinese GPT-3 checkpoints in and out (``shared/reference/modelscope-gpt3.md`` §3).

Two families are read:

* base / large: ``pytorch_model.bin``, keys ``language_model.transformer.*``, fused QKV rows as
  all-Q / all-K / all-V blocks, BERT ``vocab.txt``.
* 1.3B and up: ``model/mp_rank_XX_model_states.pt``, one file per TP rank (optionally wrapped in
  ``{"module": ...}``), keys ``language_model.encoder.*``, QKV rows interleaved per head, TP shards
  split by Megatron's column/row rules, jieba-BPE ``tokenizer.json``.

Writing produces the 1.3B+ layout with any number of TP shards (``configuration.json`` with a
``megatron`` key), which is the layout ModelScope's DistributedGPT3 loads. Canonical megagpt
tensors already use the per-head QKV order, so 1.3B+ import and export only rename and re-shard.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from megagpt.checkpoint.canonical import (
    POSITION,
    WORD,
    CheckpointError,
    check_heads,
    check_tensors,
    merge_tp,
    qkv_blocks_to_interleaved,
    split_for_tp,
    torch_load_weights,
)
from megagpt.config.schema import ModelConfig

BASE_FILE = "pytorch_model.bin"
SHARD = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
# canonical sub-name inside a layer -> ModelScope 1.3B+ sub-name (base/large: 'attention.')
_LAYER_KEYS = {
    "input_layernorm": "input_layernorm",
    "attention.query_key_value": "self_attention.query_key_value",
    "attention.dense": "self_attention.dense",
    "post_attention_layernorm": "post_attention_layernorm",
    "mlp.dense_h_to_4h": "mlp.dense_h_to_4h",
    "mlp.dense_4h_to_h": "mlp.dense_4h_to_h",
}


def is_modelscope_dir(path: str) -> bool:
    """True when ``path`` looks like a ModelScope GPT-3 directory (weights or its
    configuration.json)."""
    p = Path(path)
    return p.is_dir() and (
        (p / BASE_FILE).is_file() or bool(_shard_files(p)) or (p / "configuration.json").is_file()
    )


def family(path: str) -> str:
    """``"distributed"`` (1.3B+, model/mp_rank_XX files) or ``"base"`` (pytorch_model.bin)."""
    p = Path(path)
    if _shard_files(p):
        return "distributed"
    if (p / BASE_FILE).is_file():
        return "base"
    raise CheckpointError(
        f"{path}: no ModelScope weights: expected {BASE_FILE} (base/large) or "
        "model/mp_rank_00_model_states.pt (1.3B and up)"
    )


def _shard_files(p: Path) -> list[Path]:
    folder = p / "model"
    if not folder.is_dir():
        return []
    found = {
        int(m.group(1)): folder / f.name for f in folder.iterdir() if (m := SHARD.match(f.name))
    }
    return [found[r] for r in sorted(found)]


# -- config -------------------------------------------------------------------------------


def model_config(config: dict, fam: str, source: str) -> ModelConfig:
    """ModelConfig from a ModelScope GPT3Config dict (config.json)."""
    try:
        h = int(config["hidden_size"])
        layers = int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
    except KeyError as e:
        raise CheckpointError(f"{source}: config.json lacks {e.args[0]!r}") from None
    if config.get("apply_residual_connection_post_layernorm"):
        raise CheckpointError(
            f"{source}: apply_residual_connection_post_layernorm=true is not "
            "the GPT-3 block megagpt implements"
        )
    if fam == "distributed":
        # Megatron's fused bias-GELU is the tanh form; without fusion it calls the erf F.gelu.
        activation = "gelu_tanh" if config.get("bias_gelu_fusion", True) else "gelu"
    else:
        act = config.get("hidden_act", "gelu")
        activation = "gelu_tanh" if act in ("gelu_new", "gelu_pytorch_tanh") else "gelu"
    max_pos = int(config.get("max_position_embeddings", 2048))
    cfg = ModelConfig(
        num_layers=layers,
        num_heads=heads,
        hidden_size=h,
        ffn_hidden_size=int(
            config.get("ffn_hidden_size") or config.get("intermediate_size") or 4 * h
        ),
        max_position_embeddings=max_pos,
        seq_length=min(2048, max_pos),
        vocab_size=int(config.get("vocab_size", 25600)),
        activation=activation,
        layernorm_eps=float(config.get("layernorm_epsilon", 1e-12)),
        dropout=float(config.get("hidden_dropout", config.get("hidden_dropout_prob", 0.1))),
        attention_dropout=float(
            config.get("attention_dropout", config.get("attention_probs_dropout_prob", 0.1))
        ),
        init_std=float(config.get("init_method_std", config.get("initializer_range", 0.02))),
    )
    check_heads(cfg, source)
    return cfg


def config_json(cfg: ModelConfig) -> dict:
    """GPT3Config fields (ModelScope ``configuration.py``) for ``cfg``."""
    return {
        "model_type": "gpt3",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "ffn_hidden_size": cfg.ffn,
        "intermediate_size": cfg.ffn,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "kv_channels": cfg.head_dim,
        "hidden_act": "gelu",
        "bias_gelu_fusion": cfg.activation == "gelu_tanh",
        "max_position_embeddings": cfg.max_position_embeddings,
        "type_vocab_size": 2,
        "layernorm_epsilon": cfg.layernorm_eps,
        "hidden_dropout": cfg.dropout,
        "attention_dropout": cfg.attention_dropout,
        "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.attention_dropout,
        "init_method_std": cfg.init_std,
        "initializer_range": cfg.init_std,
        "apply_residual_connection_post_layernorm": False,
        "apply_query_key_layer_scaling": True,
        "attention_softmax_in_fp32": True,
        "fp16": False,
        "bf16": False,
    }


def configuration_json(tp: int) -> dict:
    """ModelScope's configuration.json for the 1.3B+ (DistributedGPT3) pipeline at ``tp``."""
    return {
        "framework": "pytorch",
        "task": "text-generation",
        "preprocessor": {"type": "text-gen-jieba-tokenizer"},
        "model": {"type": "gpt3"},
        "pipeline": {"type": "gpt3-generation"},
        "megatron": {
            "world_size": tp,
            "tensor_model_parallel_size": tp,
            "checkpoint_tensor_model_parallel_size": tp,
        },
    }


# -- keys ---------------------------------------------------------------------------------


def _flatten(sd: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """Flat ``a.b.c`` keys; Megatron's own checkpoints nest dicts per module."""
    out = {}
    for k, v in sd.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif torch.is_tensor(v):
            out[key] = v
    return out


def _unwrap(obj: object, source: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source}: expected a state dict, found {type(obj).__name__}")
    sd: dict = obj
    for wrapper in ("module", "state_dict", "model"):
        if wrapper in sd and isinstance(sd[wrapper], dict) and not torch.is_tensor(sd[wrapper]):
            sd = sd[wrapper]
            break
    flat = _flatten(sd)
    out = {}
    for k, v in flat.items():
        for prefix in ("module.", "model."):
            if k.startswith(prefix + "language_model."):
                k = k[len(prefix) :]
        out[k] = v
    return out


# ModelScope's own key names below are ModelScope's format, spelled out on purpose: where they
# coincide with megagpt's canonical names (``word_embeddings.weight``) that is Megatron heritage,
# not a shared constant; a renamed megagpt parameter must not rename ModelScope's keys.


def _to_canonical(key: str, fam: str) -> str | None:
    """Canonical name of a ModelScope key, None for keys that are not parameters of ours."""
    if fam == "distributed":
        emb, body, attn = "language_model.embedding.", "language_model.encoder.", "self_attention."
    else:
        emb, body, attn = "language_model.", "language_model.transformer.", "attention."
    if key == emb + "word_embeddings.weight":
        return WORD
    if key == emb + "position_embeddings.weight":
        return POSITION
    if not key.startswith(body):
        return None
    rest = key[len(body) :]
    if rest.startswith("final_layernorm."):
        return "final_norm." + rest
    m = re.match(r"^layers\.(\d+)\.(.+)$", rest)
    if not m:
        return None
    sub = m.group(2)
    if sub.startswith(attn):
        sub = "attention." + sub[len(attn) :]
    return f"layers.{m.group(1)}.{sub}"


def _from_canonical(name: str) -> str:
    """ModelScope 1.3B+ key of canonical tensor ``name``."""
    if name == WORD:
        return "language_model.embedding.word_embeddings.weight"
    if name == POSITION:
        return "language_model.embedding.position_embeddings.weight"
    if name.startswith("final_norm."):
        return "language_model.encoder." + name[len("final_norm.") :]
    m = _LAYER.match(name)
    if m is None:
        raise CheckpointError(
            f"ModelScope export: tensor {name!r} is not a canonical GPT parameter"
        )
    module, leaf = m.group(2).rsplit(".", 1)
    return f"language_model.encoder.layers.{m.group(1)}.{_LAYER_KEYS[module]}.{leaf}"


def _rename(sd: dict[str, torch.Tensor], fam: str, source: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, t in sd.items():
        name = _to_canonical(key, fam)
        if name is None:
            if key.endswith(("._extra_state", ".attention.bias", ".attention.masked_bias")):
                continue  # buffers, not parameters
            raise CheckpointError(
                f"{source}: unexpected key {key!r} with shape "
                f"{list(t.shape)} (not a ModelScope GPT-3 {fam} parameter)"
            )
        out[name] = t
    return out


# -- read ---------------------------------------------------------------------------------


def read(path: str) -> tuple[ModelConfig, dict[str, torch.Tensor], str | None]:
    """Import a ModelScope GPT-3 directory: (config, canonical tensors, tokenizer file or None).

    Tensors keep their stored dtype; every mismatch names the tensor and both shapes.
    """
    p = Path(path)
    fam = family(path)
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(
            f"{cfg_path} does not exist: a ModelScope GPT-3 directory carries its GPT3Config there"
        )
    try:
        cfg = model_config(json.loads(cfg_path.read_text(encoding="utf-8")), fam, str(cfg_path))
    except ValueError as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    if fam == "base":
        f = p / BASE_FILE
        tensors = _rename(_unwrap(torch_load_weights(f), str(f)), fam, str(f))
        for name in list(tensors):
            if name.endswith(
                ("attention.query_key_value.weight", "attention.query_key_value.bias")
            ):
                _check_qkv(name, tensors[name], cfg, str(f))
                tensors[name] = qkv_blocks_to_interleaved(tensors[name], cfg.num_heads)
        check_tensors(tensors, cfg, str(f))
    else:
        files = _shard_files(p)
        shards = [_rename(_unwrap(torch_load_weights(f), str(f)), fam, str(f)) for f in files]
        tp = len(shards)
        if tp > 1:
            check_heads(cfg, str(p / "model"), tp)
        for r, sd in enumerate(shards[1:], start=1):
            if set(sd) != set(shards[0]):
                diff = sorted(set(sd) ^ set(shards[0]))
                raise CheckpointError(
                    f"{files[r]}: tensor {diff[0]!r} is in one of "
                    f"{files[0].name} / {files[r].name} only"
                )
        tensors = {
            name: merge_tp(name, [sd[name] for sd in shards], str(p / "model"))
            for name in shards[0]
        }
        check_tensors(tensors, cfg, f"{p / 'model'} ({tp} TP shard{'s' if tp > 1 else ''})")
    return cfg, tensors, tokenizer_file(path)


def _check_qkv(name: str, t: torch.Tensor, cfg: ModelConfig, source: str) -> None:
    want = [3 * cfg.hidden_size] + ([cfg.hidden_size] if t.ndim == 2 else [])
    if list(t.shape) != want:
        raise CheckpointError(
            f"{source}: tensor {name!r} has shape {list(t.shape)}, the model "
            f"expects {want} ({cfg.num_heads} heads x 3 x {cfg.head_dim})"
        )


def tokenizer_file(path: str) -> str | None:
    for name in ("tokenizer.json", "vocab.txt"):
        if (Path(path) / name).is_file():
            return str(Path(path) / name)
    return None


# -- write --------------------------------------------------------------------------------


def write(
    directory: str,
    cfg: ModelConfig,
    tensors: dict[str, torch.Tensor],
    *,
    tp: int = 1,
    tokenizer: str | None = None,
    dtype: torch.dtype | None = None,
) -> list[str]:
    """Export canonical tensors as a ModelScope 1.3B+ directory with ``tp`` shards.

    Writes config.json, configuration.json, model/mp_rank_XX_model_states.pt (raw state dicts,
    as ModelScope's own fine-tuning saves them) and the tokenizer files. Returns the shard paths.
    The vocabulary must split evenly: ModelScope does not pad it.
    """
    check_tensors(tensors, cfg, "export")
    check_heads(cfg, "ModelScope export", tp)
    if cfg.vocab_size % tp:
        raise CheckpointError(
            f"ModelScope export: vocabulary {cfg.vocab_size} does not split "
            f"into {tp} TP shards (ModelScope does not pad it); tensor "
            f"{WORD!r} has shape {list(tensors[WORD].shape)}"
        )
    out = Path(directory)
    (out / "model").mkdir(parents=True, exist_ok=True)
    per_rank: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
    for name, t in tensors.items():
        t = t if dtype is None else t.to(dtype)
        for r, shard in enumerate(split_for_tp(name, t, tp, "ModelScope export")):
            # clone: torch.save of a view would store the whole unsplit storage
            per_rank[r][_from_canonical(name)] = shard.clone()
    paths = []
    for r, sd in enumerate(per_rank):
        f = out / "model" / f"mp_rank_{r:02d}_model_states.pt"
        torch.save(sd, f)
        paths.append(str(f))
    (out / "config.json").write_text(
        json.dumps(config_json(cfg), indent=2) + "\n", encoding="utf-8"
    )
    (out / "configuration.json").write_text(
        json.dumps(configuration_json(tp), indent=2) + "\n", encoding="utf-8"
    )
    if tokenizer:
        src = Path(tokenizer)
        for f in [src] if src.is_file() else [x for x in src.iterdir() if x.is_file()]:
            shutil.copy2(f, out / f.name)
    return paths
