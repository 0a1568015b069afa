"""Start N local processes (gloo on CPU) running one worker function; collect their results.

Each process gets the torchrun-style environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) and calls ``module:function(**kwargs)``; the return value of every rank comes back
as JSON. A failing rank fails the test with its stderr.
"""

from __future__ import annotations

import json
import os
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


def run_distributed(target: str, world: int, timeout: float = 300.0, **kwargs) -> list:
    """Run ``target`` ("package.module:function") on ``world`` ranks; returns results by rank."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for rank in range(world):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                       LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                       PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                       WANDB_MODE="disabled")
            out = Path(tmp) / f"rank{rank}.json"
            err = open(Path(tmp) / f"rank{rank}.err", "w")
            procs.append((subprocess.Popen(
                [sys.executable, "-c", _BOOT, target, json.dumps(kwargs), str(out)],
                env=env, cwd=ROOT, stdout=err, stderr=subprocess.STDOUT), out, err))
        failures = []
        for rank, (p, _out, err) in enumerate(procs):
            try:
                code = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                for q, _, _ in procs:
                    q.kill()
                code = "timeout"
            err.close()
            if code != 0:
                log = (Path(tmp) / f"rank{rank}.err").read_text()[-4000:]
                failures.append(f"rank {rank} exited {code}:\n{log}")
        if failures:
            raise AssertionError("\n\n".join(failures))
        return [json.loads(out.read_text()) for _, out, _ in procs]
