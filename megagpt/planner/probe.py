"""Check the planner's memory model against a real CPU training run on this machine.

``python -m megagpt.planner.probe --config RECIPE [KEY=VALUE ...]`` trains a few steps in this
process (one rank, gloo, CPU) and prints, as JSON, the peak resident memory the run added
(``VmHWM`` after minus ``VmRSS`` just before the model is built) next to the planner's estimate
for the same config (no CUDA reserve; attention scores materialised, as CPU SDPA does).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(config: str, overrides: list[str]) -> dict:
    """Train ``config`` here and return measured and predicted bytes (see the module doc)."""
    from megagpt.config import load_config
    from megagpt.planner.memory import Layout, memory_per_stage, peak_stage
    from megagpt.training.trainer import Trainer

    cfg = load_config(config, overrides)
    marks: dict[str, int] = {}

    class _Probe(Trainer):
        def _build_engine(self):
            marks["before_kib"] = _status_kib("VmRSS")
            try:  # reset the high-water mark to now (Linux >= 4.0); else it includes setup
                Path("/proc/self/clear_refs").write_text("5")
                marks["hwm_reset"] = 1
            except OSError:
                marks["hwm_reset"] = 0
            super()._build_engine()

    trainer = _Probe(cfg)
    trainer.run()
    peak_kib = _status_kib("VmHWM")
    measured = (peak_kib - marks["before_kib"]) * 1024
    layout = Layout.from_config(cfg, 1)
    stages = memory_per_stage(cfg.model, layout, precision=cfg.train.precision,
                              global_batch=cfg.train.global_batch_size, flash=False, cuda=False)
    b = peak_stage(stages)
    return {
        "measured_bytes": measured, "predicted_bytes": b.total,
        "ratio": b.total / measured if measured > 0 else None,
        "predicted": {k: v * 2**30 for k, v in b.as_gib().items()},
        "params": b.params, "hwm_reset": bool(marks["hwm_reset"]),
        "layout": layout.describe(), "precision": cfg.train.precision,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or argv[0] != "--config":
        print("usage: python -m megagpt.planner.probe --config RECIPE [KEY=VALUE ...]",
              file=sys.stderr)
        return 2
    result = measure(argv[1], argv[2:])
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    print("PROBE " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
