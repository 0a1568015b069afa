"""Start N local processes (gloo on CPU) running one worker function; collect their results.

Each process gets the torchrun-style environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) and calls ``module:function(**kwargs)``; the return value of every rank comes back
as JSON. A failing rank fails the test with its stderr.

On a machine without CUDA the ranks are forked from a pre-imported interpreter (zygote.py: it
saves each rank ~5 s of imports); ``fresh=True``, a CUDA machine or an inherited
``DS_ACCELERATOR`` (whose handling at import is what such a test checks) start fresh
interpreters instead. ``MEGAGPT_TEST_FRESH=1`` turns the zygote off for a whole run.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_BOOT = """
import json, sys, warnings
warnings.filterwarnings("ignore")
import importlib
mod, fn = sys.argv[1].split(":")
kwargs = json.loads(sys.argv[2])
result = getattr(importlib.import_module(mod), fn)(**kwargs)
with open(sys.argv[3], "w") as f:
    json.dump(result, f)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _environment(port: int) -> dict:
    return dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
        PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        WANDB_MODE="disabled",
    )


class _Zygote:
    """The pre-imported interpreter of this test session (started on first use)."""

    _instance: _Zygote | None = None

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="megagpt-zygote-")
        self.path = os.path.join(self.dir, "sock")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("zygote.py")), self.path],
            env=_environment(0),
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the test zygote (tests/distributed/zygote.py) did not start")
        atexit.register(self.close)

    @classmethod
    def get(cls) -> _Zygote:
        if cls._instance is None or cls._instance.proc.poll() is not None:
            cls._instance = cls()
        return cls._instance

    def run(self, job: dict) -> list:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(self.path)
            s.sendall((json.dumps(job) + "\n").encode())
            with s.makefile("r") as f:
                line = f.readline()
        if not line:
            raise RuntimeError("the test zygote's job process died without a reply")
        return json.loads(line)["codes"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


def _use_zygote(fresh: bool) -> bool:
    # DS_ACCELERATOR=cpu is what the zygote imported DeepSpeed with (megagpt's engine sets it in
    # any process that builds an engine, this one included after an in-process engine test);
    # another value is a test of import-time behaviour, which needs new interpreters.
    accelerator = os.environ.get("DS_ACCELERATOR", "cpu")
    if fresh or os.environ.get("MEGAGPT_TEST_FRESH") == "1" or accelerator != "cpu":
        return False
    import torch

    return not torch.cuda.is_available()


def run_distributed(
    target: str, world: int, timeout: float = 300.0, fresh: bool = False, **kwargs
) -> list:
    """Run ``target`` ("package.module:function") on ``world`` ranks; returns results by rank.

    ``fresh``: start each rank as a new interpreter (what a test of import-time behaviour
    needs) instead of forking it from the pre-imported zygote."""
    port = free_port()
    if _use_zygote(fresh):
        with tempfile.TemporaryDirectory() as tmp:
            codes = _Zygote.get().run(
                {
                    "target": target,
                    "world": world,
                    "kwargs": kwargs,
                    "env": _environment(port),
                    "timeout": timeout,
                    "dir": tmp,
                }
            )
            return _collect(Path(tmp), [(Path(tmp) / f"rank{r}.json") for r in range(world)], codes)
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for rank in range(world):
            env = dict(
                _environment(port),
                RANK=str(rank),
                WORLD_SIZE=str(world),
                LOCAL_RANK=str(rank),
                LOCAL_WORLD_SIZE=str(world),
            )
            out = Path(tmp) / f"rank{rank}.json"
            err = open(Path(tmp) / f"rank{rank}.err", "w")
            procs.append(
                (
                    subprocess.Popen(
                        [sys.executable, "-c", _BOOT, target, json.dumps(kwargs), str(out)],
                        env=env,
                        cwd=ROOT,
                        stdout=err,
                        stderr=subprocess.STDOUT,
                    ),
                    out,
                    err,
                )
            )
        codes = []
        for p, _out, err in procs:
            try:
                codes.append(p.wait(timeout=timeout))
            except subprocess.TimeoutExpired:
                for q, _, _ in procs:
                    q.kill()
                codes.append("timeout")
            err.close()
        return _collect(Path(tmp), [out for _, out, _ in procs], codes)


def _collect(tmp: Path, outs: list[Path], codes: list) -> list:
    failures = [
        f"rank {rank} exited {code}:\n"
        + (tmp / f"rank{rank}.err").read_text(errors="replace")[-4000:]
        for rank, code in enumerate(codes)
        if code != 0
    ]
    if failures:
        raise AssertionError("\n\n".join(failures))
    return [json.loads(out.read_text()) for out in outs]
