"""Stop signals: SIGUSR1 (Slurm's pre-timeout) and SIGTERM ask for a checkpoint and an exit.

``StopFlag`` is created first thing in a run's setup (``megagpt.training.setup.build_run``'s
caller), so a signal during setup does not kill the job; the training loop polls it at each step
boundary (``any_rank``) and ``release``s it at the end.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import torch
import torch.distributed as dist

from megagpt.training import watchdog


class StopFlag:
    """Stop signals ask for a checkpoint at the next step boundary and an exit.

    * SIGUSR1 (Slurm's pre-timeout signal, ``--signal=B:USR1@...``) is caught from the start, so
      one that arrives during setup does not kill the job: the first step boundary saves.
    * SIGTERM (``scancel``, a requeue, or torchrun stopping the surviving workers of an attempt
      whose rank died) keeps its default, immediate exit until ``arm()``: during setup there is
      nothing to save, and a rank blocked in a rendezvous must not hold up torchrun's restart.
      Once armed (training), it is caught like SIGUSR1; but a main thread blocked in a
      collective whose peer is gone cannot act on it (Python runs handlers between bytecodes
      only), so a helper thread, woken through ``signal.set_wakeup_fd``, ends the process with
      status 143 if the SIGTERM is not honoured within ``TERM_GRACE_S`` (longer while a save or
      export is under way), saying where it was. A rank never ignores termination for long.
    """

    # Under torchrun's SIGTERM -> SIGKILL window (30 s) and Slurm's usual KillWait (30 s).
    TERM_GRACE_S = 20.0
    # A save/export in progress gets this long after the SIGTERM before the helper gives up.
    SAVE_GRACE_S = 600.0
    _helper: threading.Thread | bool | None = None  # the process's helper thread, once started
    _current: StopFlag | None = None  # the armed flag it serves

    def __init__(self):
        self.raised = False
        self.armed = False
        self._done = threading.Event()
        self._set(signal.SIGUSR1, self._handler)

    @staticmethod
    def _set(sig, action) -> None:
        try:
            signal.signal(sig, action)
        except ValueError:  # not the main thread (e.g. under a test harness)
            pass

    def _handler(self, signum, frame):
        self.raised = True

    def arm(self) -> None:
        """Training starts: SIGTERM now means save and exit, bounded by the helper thread."""
        if self.armed or threading.current_thread() is not threading.main_thread():
            return
        self.armed = True
        StopFlag._current = self
        self._set(signal.SIGTERM, self._handler)
        if StopFlag._helper is None:
            StopFlag._helper = self._start_helper()

    @classmethod
    def _start_helper(cls) -> threading.Thread | bool:
        """The wakeup fd is process-wide: one helper thread per process, which serves whichever
        flag is armed. False when another owner holds the wakeup fd (then no forced exit)."""
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        if previous != -1:
            signal.set_wakeup_fd(previous)
            os.close(read_fd)
            os.close(write_fd)
            return False
        thread = threading.Thread(
            target=cls._enforce_term, args=(read_fd,), daemon=True, name="megagpt-sigterm"
        )
        thread.start()
        return thread

    @classmethod
    def _enforce_term(cls, read_fd: int) -> None:
        """Helper thread: after a SIGTERM, end the process unless the trainer exits in time."""
        import time

        while True:
            while signal.SIGTERM not in os.read(read_fd, 64):
                pass
            flag, start = cls._current, time.monotonic()
            while flag is not None and not flag._done.wait(1.0):
                waited = time.monotonic() - start
                phase, _ = watchdog.where()
                limit = cls.SAVE_GRACE_S if phase in ("save", "export") else cls.TERM_GRACE_S
                if waited >= limit:
                    rank = os.environ.get("RANK", "0")
                    print(
                        f"[megagpt] rank {rank}: SIGTERM not honoured within {waited:.0f} s "
                        f"(main thread busy in {watchdog.describe()}, e.g. a collective whose"
                        f" peer is gone): exiting",
                        file=sys.stderr,
                        flush=True,
                    )
                    os._exit(128 + signal.SIGTERM)

    def release(self) -> None:
        """After training: a late SIGUSR1 (the pre-timeout signal) is ignored rather than
        killing a process that is only shutting down; SIGTERM gets its default back."""
        self._done.set()
        if StopFlag._current is self:
            StopFlag._current = None
        for sig, action in ((signal.SIGUSR1, signal.SIG_IGN), (signal.SIGTERM, signal.SIG_DFL)):
            self._set(sig, action)

    def any_rank(self, device: torch.device) -> bool:
        flag = torch.tensor([1.0 if self.raised else 0.0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)
