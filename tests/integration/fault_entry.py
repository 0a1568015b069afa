"""`python -m tests.integration.fault_entry STALL_STEP SECONDS megagpt-args...`: megagpt's CLI,
with rank 1 sleeping SECONDS before step STALL_STEP (a wedged rank: alive, never reaching the
step's collectives). STALL_STEP 0 injects nothing. A fault injection for tests only."""

from __future__ import annotations

import os
import sys
import time


def main() -> int:
    stall_step, seconds = int(sys.argv[1]), float(sys.argv[2])
    from megagpt.engine import engine as engine_module

    real = engine_module.Engine.train_step
    calls = [0]

    def train_step(self, micro_batches):
        calls[0] += 1  # this process's steps; a resumed run counts from its resume
        if os.environ.get("RANK") == "1" and calls[0] == stall_step:
            print(f"[fault] rank 1 stalls {seconds:g} s before step {stall_step}", flush=True)
            time.sleep(seconds)
        return real(self, micro_batches)

    engine_module.Engine.train_step = train_step
    from megagpt.cli import main as cli

    return cli(sys.argv[3:])


if __name__ == "__main__":
    sys.exit(main())
