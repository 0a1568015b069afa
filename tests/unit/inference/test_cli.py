"""`megagpt generate` as a user runs it: --prompt, stdin, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
