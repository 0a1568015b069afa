"""DeepSpeed behind one module: its config generated from ours, the engine, the step.

Importing this package imports deepspeed; nothing else in megagpt does.
"""

from megagpt.engine.deepspeed_engine import Engine, build_model, deepspeed_config

__all__ = ["Engine", "build_model", "deepspeed_config"]
