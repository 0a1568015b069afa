"""`megagpt generate` as a user runs it: --prompt, stdin, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def run_cli(args: list[str], stdin: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run(
        [sys.executable, "-m", "megagpt.cli", "generate", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
        check=False,
    )


def test_generate_from_prompt_and_stdin(tiny_model_dir, pipe):
    res = run_cli(
        [
            "--model",
            tiny_model_dir,
            "--top-k",
            "1",
            "--max-new-tokens",
            "6",
            "--jsonl",
            "--input",
            "-",
            "--prompt",
            "北京",
        ],
        stdin="上海\n\n广州\n",
    )
    assert res.returncode == 0, res.stderr
    rows = [json.loads(x) for x in res.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["北京", "上海", "广州"]
    for r in rows:  # the same text as the Python pipeline
        assert r["text"] == pipe(r["prompt"], top_k=1, max_new_tokens=6)["text"]


def test_speculate_option_gives_the_same_text(tiny_model_dir, pipe):
    common = [
        "--model",
        tiny_model_dir,
        "--top-k",
        "1",
        "--max-new-tokens",
        "12",
        "--prompt",
        "床前明月光，床前明月光",
    ]
    off = run_cli([*common, "--speculate", "0"])
    on = run_cli([*common, "--speculate", "5"])
    assert off.returncode == 0 and on.returncode == 0, off.stderr + on.stderr
    assert (
        on.stdout
        == off.stdout
        == pipe("床前明月光，床前明月光", top_k=1, max_new_tokens=12)["text"] + "\n"
    )
    bad = run_cli([*common, "--speculate", "-1"])
    assert bad.returncode == 2 and "--speculate must be >= 0" in bad.stderr


def test_generate_errors_are_one_line(tiny_model_dir):
    res = run_cli(["--model", tiny_model_dir, "--prompt", "北京", "--max-length", "1"])
    assert res.returncode == 2
    assert "--prompt #1: --max-length 1 leaves no room" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_compile_option_decodes_through_the_compiled_step(
    tiny_model_dir, pipe, monkeypatch, capsys
):
    """`megagpt generate --compile`: the generator's static step goes through torch.compile
    (here its "eager" backend, which checks the capture without a C++ toolchain) and the text
    is the default path's."""
    import argparse

    import torch

    from megagpt.inference import cli

    compiled = []
    real = torch.compile

    def eager_compile(fn, **kw):
        compiled.append(kw)
        return real(fn, **{**kw, "backend": "eager", "mode": None})

    monkeypatch.setattr(torch, "compile", eager_compile)
    parser = argparse.ArgumentParser()
    cli.add_generate_parser(parser.add_subparsers())
    argv = ["generate", "--model", tiny_model_dir, "--top-k", "1", "--max-new-tokens", "6"]
    args = parser.parse_args([*argv, "--prompt", "北京", "--compile", "--device", "cpu"])
    try:
        assert args.func(args) == 0
    finally:
        torch._dynamo.reset()
    assert compiled and compiled[0]["fullgraph"] is True
    assert capsys.readouterr().out == pipe("北京", top_k=1, max_new_tokens=6)["text"] + "\n"


def test_a_compiled_step_is_refused_under_tensor_parallelism(pipe):
    from megagpt.inference.generate import TextGenerator

    gen = pipe.generator
    two = TextGenerator(
        gen.model, vocab_size=gen.vocab_size, max_positions=gen.max_positions, stop_ids=[]
    )
    two.tp_size = 2
    with pytest.raises(ValueError, match="tensor-parallel size 1 only"):
        two.use_compiled_step()
    assert not two.compile and not two.static


@pytest.fixture
def no_loading(monkeypatch):
    """Fails the test if `megagpt generate` starts a process group or loads a model."""
    import importlib

    pipeline = importlib.import_module("megagpt.inference.pipeline")  # the module, not the name

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded (or the process groups started) first")

    monkeypatch.setattr(pipeline, "inference_context", loaded)
    monkeypatch.setattr(pipeline, "pipeline", loaded)


def generate_main(capsys, *args: str) -> tuple[int, str]:
    """`megagpt generate ARGS` in this process: (exit status, stderr)."""
    from megagpt.cli import main

    rc = main(["generate", *args])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
        (["--max-length", "0"], "--max-length must be >= 1, got 0"),
        (["--max-length", "9", "--max-new-tokens", "4"], "--max-length"),
        (["--num-return-sequences", "0"], "--num-return-sequences must be >= 1, got 0"),
        (["--num-return-sequences", "2", "--top-k", "1"], "--top-k 1"),
        (["--speculate", "-1"], "--speculate must be >= 0"),
        (["--top-p", "5"], "--top-p must be in [0, 1], got 5.0"),
        (["--top-k", "3", "--top-p", "0.5"], "--top-k 3 and --top-p 0.5 cannot be combined"),
        (["--top-k", "100000"], "--top-k (100000) must be smaller than the vocabulary"),
        (["--temperature", "nan"], "--temperature must be a finite number > 0, got nan"),
        (["--temperature", "inf"], "--temperature must be a finite number > 0, got inf"),
        (["--repetition-penalty", "nan"], "--repetition-penalty must be a finite number > 0"),
    ],
)
def test_bad_flags_are_named_before_the_model_loads(
    tiny_model_dir, no_loading, capsys, flags, needle
):
    rc, err = generate_main(capsys, "--model", tiny_model_dir, "--prompt", "hi", *flags)
    assert rc == 2
    assert err.startswith("megagpt generate: error: ") and len(err.splitlines()) == 1, err
    assert needle in err, err


def test_prompt_file_errors_name_the_file_and_line(tmp_path, tiny_model_dir, no_loading, capsys):
    bad = tmp_path / "badp.txt"
    bad.write_bytes("北京\n\n".encode() + b"\xff\xfe bad\n")
    rc, err = generate_main(capsys, "--model", tiny_model_dir, "--input", str(bad))
    assert rc == 2 and f"--input {bad}:3: not UTF-8 text" in err, err
    assert len(err.splitlines()) == 1

    rc, err = generate_main(capsys, "--model", tiny_model_dir, "--input", str(tmp_path / "no.txt"))
    assert rc == 2 and f"--input {tmp_path / 'no.txt'}: does not exist" in err, err
    rc, err = generate_main(capsys, "--model", tiny_model_dir, "--input", str(tmp_path))
    assert rc == 2 and f"--input {tmp_path}: is a directory" in err, err
    (tmp_path / "blank.txt").write_text("\n  \n")
    rc, err = generate_main(
        capsys, "--model", tiny_model_dir, "--input", str(tmp_path / "blank.txt")
    )
    assert rc == 2 and "no prompt" in err and "blank.txt" in err, err


def test_a_prompt_too_long_names_its_line(tmp_path, tiny_model_dir, capsys):
    """Errors found once the tokenizer is there (a prompt with no room to generate) name the
    prompt's place too: the file and line, or which --prompt."""
    from megagpt.checkpoint import read_config

    positions = read_config(tiny_model_dir).max_position_embeddings
    prompts = tmp_path / "p.txt"
    prompts.write_text("北京\n" + "北京" * positions + "\n", encoding="utf-8")
    rc, err = generate_main(
        capsys, "--model", tiny_model_dir, "--input", str(prompts), "--device", "cpu"
    )
    assert rc == 2 and f"--input {prompts}:2: the prompt has" in err, err
    rc, err = generate_main(
        capsys,
        "--model",
        tiny_model_dir,
        "--prompt",
        "北京",
        "--prompt",
        "北京" * positions,
        "--device",
        "cpu",
    )
    assert rc == 2 and "--prompt #2: the prompt has" in err, err


def test_batch_size_zero_in_the_pipeline_is_named(pipe):
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        pipe(["北京", "上海"], batch_size=0, max_new_tokens=2)
