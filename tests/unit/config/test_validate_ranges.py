"""validate() rejects out-of-range numbers, bad blend weights and splits, unknown eval tasks and a
validation that would run no batches: before any process group, naming the key and the value."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megagpt.config import ConfigError, load_config, validate

ROOT = Path(__file__).resolve().parents[3]


def _base(*extra):
    return load_config(None, ["model.name=gpt3-tiny", "data.paths=[x]", "data.tokenizer=t", *extra])


def _problems(*extra, need_data: bool = True) -> str:
    with pytest.raises(ConfigError) as e:
        validate(_base(*extra), 1, cuda=False, need_data=need_data)
    return str(e.value)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("optim.lr=nan", "optim.lr must be a finite number > 0, got nan"),
        ("optim.lr=inf", "optim.lr must be a finite number > 0, got inf"),
        ("optim.lr=-1e-4", "optim.lr must be a finite number > 0, got -0.0001"),
        ("optim.min_lr_ratio=nan", "optim.min_lr_ratio must be in [0, 1], got nan"),
        ("optim.warmup_tokens=nan", "optim.warmup_tokens must be a finite number >= 0, got nan"),
        ("optim.warmup_tokens=-5", "optim.warmup_tokens must be a finite number >= 0, got -5.0"),
        ("optim.decay_tokens=nan", "optim.decay_tokens must be a finite number > 0, got nan"),
        ("optim.decay_tokens=inf", "optim.decay_tokens must be a finite number > 0, got inf"),
        ("optim.beta1=-0.1", "optim.beta1 must be in [0, 1), got -0.1"),
        ("optim.beta2=1.5", "optim.beta2 must be in [0, 1), got 1.5"),
        ("optim.beta2=1", "optim.beta2 must be in [0, 1), got 1.0"),
        ("optim.beta2=nan", "optim.beta2 must be in [0, 1), got nan"),
        ("optim.eps=0", "optim.eps must be a finite number > 0, got 0.0"),
        ("optim.eps=inf", "optim.eps must be a finite number > 0, got inf"),
        ("optim.weight_decay=-0.1", "optim.weight_decay must be a finite number >= 0, got -0.1"),
        ("optim.weight_decay=nan", "optim.weight_decay must be a finite number >= 0, got nan"),
        ("optim.clip_grad=-1", "optim.clip_grad must be a finite number >= 0, got -1.0"),
        ("optim.clip_grad=nan", "optim.clip_grad must be a finite number >= 0, got nan"),
        ("model.init_std=-1", "model.init_std must be a finite number > 0, got -1.0"),
        ("model.init_std=0", "model.init_std must be a finite number > 0, got 0.0"),
        ("model.init_std=nan", "model.init_std must be a finite number > 0, got nan"),
        ("model.layernorm_eps=0", "model.layernorm_eps must be a finite number > 0, got 0.0"),
        ("model.ffn_hidden_size=-4", "model.ffn_hidden_size must be >= 0, got -4"),
        ("model.dropout=nan", "model.dropout must be in [0, 1), got nan"),
        ("model.attention_dropout=1", "model.attention_dropout must be in [0, 1), got 1.0"),
        ("checkpoint.interval=-1", "checkpoint.interval must be >= 0, got -1"),
        ("checkpoint.keep_last=0", "checkpoint.keep_last must be >= 1, got 0"),
        ("train.seed=-1", "train.seed must be >= 0, got -1"),
        ("train.eval_interval=-1", "train.eval_interval must be >= 0, got -1"),
        ("train.eval_iters=-1", "train.eval_iters must be >= 0, got -1"),
        ("train.max_bad_steps=0", "train.max_bad_steps must be >= 1, got 0"),
        ("train.rewind_on_bad_steps=-1", "train.rewind_on_bad_steps must be >= 0, got -1"),
        ("train.loss_spike_factor=-1", "train.loss_spike_factor must be 0 (off) or > 1, got -1.0"),
        ("train.loss_spike_factor=0.5", "train.loss_spike_factor must be 0 (off) or > 1, got 0.5"),
        ("train.loss_spike_factor=nan", "train.loss_spike_factor must be 0 (off) or > 1, got nan"),
        ("train.initial_loss_scale=0", "train.initial_loss_scale must be a finite number > 0"),
        ("train.loss_scale_window=0", "train.loss_scale_window must be >= 1, got 0"),
        ("logging.peak_tflops=-1", "logging.peak_tflops must be a finite number >= 0, got -1.0"),
        ("logging.peak_tflops=nan", "logging.peak_tflops must be a finite number >= 0, got nan"),
    ],
)
def test_out_of_range_values_name_the_key_and_value(override, expected):
    assert expected in _problems(override)


def test_constant_schedule_allows_lr_zero_but_not_negative_or_nan():
    validate(_base("optim.schedule=constant", "optim.lr=0"), 1, cuda=False)
    for bad in ("-1", "nan"):
        text = _problems("optim.schedule=constant", f"optim.lr={bad}")
        assert "optim.lr must be a finite number >= 0 with optim.schedule=constant" in text


def test_noam_needs_warmup_steps():
    text = _problems("optim.schedule=noam", "optim.warmup_steps=0")
    assert "optim.warmup_steps must be >= 1 with optim.schedule=noam, got 0" in text


def test_boundary_values_stay_valid():
    validate(
        _base(
            "optim.beta1=0",
            "optim.beta2=0",
            "optim.weight_decay=0",
            "optim.clip_grad=0",
            "optim.warmup_tokens=0",
            "model.dropout=0",
            "model.attention_dropout=0",
            "model.ffn_hidden_size=0",
            "checkpoint.interval=0",
            "train.seed=0",
            "train.loss_spike_factor=0",
            "train.rewind_on_bad_steps=0",
            "train.eval_interval=0",
            "train.eval_iters=0",
            "logging.peak_tflops=0",
        ),
        1,
        cuda=False,
    )


# -- data.weights, data.split ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "paths, weights, expected",
    [
        ("[x]", "[a]", "data.weights[0] must be a number, got 'a'"),
        ("[x, y]", "[1, true]", "data.weights[1] must be a number, got True"),
        ("[x, y]", "[0.5, .nan]", "data.weights [0.5, nan]: must be non-negative"),
        ("[x, y]", "[0.5, .inf]", "data.weights [0.5, inf]: must be non-negative"),
        ("[x, y]", "[1, -1]", "data.weights [1, -1]: must be non-negative"),
        ("[x, y]", "[0, 0]", "data.weights [0, 0]: must be non-negative numbers with a positive"),
        ("[x, y]", "[1, 2, 3]", "data.weights has 3 entries for 2 data.paths"),
    ],
)
def test_bad_blend_weights_name_data_weights(paths, weights, expected):
    assert expected in _problems(f"data.paths={paths}", f"data.weights={weights}")


def test_weights_written_as_yaml_text_get_a_hint():
    # YAML reads 1e-1 (no dot) as a string; the builder would fail on it deep in numpy.
    text = _problems("data.paths=[x, y]", "data.weights=[1e-1, 0.9]")
    assert "data.weights[0] must be a number, got '1e-1'" in text and "1.0e-1" in text


def test_valid_blend_weights_pass():
    validate(_base("data.paths=[x, y]", "data.weights=[1, 3]"), 1, cuda=False)
    validate(_base("data.paths=[x, y]", "data.weights=[0, 0.5]"), 1, cuda=False)


@pytest.mark.parametrize(
    "split, expected",
    [
        ("abc", "data.split: split 'abc': expected up to three numbers"),
        ("'1,2,3,4'", "data.split: split '1,2,3,4': expected up to three non-negative"),
        ("'-1,2'", "data.split: split '-1,2'"),
        ("'0,0,0'", "data.split: split '0,0,0'"),
        ("'inf,1'", "data.split 'inf,1': every part must be a finite number"),
    ],
)
def test_bad_split_names_data_split(split, expected):
    assert expected in _problems(f"data.split={split}")


def test_split_without_validation_part_while_validating():
    text = _problems("data.split='100,0,0'", "train.eval_interval=10")
    assert "data.split '100,0,0' has no validation part" in text
    assert "train.eval_interval=10" in text
    validate(_base("data.split='100,0,0'", "train.eval_interval=0"), 1, cuda=False)
    validate(_base("data.split='98/2'"), 1, cuda=False)


def test_data_checks_are_skipped_without_indexed_data():
    # Fine-tuning (need_data=False) reads finetune.train_file; data.* is not used.
    validate(_base("data.split=abc", "data.weights=[a]"), 1, cuda=False, need_data=False)


# -- train.eval_iters / train.eval_interval --------------------------------------------------------
def test_eval_iters_zero_with_validation_on_is_an_error():
    text = _problems("train.eval_iters=0", "train.eval_interval=5")
    assert "train.eval_iters=0 with train.eval_interval=5" in text
    validate(_base("train.eval_iters=0", "train.eval_interval=0"), 1, cuda=False)
    # Fine-tuning evaluates its own eval file and never reads train.eval_iters.
    validate(_base("train.eval_iters=0"), 1, cuda=False, need_data=False)


# -- train.eval_tasks ------------------------------------------------------------------------------
needs_lm_eval = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None, reason="lm-evaluation-harness not installed"
)


@needs_lm_eval
def test_unknown_eval_task_is_named_before_training():
    text = _problems(
        "train.eval_tasks=[megagpt_zh_mc, nosuch_task]", "train.eval_interval=2", need_data=False
    )
    assert "train.eval_tasks: unknown lm-eval task(s) ['nosuch_task']" in text
    assert "--tasks" not in text and "--include-path" not in text


@needs_lm_eval
def test_bundled_eval_task_is_accepted():
    validate(
        _base("train.eval_tasks=[megagpt_zh_mc]", "train.eval_interval=2"),
        1,
        cuda=False,
        need_data=False,
    )


def test_without_lm_eval_the_install_hint_stays(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a, **k: None if name == "lm_eval" else real(name, *a, **k),
    )
    text = _problems("train.eval_tasks=[nosuch_task]", "train.eval_interval=2", need_data=False)
    assert 'train.eval_tasks needs lm-evaluation-harness: pip install -e ".[eval]"' in text
    assert "unknown lm-eval task" not in text


# -- before any process group ----------------------------------------------------------------------
def test_cli_reports_range_and_data_errors_before_any_process_group(tmp_path):
    """Under torchrun-like env (an unreachable master), the run exits 2 naming every key."""
    p = tmp_path / "recipe.yaml"
    p.write_text("model:\n  name: gpt3-tiny\ndata:\n  paths: [nope]\n  tokenizer: nope\n")
    env = dict(
        os.environ,
        WORLD_SIZE="1",
        RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT="1",
        PYTHONPATH=str(ROOT),
    )
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "megagpt.cli",
            "train",
            "--config",
            str(p),
            "optim.lr=nan",
            "optim.beta2=1.5",
            "data.weights=[a]",
            "data.split=abc",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    for key in ("optim.lr", "optim.beta2", "data.weights[0]", "data.split"):
        assert key in r.stderr
    assert "Traceback" not in r.stderr
