"""Process groups and rank layout (ParallelDims), set up once by ``initialize``."""

from megagpt.parallel.dims import ParallelDims, split_layers
from megagpt.parallel.setup import (
    MegatronMPU,
    destroy,
    dims,
    dp_group,
    dp_rank,
    initialize,
    is_initialized,
    pp_rank,
    resolve_backend,
    resolve_device,
    tp_group,
    tp_rank,
    world_size_from_env,
)

__all__ = [
    "MegatronMPU", "ParallelDims", "destroy", "dims", "dp_group", "dp_rank", "initialize",
    "is_initialized", "pp_rank", "resolve_backend", "resolve_device", "split_layers",
    "tp_group", "tp_rank", "world_size_from_env",
]
