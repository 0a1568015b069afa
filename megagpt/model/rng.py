"""Dropout randomness of the tensor-parallel region.

Attention probabilities are dropped per head, and each TP rank holds different heads; with one
generator seeded alike on every TP rank, head i of rank 0 and head i of rank 1 would share their
masks. Under sequence parallelism the residual dropouts act on each rank's own sequence chunk, with
the same problem. Megatron keeps a separate "model-parallel" RNG stream for these regions; this is
ours: a per-TP-rank generator that hands one seed to each dropout call, which then runs with the
device's default generator forked to that seed. The replicated regions (hidden dropout without
sequence parallelism) keep the default generator, identical on every TP rank, so their masks
agree across TP ranks as they must.

Seeds are drawn outside activation checkpointing and passed into the recomputed function, so a
recompute redraws the same masks. The generator's state is part of the per-rank RNG streams a
checkpoint stores, for an exact resume.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

# Offset of the TP-region streams from the run seed: any constant keeps them apart from the
# default stream (seeded with the run seed) and from each other (one stream per TP rank).
TP_REGION_SEED_OFFSET = 2718


class TensorParallelRNG:
    """Hands out one seed per dropout call of the tensor-parallel region."""

    def __init__(self, seed: int = 0, tp_rank: int = 0):
        self.generator = torch.Generator()
        self.seed(seed, tp_rank)

    def seed(self, seed: int, tp_rank: int) -> None:
        """Seed this rank's stream: distinct per TP rank, reproducible from the run seed."""
        self.generator.manual_seed(seed + TP_REGION_SEED_OFFSET * (tp_rank + 1))

    def next_seed(self) -> int:
        return int(torch.randint(0, 2**62, (1,), generator=self.generator))

    def get_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


@contextmanager
def forked_rng(seed: int, device: torch.device):
    """Inside: ``device``'s default generator seeded with ``seed``; after: its previous state."""
    if device.type == "cuda":
        saved = torch.cuda.get_rng_state(device)
        torch.cuda.manual_seed(seed)
        try:
            yield
        finally:
            torch.cuda.set_rng_state(saved, device)
    else:
        saved = torch.get_rng_state()
        torch.default_generator.manual_seed(seed)
        try:
            yield
        finally:
            torch.set_rng_state(saved)
