"""Process groups and rank layout (ParallelDims), set up once by ``initialize``.

The layout arithmetic (``dims``) needs no torch; the process-group functions (``setup``) are
imported on first use, so the planner and ``megagpt --help`` do not import torch.
"""

from megagpt.parallel.dims import ParallelDims, split_layers

_SETUP = ("MegatronMPU", "destroy", "dp_group", "dp_rank", "initialize",
          "is_initialized", "pp_rank", "resolve_backend", "resolve_device", "tp_group", "tp_rank",
          "world_size_from_env")

__all__ = [  # noqa: PLE0604 (strings all: _SETUP is a tuple of names)
    "ParallelDims", "dims", "split_layers", *_SETUP]


def dims() -> ParallelDims:
    """This process's layout (``setup.dims``). A function here, not the ``dims`` submodule: the
    name has always meant this function at package level."""
    from megagpt.parallel.setup import dims as current

    return current()


def __getattr__(name: str):
    if name in _SETUP:
        from megagpt.parallel import setup

        return getattr(setup, name)
    raise AttributeError(f"module 'megagpt.parallel' has no attribute {name!r}")
