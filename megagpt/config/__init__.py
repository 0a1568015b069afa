"""Typed configuration: dataclasses, the size registry, YAML loading and validation."""

from megagpt.config.loader import ConfigError, dump_yaml, load_config
from megagpt.config.schema import (
    CheckpointConfig,
    Config,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
)
from megagpt.config.sizes import from_name, get_size, parameter_count
from megagpt.config.validate import (
    accumulation_steps,
    data_parallel_size,
    grad_accumulation_steps,
    validate,
)

__all__ = [
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "RunConfig",
    "TrainConfig",
    "accumulation_steps",
    "data_parallel_size",
    "dump_yaml",
    "from_name",
    "get_size",
    "grad_accumulation_steps",
    "load_config",
    "parameter_count",
    "validate",
]
