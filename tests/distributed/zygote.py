"""A pre-imported interpreter that forks the ranks of distributed tests (run as a script).

Every rank of a distributed test used to be a fresh interpreter paying ~5 s of CPU to import
torch, megatron-core and DeepSpeed before doing a second of work; with ~300 ranks in the suite
that was most of its time on a 2-core machine. This process imports them once and forks a job
process per test, which forks the ranks. Forking is safe here because this process never runs a
torch operation (no intra-op thread pool exists yet: it has one thread when it forks) and
DeepSpeed is imported with the CPU accelerator, the one the CPU tests use. Tests that need a
fresh interpreter (CUDA, an inherited ``DS_ACCELERATOR`` other than cpu) bypass it: see launcher.py.

Protocol (one Unix-socket connection per job): the client sends one JSON line
``{"target", "world", "kwargs", "env", "timeout", "dir"}``; ranks write ``dir/rank{r}.json``
(result) and ``dir/rank{r}.err`` (stdout + stderr); the job replies with one JSON line
``{"codes": [...]}`` (exit codes as ``subprocess`` reports them: ``-N`` for signal N, or
``"timeout"``). The zygote exits when its stdin closes (the test session ended).
"""

from __future__ import annotations

import importlib
import json
import os
import select
import signal
import socket
import sys
import time
import traceback
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402

from megagpt.engine.accelerator import import_deepspeed  # noqa: E402

import_deepspeed(torch.device("cpu"))
for _name in (
    "megagpt.training.trainer",
    "megagpt.training.finetune",
    "megagpt.engine.engine",
    "megagpt.checkpoint.manager",
    "megagpt.checkpoint.convert",
    "megagpt.inference.generate",
    "megagpt.inference.pipeline",
    "tests.distributed.workers",
):
    try:  # a module that fails to import here fails in its rank, with its own traceback
        importlib.import_module(_name)
    except Exception:  # noqa: BLE001
        pass


def _rank(job: dict, rank: int) -> None:
    """In a forked rank: the torchrun environment, output to the log, run, exit."""
    code = 1
    try:
        log = os.open(
            os.path.join(job["dir"], f"rank{rank}.err"),
            os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
            0o644,
        )
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.environ.clear()
        os.environ.update(job["env"])
        os.environ.update(
            RANK=str(rank),
            WORLD_SIZE=str(job["world"]),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(job["world"]),
        )
        module, fn = job["target"].split(":")
        result = getattr(importlib.import_module(module), fn)(**job["kwargs"])
        with open(os.path.join(job["dir"], f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _job(conn: socket.socket) -> None:
    """In a forked job process: fork the ranks, wait (with the timeout), reply, exit."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    with conn.makefile("r") as f:
        job = json.loads(f.readline())
    pids = []
    for rank in range(job["world"]):
        pid = os.fork()
        if pid == 0:
            conn.close()
            _rank(job, rank)
        pids.append(pid)
    codes: dict[int, object] = {}
    deadline = time.monotonic() + job["timeout"]
    while len(codes) < len(pids):
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid:
            codes[pid] = os.waitstatus_to_exitcode(status)
        elif time.monotonic() > deadline:
            for p in pids:
                if p not in codes:
                    try:
                        os.kill(p, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    os.waitpid(p, 0)
                    codes[p] = "timeout"
        else:
            time.sleep(0.02)
    conn.sendall((json.dumps({"codes": [codes[p] for p in pids]}) + "\n").encode())
    conn.close()
    os._exit(0)


def main(path: str) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(16)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # job processes are reaped automatically
    print("ready", flush=True)
    while True:
        ready, _, _ = select.select([server, sys.stdin], [], [])
        if sys.stdin in ready and not sys.stdin.readline():
            return  # the test session closed our stdin: it is over
        if server in ready:
            conn, _ = server.accept()
            if os.fork() == 0:
                server.close()
                _job(conn)
            conn.close()


if __name__ == "__main__":
    main(sys.argv[1])
