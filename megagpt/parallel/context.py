"""The parallel context: what ``initialize`` set up, handed to the code that needs it.

``megagpt.parallel.initialize`` returns one ``ParallelContext`` per process: the layout
(``ParallelDims``), this rank's coordinates in it, its process groups, its device and backend.
Code receives the context (or the one value it needs) as an argument instead of asking a
module global; that keeps a function's inputs visible in its signature and lets unit tests
build a context for any rank of any layout without starting a process (``ParallelContext.at``).

The one lookup left is megatron-core's own: its tensor-parallel layers ask its
``parallel_state`` module for their group, so ``initialize`` also starts that. DeepSpeed asks
the ``mpu`` object it is given; ``MegatronMPU`` answers it from a context.

No torch import here: the planner and ``megagpt --help`` import ``megagpt.parallel``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from megagpt.parallel.dims import ParallelDims

if TYPE_CHECKING:
    import torch
    from torch.distributed import ProcessGroup


@dataclass(frozen=True)
class ParallelContext:
    """This process's place in the run's layout, its process groups and device.

    ``dims`` are the sizes (tp, pp, dp, world); ``rank`` the global rank and ``tp_rank``,
    ``pp_rank``, ``dp_rank`` its coordinates (``dims.coords(rank)``). The groups are this rank's
    tensor-, pipeline- and data-parallel groups and ``mp_group`` its model-parallel one
    (TP x PP: the ranks that hold one copy of the model). A group is None in a context built
    without process groups (``at`` with no groups: unit tests, planning).
    """

    dims: ParallelDims
    rank: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: ProcessGroup | None
    pp_group: ProcessGroup | None
    dp_group: ProcessGroup | None
    device: torch.device
    backend: str
    mp_group: ProcessGroup | None = None

    def __post_init__(self) -> None:
        # A context whose coordinates disagree with its rank would send collectives to the
        # wrong peers; refuse it where it is made.
        if self.dims.coords(self.rank) != (self.pp_rank, self.dp_rank, self.tp_rank):
            raise ValueError(
                f"rank {self.rank} of {self.dims} sits at (pp, dp, tp)="
                f"{self.dims.coords(self.rank)}, not {(self.pp_rank, self.dp_rank, self.tp_rank)}"
            )

    @classmethod
    def at(
        cls,
        dims: ParallelDims,
        rank: int,
        device: torch.device,
        backend: str = "gloo",
        *,
        tp_group: ProcessGroup | None = None,
        pp_group: ProcessGroup | None = None,
        dp_group: ProcessGroup | None = None,
        mp_group: ProcessGroup | None = None,
    ) -> ParallelContext:
        """The context of global ``rank`` in ``dims`` (coordinates derived from the rank).

        ValueError when the rank lies outside the layout."""
        pp, dp, tp = dims.coords(rank)
        return cls(
            dims=dims,
            rank=rank,
            tp_rank=tp,
            pp_rank=pp,
            dp_rank=dp,
            tp_group=tp_group,
            pp_group=pp_group,
            dp_group=dp_group,
            device=device,
            backend=backend,
            mp_group=mp_group,
        )

    @property
    def tp_ranks(self) -> list[int]:
        """Global ranks of this rank's tensor-parallel group, in TP order."""
        return self.dims.tp_group(self.rank)

    @property
    def pp_ranks(self) -> list[int]:
        """Global ranks of this rank's pipeline, first stage first."""
        return self.dims.pp_group(self.rank)

    @property
    def dp_ranks(self) -> list[int]:
        """Global ranks of this rank's data-parallel group, in DP order."""
        return self.dims.dp_group(self.rank)

    @property
    def is_first_stage(self) -> bool:
        """True on the pipeline's first stage (it embeds the tokens)."""
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        """True on the pipeline's last stage (it computes the logits and the loss)."""
        return self.pp_rank == self.dims.pp - 1

    @property
    def writes_shards(self) -> bool:
        """True on the one data-parallel rank (DP 0) that writes this (pp, tp) position's files:
        every DP rank holds the same model shard."""
        return self.dp_rank == 0


class MegatronMPU:
    """The ``mpu`` DeepSpeed's engine is given (PP = 1): the old Megatron accessor names it
    asks for, answered from a ``ParallelContext``.

    Old Megatron called tensor parallelism "model parallelism" (and DeepSpeed "slice"
    parallelism), so ``get_model_parallel_*`` and ``get_slice_parallel_*`` answer for the TP
    group. The names are exactly those DeepSpeed 0.19 uses and megatron-core provides; DeepSpeed
    tests some with ``hasattr`` (sequence parallelism, ``initialize_sequence_parallel``), so
    what is absent here must stay absent: DeepSpeed's Ulysses sequence parallelism is not ours.
    """

    def __init__(self, ctx: ParallelContext):
        self.ctx = ctx

    # -- tensor parallel (also DeepSpeed's "model" and "slice" parallel) ------------------
    def get_tensor_model_parallel_rank(self) -> int:
        return self.ctx.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.ctx.dims.tp

    def get_tensor_model_parallel_group(self) -> ProcessGroup | None:
        return self.ctx.tp_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        """Global rank of TP rank 0 in this rank's TP group."""
        return self.ctx.tp_ranks[0]

    get_model_parallel_rank = get_tensor_model_parallel_rank
    get_model_parallel_world_size = get_tensor_model_parallel_world_size
    get_model_parallel_group = get_tensor_model_parallel_group
    get_slice_parallel_rank = get_tensor_model_parallel_rank
    get_slice_parallel_world_size = get_tensor_model_parallel_world_size
    get_slice_parallel_group = get_tensor_model_parallel_group

    # -- data parallel ---------------------------------------------------------------------
    def get_data_parallel_rank(self) -> int:
        return self.ctx.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.ctx.dims.dp

    def get_data_parallel_group(self) -> ProcessGroup | None:
        return self.ctx.dp_group

    # -- pipeline parallel -----------------------------------------------------------------
    def get_pipeline_model_parallel_rank(self) -> int:
        return self.ctx.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.ctx.dims.pp

    def get_pipeline_model_parallel_group(self) -> ProcessGroup | None:
        return self.ctx.pp_group
