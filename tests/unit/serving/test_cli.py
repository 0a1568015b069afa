"""`megagpt serve` argument errors: one line naming the argument, exit 2, before loading."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run(
        [sys.executable, "-m", "megagpt.cli", "serve", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
        check=False,
    )


def test_a_bad_argument_is_a_one_line_error(serve_model_dir):
    res = run_cli(["--model", serve_model_dir, "--max-batch", "0"])
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("megagpt serve: error: --max-batch 0")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--model", "{tmp}/missing"], "no such directory"),
        (["--model", "{tmp}"], "not a checkpoint megagpt knows"),
        (["--model", "{model}", "--tokenizer", "{tmp}/none"], "--tokenizer .*/none: no such"),
        (["--model", "{model}", "--port", "70000"], "--port 70000"),
        (["--model", "{model}", "--served-model-name", " "], "--served-model-name"),
        (["--model", "{model}", "--speculate", "-1"], "--speculate -1"),
    ],
)
def test_arguments_are_checked_before_loading(tmp_path, serve_model_dir, args, needle):
    from megagpt.cli import build_parser
    from megagpt.serving.cli import ServeError, check_args

    argv = [a.format(tmp=tmp_path, model=serve_model_dir) for a in args]
    with pytest.raises(ServeError, match=needle):
        check_args(build_parser().parse_args(["serve", *argv]))


def test_a_port_in_use_is_refused_before_the_model_loads(serve_model_dir):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = run_cli(["--model", serve_model_dir, "--port", str(port), "--device", "cpu"])
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr  # one line: nothing loaded, no uvicorn traceback
    assert lines[0].startswith(f"megagpt serve: error: --host 127.0.0.1 --port {port}: ")
    assert "choose another --port" in lines[0]


@pytest.mark.parametrize(
    "host, needle",
    [
        ("no-such-host.invalid", "--host 'no-such-host.invalid': not a known host"),
        ("999.1.2.3", "--host '999.1.2.3': not a known host"),
        ("192.0.2.1", "--host 192.0.2.1 --port 0: cannot listen there"),  # TEST-NET-1
    ],
)
def test_a_host_it_cannot_listen_on_is_refused(serve_model_dir, host, needle):
    from megagpt.cli import build_parser
    from megagpt.serving.cli import ServeError, check_args

    argv = ["serve", "--model", serve_model_dir, "--host", host, "--port", "0"]
    args = build_parser().parse_args(argv)
    with pytest.raises(ServeError, match=needle.replace(".", r"\.").replace("(", r"\(")):
        check_args(args)
