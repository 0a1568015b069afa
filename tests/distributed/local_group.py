"""A single-process gloo group inside the test process, for the in-process tests that need one
(DeepSpeed's engine wants a process group even for one rank)."""

from __future__ import annotations

import os

import torch


class _LocalGroup:
    """A single-process gloo group for the duration of a ``with``, unless one already exists
    (``.ctx``: its ParallelContext); the environment variables it sets are restored."""

    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

    def __enter__(self):
        from megagpt import parallel
        from megagpt.config import ParallelConfig

        self.saved = {k: os.environ.get(k) for k in self.keys}
        self.owner = not parallel.is_initialized()
        # A group already there is reused (initialize returns a context over it).
        self.ctx = parallel.initialize(ParallelConfig(backend="gloo"), torch.device("cpu"))
        return self

    def __exit__(self, *exc):
        from megagpt import parallel

        if self.owner:
            parallel.destroy()
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
