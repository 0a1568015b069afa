"""Integration tests: our launchers on a real (loopback) Slurm and on two torchrun "nodes"."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.distributed.conftest import tiny_corpus, tiny_recipe  # noqa: F401  (fixture reuse)

ROOT = Path(__file__).resolve().parents[2]
SETUP = Path(__file__).with_name("setup_slurm.sh")
LAB = Path(os.environ.get("MEGAGPT_SLURM_DIR", "/tmp/megagpt-slurm"))


def launcher_env(**extra: str) -> dict:
    """Environment for launched training: one thread per process, loopback (megagpt picks
    DeepSpeed's accelerator from train.device itself)."""
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        GLOO_SOCKET_IFNAME="lo",
        WANDB_MODE="disabled",
        MEGAGPT_ROOT=str(ROOT),
        PYTHONWARNINGS="ignore",
    )
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def slurm_cluster():
    """A 2-node Slurm on loopback (tests/integration/setup_slurm.sh). Skips, with the reason,
    only when Slurm cannot be installed; stops the daemons afterwards if it started them."""
    conf = LAB / "etc" / "slurm.conf"
    env = dict(os.environ, SLURM_CONF=str(conf))
    was_up = (
        conf.is_file()
        and shutil.which("sinfo") is not None
        and subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N %t"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout.count("127.0.0.")
        >= 2
    )
    if not was_up:
        proc = subprocess.run(
            ["bash", str(SETUP), "up"], capture_output=True, text=True, timeout=600, check=False
        )
        if proc.returncode != 0:
            missing = shutil.which("sbatch") is None or shutil.which("slurmctld") is None
            tail = (proc.stdout + proc.stderr)[-2000:]
            if missing:
                pytest.skip(
                    f"Slurm could not be installed by {SETUP.name} (needs root and "
                    f"apt access to Debian's slurmctld/slurmd/slurm-client/munge):\n"
                    f"{tail}"
                )
            raise AssertionError(f"Slurm is installed but the cluster did not start:\n{tail}")
    yield env
    if not was_up:
        subprocess.run(["bash", str(SETUP), "down"], capture_output=True, timeout=120, check=False)
