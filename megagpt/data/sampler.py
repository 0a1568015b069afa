"""Data-parallel, micro-batch-aware batch sampler with a resumable position.

The global sample order is simply ``0, 1, 2, ...`` (datasets are already shuffled): every
step, the next ``micro_batch_size * data_parallel_size`` samples are cut into one contiguous
micro-batch per rank. A global batch (``micro * grad_accum * dp`` samples) is therefore always
the same consecutive range of sample indices, however it is divided among ranks and
accumulation steps -- so a run resumed at ``consumed_samples`` with a different data-parallel
size (and the same global batch size) sees exactly the global batches an uninterrupted run
would have seen.

``consumed_samples`` counts global samples. Checkpoint the trainer's own count of consumed
samples, not a count of what this sampler yielded: a DataLoader prefetches ahead of training.
"""

from __future__ import annotations

from collections.abc import Iterator

from megagpt.data.errors import DataError


class DistributedBatchSampler:
    """Yield this rank's micro-batches of dataset indices, starting at ``consumed_samples``.

    Args:
        total_samples: samples in the run (indices ``0 .. total_samples - 1``); usually
            ``train_iters * global_batch_size``, at most ``len(dataset)``.
        consumed_samples: global samples already trained on (resume position).
        micro_batch_size: samples per micro-batch per rank.
        data_parallel_rank: this rank's index in the data-parallel group.
        data_parallel_size: ranks in the data-parallel group.

    A trailing step with fewer than ``micro_batch_size * data_parallel_size`` samples is
    dropped: ranks must all take the same number of steps.
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
    ) -> None:
        if total_samples < 0:
            raise DataError(f"total_samples must be >= 0, got {total_samples}")
        if micro_batch_size < 1:
            raise DataError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if data_parallel_size < 1 or not 0 <= data_parallel_rank < data_parallel_size:
            raise DataError(
                f"data_parallel_rank {data_parallel_rank} is not in "
                f"[0, data_parallel_size={data_parallel_size})"
            )
        if not 0 <= consumed_samples <= total_samples:
            raise DataError(
                f"consumed_samples {consumed_samples} is outside [0, total_samples="
                f"{total_samples}]; the checkpoint's position does not fit this run's data"
            )
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size

    @property
    def samples_per_step(self) -> int:
        """Global samples consumed by one micro-batch step on all data-parallel ranks."""
        return self.micro_batch_size * self.data_parallel_size

    def __len__(self) -> int:
        """Micro-batches this rank will yield."""
        return (self.total_samples - self.consumed_samples) // self.samples_per_step

    def __iter__(self) -> Iterator[list[int]]:
        step = self.samples_per_step
        first = self.consumed_samples + self.data_parallel_rank * self.micro_batch_size
        for _ in range(len(self)):
            yield list(range(first, first + self.micro_batch_size))
            first += step

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        consumed = int(state["consumed_samples"])
        if not 0 <= consumed <= self.total_samples:
            raise DataError(
                f"consumed_samples {consumed} is outside [0, total_samples={self.total_samples}]"
            )
        self.consumed_samples = consumed
