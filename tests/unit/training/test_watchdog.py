"""The collective-timeout side of a hang, without a process group: the timeout the config gives,
the flight-recorder environment, and the one line a timed-out rank prints before it exits."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch.distributed as dist

from megagpt.config import ConfigError, load_config, validate
from megagpt.training import watchdog

ROOT = __import__("pathlib").Path(__file__).resolve().parents[3]


def test_timeout_defaults_are_short_on_gloo_and_sensible_on_nccl():
    assert watchdog.collective_timeout_s(0, "gloo") == 300  # not PyTorch's 30 min
    assert 600 <= watchdog.collective_timeout_s(0, "nccl") <= 1800
    assert watchdog.collective_timeout_s(7, "nccl") == 7


def test_negative_timeout_is_rejected_naming_the_key():
    cfg = load_config(None, ["model.name=gpt3-tiny", "parallel.timeout_s=-1"])
    with pytest.raises(ConfigError, match=r"parallel\.timeout_s must be >= 0"):
        validate(cfg, 1, cuda=False, need_data=False)
    validate(
        load_config(None, ["model.name=gpt3-tiny", "parallel.timeout_s=5"]),
        1,
        cuda=False,
        need_data=False,
    )


def test_flight_recorder_env_goes_to_the_run_dir(tmp_path):
    env: dict = {}
    done = watchdog.enable_flight_recorder(str(tmp_path / "run"), env)
    assert env["TORCH_NCCL_TRACE_BUFFER_SIZE"] == "2000"
    assert env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert env["TORCH_FR_DUMP_TEMP_FILE"] == str(
        tmp_path / "run" / "flight_recorder" / "nccl_trace_rank_"
    )
    assert (tmp_path / "run" / "flight_recorder").is_dir() and done == env


def test_flight_recorder_keeps_what_the_user_set(tmp_path):
    env = {
        "TORCH_NCCL_TRACE_BUFFER_SIZE": "0",  # the user turned it off
        "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": "/scratch/fr_",
    }  # older name of the dump path
    done = watchdog.enable_flight_recorder(str(tmp_path), env)
    assert env["TORCH_NCCL_TRACE_BUFFER_SIZE"] == "0"
    assert "TORCH_FR_DUMP_TEMP_FILE" not in env
    assert done == {"TORCH_NCCL_DUMP_ON_TIMEOUT": "1"}


def test_which_errors_are_collective_timeouts():
    gloo = RuntimeError(
        "[../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms "
        "for recv operation to complete"
    )
    nccl = dist.DistBackendError(
        "Watchdog caught collective operation timeout: "
        "WorkNCCL(SeqNum=12, OpType=ALLREDUCE) ran for 600000 ms"
    )
    assert watchdog.is_collective_timeout(gloo) and watchdog.is_collective_timeout(nccl)
    assert not watchdog.is_collective_timeout(RuntimeError("Connection reset by peer"))
    assert not watchdog.is_collective_timeout(ValueError("timed out"))


def test_other_errors_pass_through_unchanged():
    with pytest.raises(RuntimeError, match="shape mismatch"):
        with watchdog.report_collective_timeout():
            raise RuntimeError("shape mismatch")


def test_a_timeout_prints_phase_and_step_and_exits_4():
    """In a child process: the handler ends the process (os._exit)."""
    code = textwrap.dedent("""
        from megagpt.training import watchdog
        watchdog.set_timeout(5)
        watchdog.mark("data", 12)
        watchdog.mark("backward")
        with watchdog.report_collective_timeout():
            raise RuntimeError("[pair.cc:1] Timed out waiting 5000ms for recv operation\\nmore")
        print("not reached")
    """)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={"RANK": "3", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == watchdog.EXIT_COLLECTIVE_TIMEOUT, proc.stderr
    assert proc.stderr.strip() == (
        "[megagpt] rank 3: collective timed out in backward at step 12 (after 5 s): "
        "[pair.cc:1] Timed out waiting 5000ms for recv operation"
    )
    assert "not reached" not in proc.stdout
