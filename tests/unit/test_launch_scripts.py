"""launch/*.sh and launch/slurm/*.sbatch refuse bad topology input before anything starts.

The scripts run under bash with a fake interpreter (``--python`` / ``MEGAGPT_PYTHON``) and fake
``srun`` / ``scontrol`` on PATH that only record that they were called: a bad argument must
end the script with one error line naming it, and nothing may have been launched."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _fakes(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A bin dir with fake srun/scontrol, a fake python, and the file each call is logged to."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    for name in ("srun", "scontrol", "fakepython"):
        tool = bin_dir / name
        body = 'echo "$0 $*" >> "$CALLS_LOG"\n'
        if name == "scontrol":
            body += 'case "$*" in "show hostnames"*) echo node-a ;; esac\n'
        tool.write_text("#!/usr/bin/env bash\n" + body, encoding="utf-8")
        tool.chmod(0o755)
    return bin_dir, bin_dir / "fakepython", log


def run_script(tmp_path, script, args, env_extra=None):
    bin_dir, python, log = _fakes(tmp_path)
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "CALLS_LOG": str(log),
        "MEGAGPT_PYTHON": str(python),
    }
    env.update(env_extra or {})
    res = subprocess.run(
        ["bash", str(script), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=30,
        check=False,
    )
    calls = log.read_text(encoding="utf-8") if log.exists() else ""
    return res, calls


@pytest.fixture
def config(tmp_path):
    d = tmp_path / "my configs"  # a space in the path must survive every hop
    d.mkdir()
    path = d / "tiny run.yaml"
    path.write_text("model:\n  name: gpt3-tiny\n", encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("port", ["0", "70000", "abc"])
def test_torchrun_sh_refuses_a_bad_master_port(tmp_path, config, port):
    res, calls = run_script(
        tmp_path, LAUNCH / "torchrun.sh", ["--nproc-per-node", "1", "--master-port", port, config]
    )
    assert res.returncode == 2, res.stderr
    assert f"--master-port must be a port in 1..65535, got '{port}'" in res.stderr
    assert calls == ""  # torchrun never started


def test_torchrun_sh_passes_a_config_path_with_spaces(tmp_path, config):
    res, calls = run_script(tmp_path, LAUNCH / "torchrun.sh", ["--nproc-per-node", "1", config])
    assert res.returncode == 0, res.stderr
    assert "torch.distributed.run" in calls and f"--config {config}" in calls


@pytest.mark.parametrize("port", ["0", "65536", "x1"])
def test_deepspeed_sh_refuses_a_bad_master_port(tmp_path, config, port):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=8\n", encoding="utf-8")
    args = ["--hostfile", str(hostfile), "--node-rank", "0", "--master-port", port, config]
    res, calls = run_script(tmp_path, LAUNCH / "deepspeed.sh", args)
    assert res.returncode == 2, res.stderr
    assert f"--master-port must be a port in 1..65535, got '{port}'" in res.stderr
    assert calls == ""


@pytest.mark.parametrize(
    "line",
    ["node-b slots=0", "node-b slots=eight", "node-b", "slots=8"],
)
def test_deepspeed_sh_names_a_hostfile_line_that_is_not_host_slots(tmp_path, config, line):
    """A line the host count would skip (shifting the node ranks after it) or a host with no
    GPU slot: refused naming the file and line, before anything runs."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(f"# two nodes\nnode-a slots=8\n\n{line}\n", encoding="utf-8")
    res, calls = run_script(
        tmp_path, LAUNCH / "deepspeed.sh", ["--hostfile", str(hostfile), "--node-rank", "0", config]
    )
    assert res.returncode == 2, res.stderr
    assert f"--hostfile {hostfile}:4: '{line}' is not 'HOST slots=N' with N >= 1" in res.stderr
    assert calls == ""


def test_deepspeed_sh_accepts_comments_and_blank_lines_in_the_hostfile(tmp_path, config):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(
        "# nodes\nnode-a slots=8  # first\n\n  node-b slots=08 extra\n", encoding="utf-8"
    )
    res, calls = run_script(
        tmp_path, LAUNCH / "deepspeed.sh", ["--hostfile", str(hostfile), "--node-rank", "1", config]
    )
    assert res.returncode == 0, res.stderr
    assert "--node_rank 1" in calls


SLURM_ENV = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NODELIST": "node-a",
    "SLURM_JOB_NUM_NODES": "1",
    "SLURM_GPUS_PER_NODE": "1",
}


@pytest.mark.parametrize("port", ["0", "99999", "auto"])
def test_train_sbatch_refuses_a_bad_master_port(tmp_path, config, port):
    env = dict(SLURM_ENV, MEGAGPT_MASTER_PORT=port)
    res, calls = run_script(tmp_path, LAUNCH / "slurm" / "train.sbatch", [config], env)
    assert res.returncode == 2, res.stderr
    assert f"MEGAGPT_MASTER_PORT='{port}' must be a port in 1..65535" in res.stderr
    assert "srun" not in calls and "fakepython" not in calls


SIZE_WRAPPERS = sorted((LAUNCH / "slurm" / "sizes").glob("*.sbatch"))


@pytest.mark.parametrize("wrapper", SIZE_WRAPPERS, ids=[p.stem for p in SIZE_WRAPPERS])
def test_size_wrapper_outside_the_repository_says_where_to_submit(tmp_path, wrapper):
    # Submitted from another folder: SLURM_SUBMIT_DIR is not the repository root.
    env = dict(SLURM_ENV, SLURM_SUBMIT_DIR=str(tmp_path))
    res, calls = run_script(tmp_path, wrapper, [], env)
    assert res.returncode == 2, res.stderr
    assert f"{tmp_path}/launch/slurm/train.sbatch not found" in res.stderr
    assert "set MEGAGPT_ROOT" in res.stderr and calls == ""


def test_plan_written_wrapper_outside_the_repository_says_where_to_submit(tmp_path):
    from megagpt.planner.hardware import ClusterShape, gpu_type
    from megagpt.planner.write import sbatch_text

    shape = ClusterShape(1, 8, gpu_type("a100-80gb"))
    wrapper = tmp_path / "w.sbatch"
    wrapper.write_text(sbatch_text(tmp_path / "c.yaml", "gpt3-1.3b", shape, 300), "utf-8")
    res, calls = run_script(tmp_path, wrapper, [], {"MEGAGPT_ROOT": str(tmp_path / "nope")})
    assert res.returncode == 2, res.stderr
    assert "gpt3-1.3b: error:" in res.stderr and "set MEGAGPT_ROOT" in res.stderr


def test_size_wrapper_from_the_repository_reaches_train_sbatch(tmp_path):
    env = dict(SLURM_ENV, SLURM_SUBMIT_DIR=str(ROOT), MEGAGPT_MASTER_PORT="0")
    res, calls = run_script(tmp_path, SIZE_WRAPPERS[0], [], env)
    # train.sbatch ran (and refused the port): the wrapper handed over with the config.
    assert res.returncode == 2 and "train.sbatch: error: MEGAGPT_MASTER_PORT='0'" in res.stderr


@pytest.mark.parametrize("script", ["torchrun.sh", "deepspeed.sh", "slurm/train.sbatch"])
def test_a_missing_interpreter_is_named_before_anything_runs(tmp_path, config, script):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\n", encoding="utf-8")
    args = {
        "torchrun.sh": ["--nproc-per-node", "1", config],
        "deepspeed.sh": ["--hostfile", str(hostfile), "--node-rank", "0", config],
        "slurm/train.sbatch": [config],
    }[script]
    missing = str(tmp_path / "venv" / "bin" / "python")
    env = dict(SLURM_ENV, MEGAGPT_PYTHON=missing)
    res, calls = run_script(tmp_path, LAUNCH / script, args, env)
    assert res.returncode == 2, res.stderr
    assert f"'{missing}' not found" in res.stderr and calls == ""
