"""The trainer's stop signals (``signals.StopFlag``), each in a child process signalled for real.

SIGUSR1 (Slurm's pre-timeout) is caught from the start; SIGTERM kills a rank that is still
setting up (torchrun stopping an attempt must not wait on it); once training, SIGTERM asks for
a save, and a main thread that cannot act on it (blocked, as in a collective whose peer died)
is ended by the helper thread within the grace.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

PRELUDE = """
import sys, time
from megagpt.training import watchdog
from megagpt.training.signals import StopFlag
StopFlag.TERM_GRACE_S = 1.0
stop = StopFlag()
"""


def _start(body: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(body)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    return proc


def test_sigterm_during_setup_ends_the_process_at_once():
    proc = _start("""
        print("ready", flush=True)
        time.sleep(60)  # setup: e.g. waiting in a rendezvous
    """)
    proc.send_signal(signal.SIGTERM)
    # The child sleeps 60 s: ending by the signal inside the 30 s wait is the proof.
    assert proc.wait(timeout=30) == -signal.SIGTERM


def test_sigusr1_during_setup_is_kept_for_the_first_step():
    # Setup goes on until the flag shows the signal (or 20 s): a fixed sleep could be over
    # before the signal arrives when this process gets the CPU late on a busy machine.
    proc = _start("""
        print("ready", flush=True)
        t = time.monotonic()
        while not stop.raised and time.monotonic() - t < 20:
            time.sleep(0.05)
        print("raised", stop.raised, flush=True)
    """)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "raised True" in out


def test_sigterm_while_training_asks_for_a_save():
    """A main thread that reaches its step boundary in time: the flag is seen, no forced exit.

    With the default grace (20 s), not the other tests' 1 s: the child's main thread must wake
    from its poll and release within the grace, which on a busy machine can take a second."""
    proc = _start("""
        StopFlag.TERM_GRACE_S = 20.0
        stop.arm()
        watchdog.mark("train_step", 4)
        print("ready", flush=True)
        t = time.monotonic()
        while not stop.raised and time.monotonic() - t < 30:
            time.sleep(0.05)
        print("raised", stop.raised, flush=True)
        stop.release()
    """)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "raised True" in out and "not honoured" not in err


def test_sigterm_on_a_blocked_rank_ends_it_within_the_grace():
    """The main thread never gets back to a step boundary (here: a long sleep, as a collective
    waiting on a dead peer): the helper thread exits 143 and says where the rank was."""
    proc = _start("""
        stop.arm()
        watchdog.mark("train_step", 7)
        print("ready", flush=True)
        time.sleep(120)
    """)
    proc.send_signal(signal.SIGTERM)
    # The child sleeps 120 s: exit 143 inside the 60 s wait, from the helper thread.
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "SIGTERM not honoured within" in err and "train_step at step 7" in err


def test_a_save_in_progress_gets_longer_than_the_grace():
    proc = _start("""
        stop.arm()
        watchdog.mark("save", 8)
        print("ready", flush=True)
        time.sleep(4)  # a save, four times the (test's) grace
        stop.release()
        print("saved", flush=True)
    """)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "saved" in out
