"""ModelScope Chinese GPT-3 checkpoints in and out (``shared/reference/modelscope-gpt3.md`` §3).

Two families are read:

* base / large: ``pytorch_model.bin``, keys ``language_model.transformer.*``, fused QKV rows as
  all-Q / all-K / all-V blocks, BERT ``vocab.txt``.
* 1.3B and up: ``model/mp_rank_XX_model_states.pt``, one file per TP rank (optionally wrapped in
  ``{"module": ...}``), keys ``language_model.encoder.*``, QKV rows interleaved per head, TP shards
  split by Megatron's column/row rules, jieba-BPE ``tokenizer.json``.

Writing picks the layout from the tokenizer, because each of ModelScope's two GPT-3 pipelines
opens one tokenizer file by name (reference §0):

* a BERT ``vocab.txt``: the base/large layout ModelScope's single-GPU ``GPT3Model`` and the
  ``text-generation`` pipeline load (``pytorch_model.bin``, QKV rows permuted to blocks,
  ``configuration.json`` without a ``megatron`` key). One file only (TP > 1 is refused), and
  only a model whose GELU is the exact erf form and whose MLP is 4 x hidden: that model
  computes nothing else, so anything else would silently change the numerics.
* a jieba-BPE ``tokenizer.json``, or no tokenizer at all: the 1.3B+ layout DistributedGPT3 and
  the ``gpt3-generation`` pipeline load, with any number of TP shards (``configuration.json``
  with a ``megatron`` key). Canonical megagpt tensors already use the per-head QKV order, so
  1.3B+ import and export only rename and re-shard. Without a tokenizer the directory is written
  and :class:`Export` says what it lacks.
* a SentencePiece ``*.model``: refused; neither pipeline can load it.

``config.json`` carries the tokenizer's end-of-document id as ``eod_id`` (ModelScope stops
generating there; without it ModelScope falls back to id 1) and megagpt's generation defaults.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
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
    qkv_interleaved_to_blocks,
    split_for_tp,
    torch_load_weights,
)
from megagpt.config.schema import ModelConfig
from megagpt.data.tokenizer import MODELSCOPE_JIEBA_PREPROCESSOR
from megagpt.inference.sampling import GenerationDefaults

BASE_FILE = "pytorch_model.bin"
SHARD = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
# The modules of a canonical decoder layer; ModelScope names them alike, except that the
# 1.3B+ family calls ``attention`` ``self_attention`` (``_PREFIXES``).
_LAYER_MODULES = (
    "input_layernorm",
    "attention.query_key_value",
    "attention.dense",
    "post_attention_layernorm",
    "mlp.dense_h_to_4h",
    "mlp.dense_4h_to_h",
)


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
        # GPT3Model's MLP calls the exact erf F.gelu whatever hidden_act says (reference §1.2).
        activation = "gelu"
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


def config_json(
    cfg: ModelConfig, eod_id: int | None = None, generation: GenerationDefaults | None = None
) -> dict:
    """GPT3Config fields (ModelScope ``configuration.py``) for ``cfg``.

    ``eod_id`` is the token that ends generation in both ModelScope models (omitted when None:
    ModelScope then uses id 1). The sampling fields are the model's decoding defaults
    (``generation``; the original's, reference §4.2, when None).
    """
    out = {
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
        **(generation or GenerationDefaults()).as_config(),
    }
    if eod_id is not None:
        out["eod_id"] = eod_id
    return out


def configuration_json(tp: int) -> dict:
    """ModelScope's configuration.json for the 1.3B+ (DistributedGPT3) pipeline at ``tp``."""
    return {
        "framework": "pytorch",
        "task": "text-generation",
        "preprocessor": {"type": MODELSCOPE_JIEBA_PREPROCESSOR},
        "model": {"type": "gpt3"},
        "pipeline": {"type": "gpt3-generation"},
        "megatron": {
            "world_size": tp,
            "tensor_model_parallel_size": tp,
            "checkpoint_tensor_model_parallel_size": tp,
        },
    }


def base_configuration_json() -> dict:
    """ModelScope's configuration.json for the base/large (GPT3Model) pipeline: no ``megatron``
    key, which is what makes ModelScope build the single-GPU GPT3Model and a BERT tokenizer."""
    return {
        "framework": "pytorch",
        "task": "text-generation",
        "preprocessor": {"type": "text-gen-tokenizer"},
        "model": {"type": "gpt3"},
        "pipeline": {"type": "text-generation"},
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


# (embeddings, decoder body, attention module) key prefixes of each family (reference §3)
_PREFIXES = {
    "base": ("language_model.", "language_model.transformer.", "attention."),
    "distributed": ("language_model.embedding.", "language_model.encoder.", "self_attention."),
}


def _to_canonical(key: str, fam: str) -> str | None:
    """Canonical name of a ModelScope key, None for keys that are not parameters of ours."""
    emb, body, attn = _PREFIXES[fam]
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


def _from_canonical(name: str, fam: str = "distributed") -> str:
    """ModelScope key of canonical tensor ``name`` in family ``fam`` (base or distributed)."""
    emb, body, attn = _PREFIXES[fam]
    if name == WORD:
        return emb + "word_embeddings.weight"
    if name == POSITION:
        return emb + "position_embeddings.weight"
    if name.startswith("final_norm."):
        return body + name[len("final_norm.") :]
    m = _LAYER.match(name)
    module, _, leaf = m.group(2).rpartition(".") if m else ("", "", "")
    if m is None or module not in _LAYER_MODULES:
        raise CheckpointError(
            f"ModelScope export: tensor {name!r} is not a canonical GPT parameter"
        )
    if module.startswith("attention."):
        module = attn + module[len("attention.") :]
    return f"{body}layers.{m.group(1)}.{module}.{leaf}"


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
    cfg = read_config(path)
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


def read_config(path: str) -> ModelConfig:
    """The ModelConfig of a ModelScope GPT-3 directory's config.json (no weights read)."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(
            f"{cfg_path} does not exist: a ModelScope GPT-3 directory carries its GPT3Config there"
        )
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    return model_config(config, family(path), str(cfg_path))


def read_generation(path: str) -> GenerationDefaults:
    """The decoding defaults of a ModelScope directory's config.json (its ``top_k``,
    ``top_p``, ``temperature``, ``tokens_to_generate``; reference §4.2), where it has them."""
    cfg_path = Path(path) / "config.json"
    config = json.loads(cfg_path.read_text(encoding="utf-8"))
    return GenerationDefaults.from_config(config, str(cfg_path), read_config(path).vocab_size)


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

# The file each ModelScope pipeline opens in the model directory, by tokenizer family.
_TOKENIZER_FILE = {"bert": "vocab.txt", "jieba-bpe": "tokenizer.json"}
_LAYOUT_OF = {"bert": "base", "jieba-bpe": "distributed"}


@dataclass(frozen=True)
class Export:
    """What :func:`write` wrote: ``layout`` is ``"base"`` (GPT3Model, ``pytorch_model.bin``) or
    ``"distributed"`` (1.3B+, ``model/mp_rank_XX_model_states.pt``), ``files`` the weight files
    (one per TP rank), ``warnings`` what the directory lacks for ModelScope to use it fully."""

    layout: str
    files: list[str]
    warnings: list[str] = field(default_factory=list)

    def describe(self, where: str) -> str:
        """One line naming the layout written at ``where``, then any warnings."""
        if self.layout == "base":
            text = f"ModelScope base/large layout {where} (pytorch_model.bin, BERT vocab.txt)"
        else:
            n = len(self.files)
            text = f"ModelScope 1.3B+ layout {where} ({n} shard{'s' if n > 1 else ''})"
        return text + "".join(f"; warning: {w}" for w in self.warnings)


@dataclass(frozen=True)
class _Tok:
    """The tokenizer being exported: its family (megagpt's name) and end-of-document id."""

    source: Path  # the file or folder given
    family: str
    eod: int | None


def _read_tokenizer(tokenizer: str) -> _Tok:
    """Load ``tokenizer`` (a file or a folder) with megagpt's own detection; CheckpointError
    when it cannot be read: neither the layout nor ``eod_id`` can be chosen without it."""
    from megagpt.data.tokenizer import build_tokenizer
    from megagpt.errors import MegagptError

    try:
        tok = build_tokenizer(tokenizer)
    except (MegagptError, OSError, ValueError) as e:
        raise CheckpointError(
            f"ModelScope export: cannot read the model's tokenizer {tokenizer} ({e}); the "
            "layout and config.json's eod_id are chosen from it"
        ) from None
    return _Tok(Path(tokenizer), tok.family, tok.eod)


def _check_base(cfg: ModelConfig, tp: int) -> None:
    """CheckpointError unless the single-GPU GPT3Model computes exactly what ``cfg`` does."""
    why = "the tokenizer is a BERT vocab.txt, so the output is ModelScope's base/large GPT3Model"
    if tp != 1:
        raise CheckpointError(
            f"ModelScope export: --tp {tp}: {why}, a single-GPU model with one "
            "pytorch_model.bin and no tensor-parallel shards; use --tp 1 (or leave it out)"
        )
    if cfg.activation != "gelu":
        raise CheckpointError(
            f"ModelScope export: model.activation is {cfg.activation!r}, but {why}, which "
            "always computes the exact erf GELU ('gelu'); exporting would change the model's "
            "outputs. Keep it as a megagpt or Hugging Face directory (--to megagpt / --to hf)"
        )
    if cfg.ffn != 4 * cfg.hidden_size:
        raise CheckpointError(
            f"ModelScope export: model.ffn_hidden_size is {cfg.ffn}, but {why}, whose MLP is "
            f"always 4 x hidden_size = {4 * cfg.hidden_size}"
        )


def _base_state(
    tensors: dict[str, torch.Tensor], cfg: ModelConfig, dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """The GPT3Model state dict: base key names, QKV rows permuted to all-Q/all-K/all-V."""
    sd = {}
    for name, t in tensors.items():
        t = t if dtype is None else t.to(dtype)
        if name.endswith(("attention.query_key_value.weight", "attention.query_key_value.bias")):
            t = qkv_interleaved_to_blocks(t, cfg.num_heads)
        # clone: torch.save of a view would store the whole storage it views
        sd[_from_canonical(name, "base")] = t.clone()
    return sd


def _write_distributed(
    out: Path,
    cfg: ModelConfig,
    tensors: dict[str, torch.Tensor],
    tp: int,
    dtype: torch.dtype | None,
) -> list[str]:
    check_heads(cfg, "ModelScope export", tp)
    if cfg.vocab_size % tp:
        raise CheckpointError(
            f"ModelScope export: vocabulary {cfg.vocab_size} does not split "
            f"into {tp} TP shards (ModelScope does not pad it); tensor "
            f"{WORD!r} has shape {list(tensors[WORD].shape)}"
        )
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
    return paths


def _copy_tokenizer(out: Path, tok: _Tok) -> None:
    """A folder's files as they are; one file under the name ModelScope opens (``x.txt`` as
    ``vocab.txt``), with megagpt's settings file beside it when there is one."""
    from megagpt.data.tokenizer import SIDECAR_NAME

    src = tok.source
    if src.is_dir():
        for f in src.iterdir():
            if f.is_file():
                shutil.copy2(f, out / f.name)
        return
    shutil.copy2(src, out / _TOKENIZER_FILE[tok.family])
    sidecar = src.parent / SIDECAR_NAME
    if sidecar.is_file() and src.name != SIDECAR_NAME:
        shutil.copy2(sidecar, out / SIDECAR_NAME)


def write(
    directory: str,
    cfg: ModelConfig,
    tensors: dict[str, torch.Tensor],
    *,
    tp: int = 1,
    tokenizer: str | None = None,
    dtype: torch.dtype | None = None,
    generation: GenerationDefaults | None = None,
) -> Export:
    """Export canonical tensors as a ModelScope GPT-3 directory in the layout the tokenizer
    calls for (module docstring): a BERT ``vocab.txt`` gives the base/large layout
    (pytorch_model.bin; ``tp`` must be 1), a jieba-BPE ``tokenizer.json`` or none the 1.3B+
    layout with ``tp`` shards (raw state dicts, as ModelScope's own fine-tuning saves them; the
    vocabulary must split evenly, ModelScope does not pad it). Also writes config.json (with the
    tokenizer's ``eod_id`` and the ``generation`` defaults), configuration.json and the
    tokenizer files.

    Everything is checked before the first file is written; CheckpointError names what does not
    fit (a SentencePiece tokenizer, ``--tp`` or ``model.activation`` for the base layout).
    Returns the :class:`Export` (layout, weight files, warnings).
    """
    check_tensors(tensors, cfg, "export")
    tok = _read_tokenizer(tokenizer) if tokenizer else None
    if tok is not None and tok.family not in _LAYOUT_OF:
        raise CheckpointError(
            f"ModelScope export: the tokenizer {tokenizer} is a SentencePiece model (megagpt "
            f"family {tok.family!r}), which neither ModelScope GPT-3 pipeline can load: the "
            "1.3B+ pipeline (gpt3-generation) needs a jieba-BPE tokenizer.json, the base/large "
            "pipeline (text-generation) a BERT vocab.txt. Keep this model as a megagpt "
            "directory (--to megagpt)"
        )
    layout = _LAYOUT_OF[tok.family] if tok is not None else "distributed"
    warnings = []
    if tok is None:
        warnings.append(
            "the model has no tokenizer, so the directory lacks the tokenizer.json "
            "ModelScope's gpt3-generation pipeline needs, and config.json has no eod_id "
            "(ModelScope then stops at id 1): add both before loading it in ModelScope"
        )
    elif tok.eod is None:
        warnings.append(
            f"the tokenizer {tokenizer} has no end-of-document token, so config.json has no "
            "eod_id (ModelScope then stops generating at id 1)"
        )
    out = Path(directory)
    if layout == "base":
        _check_base(cfg, tp)
        out.mkdir(parents=True, exist_ok=True)
        torch.save(_base_state(tensors, cfg, dtype), out / BASE_FILE)
        files = [str(out / BASE_FILE)]
        configuration = base_configuration_json()
    else:
        files = _write_distributed(out, cfg, tensors, tp, dtype)
        configuration = configuration_json(tp)
    (out / "config.json").write_text(
        json.dumps(config_json(cfg, tok.eod if tok else None, generation), indent=2) + "\n",
        encoding="utf-8",
    )
    (out / "configuration.json").write_text(
        json.dumps(configuration, indent=2) + "\n", encoding="utf-8"
    )
    if tok is not None:
        _copy_tokenizer(out, tok)
    return Export(layout, files, warnings)
