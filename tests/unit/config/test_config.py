"""The config surface: registry, recipes, strict YAML, overrides, validation before any group."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megagpt.config import ConfigError, from_name, get_size, load_config, parameter_count, validate
from megagpt.config.docs import render_markdown
from megagpt.config.sizes import names

ROOT = Path(__file__).resolve().parents[3]

# The size table of the ModelScope GPT-3 model cards (`../shared/reference/modelscope-gpt3.md`
# §1.1): layers, heads, d_model, peak LR, batch in millions of tokens.
TABLE = {
    "gpt3-base": (12, 12, 768, 6.0e-4, 0.5),
    "gpt3-large": (24, 16, 1024, 3.0e-4, 0.5),
    "gpt3-1.3b": (24, 32, 2048, 2.0e-4, 2),
    "gpt3-2.7b": (32, 32, 2560, 1.6e-4, 2),
    "gpt3-13b": (40, 40, 5120, 1.0e-4, 6),
    "gpt3-30b": (48, 56, 7168, 1.0e-4, 6),
    "gpt3-175b": (96, 96, 12288, 1.2e-4, 6),
}


@pytest.mark.parametrize("name", list(TABLE))
def test_registry_matches_the_size_table(name):
    layers, heads, d, lr, mtokens = TABLE[name]
    s = get_size(name)
    m = s.model_config()
    assert (m.num_layers, m.num_heads, m.hidden_size, s.lr) == (layers, heads, d, lr)
    assert m.ffn == 4 * d and m.max_position_embeddings == 2048 and m.vocab_size == 25600
    assert s.batch_tokens == int(mtokens * 2**20)
    assert s.global_batch_sequences * 2048 == s.batch_tokens
    assert m.activation == ("gelu" if name in ("gpt3-base", "gpt3-large") else "gelu_tanh")


def test_parameter_counts_match_documented_sizes():
    # 25,600 vocab, tied embeddings, 2048 positions.
    billions = {n: parameter_count(from_name(n)) / 1e9 for n in TABLE}
    assert billions["gpt3-base"] == pytest.approx(0.106, abs=0.001)
    assert billions["gpt3-large"] == pytest.approx(0.331, abs=0.001)
    assert billions["gpt3-1.3b"] == pytest.approx(1.265, abs=0.001)
    assert billions["gpt3-2.7b"] == pytest.approx(2.588, abs=0.001)
    assert billions["gpt3-13b"] == pytest.approx(12.727, abs=0.001)
    assert billions["gpt3-30b"] == pytest.approx(29.798, abs=0.001)
    assert billions["gpt3-175b"] == pytest.approx(174.3, abs=0.05)
    # The hand formula for base: 25600*768 + 2048*768 + 12*(12*768^2 + 13*768) + 2*768.
    assert parameter_count(from_name("base")) == (
        25600 * 768 + 2048 * 768 + 12 * (12 * 768**2 + 13 * 768) + 2 * 768
    )


def test_unknown_size_lists_known_ones():
    with pytest.raises(KeyError, match="gpt3-1.3b"):
        get_size("gpt3-7b")


@pytest.mark.parametrize(
    "path", sorted(glob.glob(str(ROOT / "configs" / "**" / "*.yaml"), recursive=True))
)
def test_every_recipe_loads_and_validates(path):
    cfg = load_config(path)
    # A recipe must fit at least one world size: the smallest its TP x PP allows.
    world = cfg.parallel.tensor * cfg.parallel.pipeline
    # Fine-tuning recipes read finetune.train_file, not indexed datasets.
    validate(cfg, world, cuda=True, need_data="finetune" not in Path(path).parts)


def test_pretrain_recipes_follow_the_gpt3_recipe():
    for key, size in [("base", "gpt3-base"), ("1.3b", "gpt3-1.3b"), ("175b", "gpt3-175b")]:
        cfg = load_config(ROOT / "configs" / "pretrain" / f"{key}.yaml")
        s = get_size(size)
        assert cfg.optim.lr == s.lr
        assert cfg.train.global_batch_size * cfg.model.seq_length == s.batch_tokens
        o = cfg.optim
        assert (o.beta1, o.beta2, o.eps, o.weight_decay, o.clip_grad) == (0.9, 0.95, 1e-8, 0.1, 1.0)
        assert (o.warmup_tokens, o.decay_tokens, o.min_lr_ratio) == (375e6, 260e9, 0.1)


def _write(tmp_path, text: str) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def test_unknown_key_names_file_line_and_suggests(tmp_path):
    p = _write(tmp_path, "model:\n  name: gpt3-tiny\noptim:\n  lrr: 0.1\n")
    with pytest.raises(
        ConfigError,
        match=r"recipe.yaml:4: unknown key 'optim.lrr' "
        r"\(did you mean 'optim.lr'\?\)",
    ):
        load_config(p)


def test_unknown_section_and_wrong_type(tmp_path):
    with pytest.raises(ConfigError, match=r"recipe.yaml:2: unknown key 'trian.steps'.*'train'"):
        load_config(_write(tmp_path, "trian:\n  steps: 3\n"))
    with pytest.raises(ConfigError, match=r"recipe.yaml:2: key 'train.steps' must be an integer"):
        load_config(_write(tmp_path, "train:\n  steps: many\n"))
    with pytest.raises(ConfigError, match="must be one of"):
        load_config(_write(tmp_path, "train:\n  precision: fp8\n"))
    with pytest.raises(ConfigError, match="true or false"):
        load_config(None, ["parallel.sequence_parallel=maybe"])


def test_overrides_apply_on_top_of_the_recipe_and_size(tmp_path):
    p = _write(tmp_path, "model:\n  name: gpt3-1.3b\noptim:\n  lr: 1.0e-4\n")
    cfg = load_config(
        p,
        [
            "optim.lr=3e-4",
            "parallel.tensor=2",
            "model.dropout=0",
            "run.dir=/tmp/x",
            "data.paths=[a, b]",
        ],
    )
    assert cfg.optim.lr == 3e-4 and cfg.parallel.tensor == 2 and cfg.model.dropout == 0.0
    assert cfg.model.hidden_size == 2048 and cfg.train.global_batch_size == 1024
    assert cfg.data.paths == ["a", "b"] and cfg.run.name == "x"
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["train.steps"])


def _base(*extra):
    return load_config(None, ["model.name=gpt3-tiny", "data.paths=[x]", "data.tokenizer=t", *extra])


def test_validation_names_the_keys():
    msgs = {
        "model.num_heads (4) must be divisible by parallel.tensor (3)": (
            _base("parallel.tensor=3"),
            3,
        ),
        "model.num_layers (4) must be divisible by parallel.pipeline (3)": (
            _base("parallel.pipeline=3"),
            3,
        ),
        "train.global_batch_size (8) must be divisible by train.micro_batch_size (3)": (
            _base("train.micro_batch_size=3"),
            1,
        ),
        "parallel.zero_stage=2 cannot be combined with parallel.pipeline=2": (
            _base("parallel.pipeline=2", "parallel.zero_stage=2"),
            2,
        ),
        "world size 3 is not divisible by parallel.tensor x parallel.pipeline = 2 x 1": (
            _base("parallel.tensor=2"),
            3,
        ),
        "model.seq_length (33) must be divisible by parallel.tensor": (
            _base("parallel.tensor=2", "parallel.sequence_parallel=true", "model.seq_length=33"),
            2,
        ),
        "parallel.sequence_parallel needs parallel.tensor > 1": (
            _base("parallel.sequence_parallel=true"),
            1,
        ),
        "train.precision=fp16 is not supported on CPU": (_base("train.precision=fp16"), 1),
    }
    for expected, (cfg, world) in msgs.items():
        with pytest.raises(ConfigError) as e:
            validate(cfg, world, cuda=False)
        assert expected in str(e.value)


def test_sequence_parallel_is_valid_on_cpu_gloo():
    """Sequence parallelism runs on gloo (megagpt.parallel.regions): no CUDA needed."""
    validate(
        _base("parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.backend=gloo"),
        2,
        cuda=False,
    )


def test_all_problems_are_reported_at_once():
    cfg = load_config(
        None, ["model.name=gpt3-tiny", "parallel.tensor=3", "train.micro_batch_size=3"]
    )
    with pytest.raises(ConfigError) as e:
        validate(cfg, 3, cuda=False)
    text = str(e.value)
    assert "parallel.tensor" in text and "data.paths" in text and "data.tokenizer" in text


def test_cli_reports_config_errors_before_any_process_group(tmp_path):
    """A bad layout under torchrun-like env exits 2 with the keys named, starting nothing."""
    p = _write(tmp_path, "model:\n  name: gpt3-tiny\ndata:\n  paths: [nope]\n  tokenizer: nope\n")
    env = dict(
        os.environ,
        WORLD_SIZE="3",
        RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT="1",
        PYTHONPATH=str(ROOT),
    )
    r = subprocess.run(
        [sys.executable, "-m", "megagpt.cli", "train", "--config", str(p), "parallel.tensor=3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    assert "model.num_heads (4) must be divisible by parallel.tensor (3)" in r.stderr
    assert "Traceback" not in r.stderr


def test_config_reference_documents_every_field():
    text = render_markdown()
    from dataclasses import fields

    from megagpt.config.schema import Config

    for section in fields(Config):
        for f in fields(
            section.type
            if not isinstance(section.type, str)
            else getattr(Config(), section.name).__class__
        ):
            assert f"`{section.name}.{f.name}`" in text
            assert f.metadata.get("doc"), f"{section.name}.{f.name} has no description"


def test_registry_has_test_sizes():
    assert {"gpt3-tiny", "gpt3-mini"} <= set(names())


def test_cli_names_the_key_of_a_missing_tokenizer(tmp_path):
    p = _write(
        tmp_path,
        "model:\n  name: gpt3-tiny\ndata:\n  paths: [nope]\n  tokenizer: /no/such/tokenizer\n",
    )
    r = subprocess.run(
        [sys.executable, "-m", "megagpt.cli", "train", "--config", str(p)],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert "data.tokenizer='/no/such/tokenizer'" in r.stderr and "Traceback" not in r.stderr
