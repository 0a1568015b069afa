"""Process groups and rank layout, set up once by ``initialize``, which returns the
``ParallelContext`` that callers pass on (no module-level accessors: state is passed).

The layout arithmetic (``dims``) and the context (``context``) need no torch; the
process-group functions (``setup``) are imported on first use, so the planner and
``megagpt --help`` do not import torch.
"""

from typing import Any

from megagpt.parallel.context import MegatronMPU, ParallelContext
from megagpt.parallel.dims import ParallelDims, split_layers

_SETUP = (
    "LaunchEnv",
    "destroy",
    "initialize",
    "is_initialized",
    "resolve_backend",
    "resolve_device",
    "world_size_from_env",
)

__all__ = [  # noqa: PLE0604 (strings all: _SETUP is a tuple of names)
    "MegatronMPU",
    "ParallelContext",
    "ParallelDims",
    "split_layers",
    *_SETUP,
]


def __getattr__(name: str) -> Any:
    if name in _SETUP:
        from megagpt.parallel import setup

        return getattr(setup, name)
    raise AttributeError(f"module 'megagpt.parallel' has no attribute {name!r}")
