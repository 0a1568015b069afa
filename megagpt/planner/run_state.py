"""Where a run stands, for launchers deciding whether to requeue: ``python -m
megagpt.planner.run_state CONFIG [KEY=VALUE ...]`` prints ``RUN_DIR LATEST_STEP TARGET_STEPS``.

LATEST_STEP is the step of ``<run.dir>/checkpoints/latest`` (0 when there is none); TARGET_STEPS
is ``train.steps``. No process group, no model: reads the config and one small file.

Torch-free: importing torch and megatron-core costs 10+ s on a login node, too slow for a check
that runs at every job start and end. ``megagpt.checkpoint.tags`` (the naming of the checkpoints
folder, shared with ``megagpt.checkpoint.manager``) imports only the standard library.
"""

from __future__ import annotations

import sys

from megagpt.checkpoint.tags import checkpoint_dir, latest_step
from megagpt.config import ConfigError, load_config


def run_state(config: str, overrides: list[str]) -> tuple[str, int, int]:
    """(run.dir, step of the latest complete checkpoint or 0, train.steps) for a config."""
    cfg = load_config(config, overrides)
    return cfg.run.dir, latest_step(checkpoint_dir(cfg.run.dir)), cfg.train.steps


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m megagpt.planner.run_state CONFIG [KEY=VALUE ...]", file=sys.stderr)
        return 2
    try:
        run_dir, step, steps = run_state(argv[0], argv[1:])
    except (ConfigError, FileNotFoundError) as e:
        print(f"run_state: error: {e}", file=sys.stderr)
        return 2
    print(run_dir, step, steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
