"""DeepSpeed's accelerator follows the run's resolved device, whatever the environment says.

DeepSpeed fixes its accelerator at import, so each case runs in a fresh interpreter; CUDA's
accelerator object can be selected (not used) on a machine without a GPU. The end-to-end
case (a training step on one rank) is in tests/distributed/test_accelerator.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megagpt.engine.accelerator import accelerator_name

ROOT = Path(__file__).resolve().parents[3]

_SELECT = """
import sys, torch
from megagpt.engine.accelerator import current_accelerator, import_deepspeed
import_deepspeed(torch.device(sys.argv[1]))
print("selected", current_accelerator())
"""


def _select(device: str, env_value: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    if env_value is not None:
        env["DS_ACCELERATOR"] = env_value
    return subprocess.run(
        [sys.executable, "-c", _SELECT, device],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_accelerator_name_of_devices():
    assert accelerator_name(torch.device("cpu")) == "cpu"
    assert accelerator_name(torch.device("cuda", 3)) == "cuda"
    with pytest.raises(ValueError, match="cpu or cuda"):
        accelerator_name(torch.device("meta"))


@pytest.mark.parametrize(
    "device,inherited",
    [
        ("cpu", "cuda"),  # train.device=cpu on a CUDA host (or a launcher exporting cuda)
        ("cuda", "cpu"),  # a CUDA worker under a harness that exported DS_ACCELERATOR=cpu
        ("cpu", None),
        ("cuda", None),
    ],
)
def test_device_decides_over_the_environment(device, inherited):
    r = _select(device, inherited)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"selected {device}" in r.stdout


def test_a_second_device_in_one_process_is_refused():
    code = (
        _SELECT
        + """
try:
    import_deepspeed(torch.device("cuda"))
except RuntimeError as e:
    print("refused:", e)
"""
    )
    r = subprocess.run(
        [sys.executable, "-c", code, "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert "selected cpu" in r.stdout
    assert "refused:" in r.stdout and "train.device" in r.stdout
