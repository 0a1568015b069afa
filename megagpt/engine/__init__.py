"""DeepSpeed behind one package: its config generated from ours, the engine, the step.

- ``ds_config``   the generated DeepSpeed JSON (a pure function of the config; no deepspeed import)
- ``accelerator`` DeepSpeed's accelerator chosen from the resolved device, before its import
- ``engine``      model wrapping (plain or pipeline), the training and evaluation step, checkpoints
- ``optim_state`` one adapter per DeepSpeed optimizer wrapper for the fp32 master and Adam state

Only this package imports deepspeed, and only through ``accelerator.import_deepspeed(device)``;
importing the package itself imports nothing from deepspeed, so the device can be resolved first.
"""

from typing import Any

from megagpt.engine.ds_config import deepspeed_config, deepspeed_zero_stage

__all__ = ["Engine", "build_model", "deepspeed_config", "deepspeed_zero_stage"]


def __getattr__(name: str) -> Any:
    # The engine module is loaded on first use: it is free of deepspeed imports at module level
    # too, but keeping it lazy keeps `megagpt.engine.deepspeed_config` importable by the planner
    # and unit tests without megatron-core's model code.
    if name in ("Engine", "build_model"):
        from megagpt.engine import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'megagpt.engine' has no attribute {name!r}")
