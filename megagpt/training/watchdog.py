"""Where each rank is, and what it says when a collective hangs.

The training loop calls ``mark(phase, step)`` as it enters each phase (two assignments: cheap
enough for every micro-batch). When a collective times out, ``report_collective_timeout``
turns the backend's exception into one line per rank::

    rank 1: collective timed out in forward at step 7 (after 300 s): <backend's first line>

so the rank that stalled (its peers name the phase they waited in; it names where it was) can be
found from the log alone. Under NCCL, PyTorch's flight recorder additionally dumps every rank's
last collectives (``enable_flight_recorder``).
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

# Phases the trainer marks. forward/backward/optimizer when the engine marks them, else the
# whole step is "train_step".
PHASES = (
    "rendezvous",
    "setup",
    "resume",
    "data",
    "train_step",
    "forward",
    "backward",
    "optimizer",
    "eval",
    "stop_vote",
    "save",
    "export",
    "done",
)

# Exit status of a rank whose collective timed out: non-zero so torchrun restarts the job and a
# scheduler can tell a hang (retry) from a bad config (2) or a diverged run (3).
EXIT_COLLECTIVE_TIMEOUT = 4

# Defaults of parallel.timeout_s = 0. Gloo runs are CPU tests and small jobs: 5 minutes is far
# longer than any of their steps or saves. NCCL: 20 minutes covers the longest gap in which
# ranks wait on one another in a big run (rank 0 building a dataset's sample index, a
# checkpoint or model export of a 175B model to a shared filesystem), yet a dead or wedged rank
# is noticed well before PyTorch's 30.
DEFAULT_TIMEOUT_S = {"gloo": 300, "nccl": 1200}

# This process's record: module state on purpose, so that the exception handler in the CLI and
# the stop signal's helper thread can read it without being handed the trainer.
_state: dict = {"phase": "setup", "step": None, "timeout_s": None}


def mark(phase: str, step: int | None = None) -> None:
    """Record that this rank enters ``phase`` (of ``PHASES``) of ``step`` (kept when None)."""
    _state["phase"] = phase
    if step is not None:
        _state["step"] = step


def where() -> tuple[str, int | None]:
    """The (phase, step) last marked."""
    return _state["phase"], _state["step"]


def set_timeout(timeout_s: float) -> None:
    """Remember the collective timeout in force, for the timeout message."""
    _state["timeout_s"] = timeout_s


def describe() -> str:
    """'forward at step 7', or just the phase before the first step."""
    phase, step = where()
    return phase if step is None else f"{phase} at step {step}"


def collective_timeout_s(timeout_s: int, backend: str) -> int:
    """``parallel.timeout_s`` with 0 resolved for ``backend`` ('gloo' or 'nccl'), in seconds."""
    return timeout_s if timeout_s > 0 else DEFAULT_TIMEOUT_S.get(backend, 1200)


def enable_flight_recorder(run_dir: str, env: dict | None = None) -> dict:
    """Turn on PyTorch's NCCL flight recorder, dumping into ``<run_dir>/flight_recorder/``.

    Call before the NCCL process group starts (it reads the environment then). Only variables
    the user has not set are set, so an explicit choice (including turning it off with a
    buffer size of 0) wins. Returns what was set. A dump is one pickle per rank,
    ``nccl_trace_rank_<R>``, read with ``python -m torch.distributed.flight_recorder.fr_trace``.
    """
    env = os.environ if env is None else env
    wanted = {
        "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        "TORCH_FR_DUMP_TEMP_FILE": str(Path(run_dir, "flight_recorder", "nccl_trace_rank_")),
    }
    # Newer PyTorch reads TORCH_FR_* names, older the TORCH_NCCL_* ones: either set by the user
    # counts as set.
    aliases = {
        "TORCH_NCCL_TRACE_BUFFER_SIZE": "TORCH_FR_BUFFER_SIZE",
        "TORCH_FR_DUMP_TEMP_FILE": "TORCH_NCCL_DEBUG_INFO_TEMP_FILE",
    }
    done = {}
    for key, value in wanted.items():
        if key in env or aliases.get(key, key) in env:
            continue
        env[key] = value
        done[key] = value
    if "TORCH_FR_DUMP_TEMP_FILE" in done:
        Path(done["TORCH_FR_DUMP_TEMP_FILE"]).parent.mkdir(parents=True, exist_ok=True)
    return done


def is_collective_timeout(exc: BaseException) -> bool:
    """True for a process-group timeout (torch.distributed.DistBackendError, or the
    RuntimeError gloo raises): its message says it timed out."""
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc).lower()
    return "timed out" in text or "timeout" in text


def timeout_line(rank: int, exc: BaseException) -> str:
    """``rank R: collective timed out in <phase> at step S ...`` with the backend's first
    line (it names the operation, e.g. gloo's 'Timed out waiting ... for recv')."""
    first = next((x.strip() for x in str(exc).splitlines() if x.strip()), type(exc).__name__)
    limit = f" (after {_state['timeout_s']:g} s)" if _state["timeout_s"] else ""
    return f"rank {rank}: collective timed out in {describe()}{limit}: {first[:300]}"


@contextmanager
def report_collective_timeout():
    """Around a command that trains: a collective timeout prints ``timeout_line`` on stderr and
    ends the process with ``EXIT_COLLECTIVE_TIMEOUT``.

    It ends with ``os._exit``: after a timeout the process group is broken, and a normal
    interpreter exit could block again in its teardown (or in DeepSpeed's exit hooks).
    """
    try:
        yield
    except RuntimeError as e:
        if not is_collective_timeout(e):
            raise
        rank = int(os.environ.get("RANK", "0"))
        print(f"[megagpt] {timeout_line(rank, e)}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_COLLECTIVE_TIMEOUT)
