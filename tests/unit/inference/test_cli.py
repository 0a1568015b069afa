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
    assert "max_length=1" in res.stderr and "Traceback" not in res.stderr


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
