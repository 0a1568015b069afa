"""The rank layout, as pure arithmetic (no process groups): usable for dry runs and planning.

Layout convention, shared by megatron-core (order "tp-cp-ep-dp-pp") and DeepSpeed's
PipeModelDataParallelTopology (axes pipe, data, model): tensor-parallel rank varies fastest, then
data-parallel, then pipeline stage.  rank = tp + TP * (dp + DP * pp).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelDims:
    """The sizes of the three parallel axes (tensor, pipeline, data); ``world`` = tp x pp x dp.
    The group methods give the global ranks sharing a rank's group along one axis."""

    tp: int
    pp: int
    dp: int

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    @classmethod
    def from_world(cls, tp: int, pp: int, world: int) -> ParallelDims:
        """Dims for ``world`` ranks with TP=tp, PP=pp (DP derived); ValueError if they don't fit."""
        if world % (tp * pp):
            raise ValueError(f"world size {world} is not divisible by TP x PP = {tp} x {pp}")
        return cls(tp=tp, pp=pp, dp=world // (tp * pp))

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(pp, dp, tp) coordinates of a global rank."""
        if not 0 <= rank < self.world:
            raise ValueError(f"rank {rank} outside world of {self.world}")
        return rank // (self.tp * self.dp), (rank // self.tp) % self.dp, rank % self.tp

    def rank(self, pp: int, dp: int, tp: int) -> int:
        """The global rank at coordinates (pp, dp, tp): the inverse of ``coords``."""
        return tp + self.tp * (dp + self.dp * pp)

    def tp_group(self, rank: int) -> list[int]:
        pp, dp, _ = self.coords(rank)
        return [self.rank(pp, dp, t) for t in range(self.tp)]

    def dp_group(self, rank: int) -> list[int]:
        pp, _, tp = self.coords(rank)
        return [self.rank(pp, d, tp) for d in range(self.dp)]

    def pp_group(self, rank: int) -> list[int]:
        _, dp, tp = self.coords(rank)
        return [self.rank(p, dp, tp) for p in range(self.pp)]


def split_layers(num_layers: int, stages: int) -> list[range]:
    """Decoder layers per pipeline stage, as contiguous ranges; earlier stages take the extra
    layers when the split is uneven."""
    base, extra = divmod(num_layers, stages)
    out, start = [], 0
    for s in range(stages):
        n = base + (1 if s < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out
