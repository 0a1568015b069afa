"""A planted pickle payload never runs through the offline readers: ``megagpt convert``,
``finetune.init_from`` (and ``checkpoint.load`` of pretrained weights, the same reader), the
model directory loader of ``pipeline(...)`` / ``megagpt generate``. Each refusal names the file.
(Training resume and ``checkpoint.load`` of a training checkpoint:
tests/distributed/test_checkpoint_safety.py.)"""

from __future__ import annotations

import json
from argparse import Namespace

import pytest
import torch

from megagpt.checkpoint import convert, model_dir
from megagpt.checkpoint.canonical import WORD, CheckpointError
from megagpt.config import ConfigError
from megagpt.training.finetune import resolve_start
from tests.unit.checkpoint.conftest import ms_config_json
from tests.unit.checkpoint.payload import plant


def test_the_payload_is_live(tmp_path):
    """Control: the full unpickler (DeepSpeed's torch.load(weights_only=False)) runs it."""
    marker = tmp_path / "ran"
    plant(tmp_path / "p.pt", marker)
    torch.load(tmp_path / "p.pt", weights_only=False)
    assert marker.exists()


def _native_step(tmp_path, marker):
    """A step_* folder holding only DeepSpeed-style native files (pickles)."""
    step = tmp_path / "ckpts" / "step_0000003"
    plant(step / "mp_rank_00_model_states.pt", marker)
    plant(step / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    return step


def _ms_base(tmp_path, cfg, marker):
    d = tmp_path / "ms_base"
    plant(d / "pytorch_model.bin", marker)
    (d / "config.json").write_text(json.dumps(ms_config_json(cfg, "base")))
    return d


def _ms_distributed(tmp_path, cfg, marker):
    d = tmp_path / "ms_dist"
    plant(d / "model" / "mp_rank_00_model_states.pt", marker)
    (d / "config.json").write_text(json.dumps(ms_config_json(cfg, "distributed")))
    (d / "configuration.json").write_text(json.dumps({"framework": "pytorch"}))
    return d


def _hf(tmp_path, cfg, marker):
    d = tmp_path / "hf"
    plant(d / "pytorch_model.bin", marker)
    (d / "config.json").write_text(
        json.dumps(
            {
                "model_type": "gpt2",
                "architectures": ["GPT2LMHeadModel"],
                "n_layer": cfg.num_layers,
                "n_head": cfg.num_heads,
                "n_embd": cfg.hidden_size,
                "n_positions": 24,
                "vocab_size": cfg.vocab_size,
            }
        )
    )
    return d


SOURCES = {
    "native step folder": (_native_step, "mp_rank_00_model_states.pt"),
    "ModelScope base": (_ms_base, "pytorch_model.bin"),
    "ModelScope 1.3B+": (_ms_distributed, "mp_rank_00_model_states.pt"),
    "Hugging Face": (_hf, "pytorch_model.bin"),
}


def _build(kind, tmp_path, cfg, marker):
    build, name = SOURCES[kind]
    d = build(tmp_path, cfg, marker) if build is not _native_step else build(tmp_path, marker)
    return d, name


@pytest.mark.parametrize("kind", list(SOURCES))
def test_convert_refuses_and_names_the_file(tmp_path, cfg, kind, capsys):
    marker = tmp_path / "ran"
    src, name = _build(kind, tmp_path, cfg, marker)
    with pytest.raises(CheckpointError, match=name):
        convert.read(str(src))
    code = convert.run(
        Namespace(input=str(src), output=str(tmp_path / "out"), to="megagpt", tp=None, pp=None)
    )
    assert code == 2 and name in capsys.readouterr().err
    assert not marker.exists(), "the payload ran"


@pytest.mark.parametrize("kind", list(SOURCES))
def test_finetune_init_from_refuses_and_names_the_file(tmp_path, cfg, kind):
    marker = tmp_path / "ran"
    src, name = _build(kind, tmp_path, cfg, marker)
    with pytest.raises(ConfigError, match=name):
        resolve_start(str(src))
    assert not marker.exists(), "the payload ran"


def test_payload_beside_a_record_is_never_opened(tmp_path, cfg, state):
    """A valid record with a pickle planted next to it converts from the record alone."""
    marker = tmp_path / "ran"
    out = tmp_path / "ckpts"
    convert.write_training(str(out), convert.Source("megagpt", cfg, state), tp=1, pp=1)
    plant(out / "step_0000000" / "mp_rank_00_model_states.pt", marker)
    plant(out / "step_0000000" / "layout_free" / "extra.pt", marker)
    src = convert.read(str(out))
    assert torch.equal(src.tensors[WORD], state[WORD])
    assert resolve_start(str(out)).kind == "training"
    assert not marker.exists(), "the payload ran"


def test_model_directory_never_unpickles(tmp_path, cfg, state):
    """The loader behind pipeline(...) and `megagpt generate` reads safetensors only: a pickle
    in place of model.safetensors is refused by name, pickles beside it are ignored."""
    marker = tmp_path / "ran"
    good = tmp_path / "model"
    model_dir.save_tensors(str(good), state)
    model_dir.write_config(str(good), cfg)
    plant(good / "pytorch_model.bin", marker)
    plant(good / "model.pt", marker)
    assert sorted(model_dir.load_tensors(str(good))) == sorted(state)
    bad = tmp_path / "bad"
    model_dir.write_config(str(bad), cfg)
    plant(bad / "model.safetensors", marker)
    with pytest.raises(model_dir.ModelDirError, match="model.safetensors"):
        model_dir.load_tensors(str(bad))
    assert not marker.exists(), "the payload ran"


def test_every_loader_in_the_package_is_safe():
    """Guard: every torch.load call in megagpt/ passes weights_only=True, and DeepSpeed's loader
    (torch.load with weights_only=False) is called in one place only, Engine._load_native, which
    only the checkpoint format (megagpt/checkpoint/training.py) calls, behind
    checkpoint.trust_pickle."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[3] / "megagpt"
    loads, ds_loads = [], []
    for f in root.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            if node.func.attr == "load" and getattr(node.func.value, "id", "") == "torch":
                safe = any(
                    k.arg == "weights_only" and getattr(k.value, "value", None) is True
                    for k in node.keywords
                )
                loads.append((f"{f.name}:{node.lineno}", safe))
            if node.func.attr == "load_checkpoint":
                ds_loads.append(f.name)
    assert loads and all(safe for _, safe in loads), loads
    assert ds_loads == ["engine.py"]
    engine = (root / "engine" / "engine.py").read_text(encoding="utf-8")
    native = engine.index("def _load_native(")
    assert native < engine.index(".load_checkpoint(") < native + 500
    callers = sorted(
        f.name for f in root.rglob("*.py") if ".load_native(" in f.read_text(encoding="utf-8")
    )
    assert callers == ["training.py"], callers
    fmt = (root / "checkpoint" / "training.py").read_text(encoding="utf-8")
    gate = fmt.index("if native and trust and")
    assert gate < fmt.index(".load_native(") < gate + 200
