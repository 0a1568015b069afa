"""DistributedBatchSampler: rank split, resume equivalence with the same and a changed DP size."""

from __future__ import annotations

import pytest

from megagpt.data import DataError, DistributedBatchSampler


def global_batches(total, consumed, micro, dp, grad_accum):
    """Run every rank's sampler in lockstep; return the global batches as lists of indices.

    Within a global batch the order is (accumulation step, rank, position), which is how the
    trainer would lay them out.
    """
    samplers = [iter(DistributedBatchSampler(total, consumed, micro, r, dp)) for r in range(dp)]
    batches = []
    while True:
        batch = []
        try:
            for _ in range(grad_accum):
                for s in samplers:
                    batch.extend(next(s))
        except StopIteration:
            return batches
        batches.append(batch)


def test_ranks_get_disjoint_contiguous_micro_batches():
    micro = [list(DistributedBatchSampler(24, 0, 3, r, 2)) for r in range(2)]
    assert micro[0] == [[0, 1, 2], [6, 7, 8], [12, 13, 14], [18, 19, 20]]
    assert micro[1] == [[3, 4, 5], [9, 10, 11], [15, 16, 17], [21, 22, 23]]
    assert len(DistributedBatchSampler(24, 0, 3, 0, 2)) == 4


def test_resume_with_the_same_dp_continues_exactly():
    full = global_batches(total=96, consumed=0, micro=2, dp=2, grad_accum=3)
    resumed = global_batches(total=96, consumed=5 * 12, micro=2, dp=2, grad_accum=3)
    assert resumed == full[5:]


@pytest.mark.parametrize(
    ("micro", "dp", "grad_accum"), [(2, 4, 1), (1, 8, 1), (8, 1, 1), (4, 1, 2), (1, 2, 4)]
)
def test_resume_with_another_dp_sees_the_same_global_batches(micro, dp, grad_accum):
    assert micro * dp * grad_accum == 8
    full = global_batches(total=80, consumed=0, micro=2, dp=2, grad_accum=2)
    resumed = global_batches(total=80, consumed=3 * 8, micro=micro, dp=dp, grad_accum=grad_accum)
    assert len(resumed) == len(full) - 3
    for before, after in zip(full[3:], resumed):
        assert sorted(before) == sorted(after)  # the same samples in every global batch


def test_incomplete_last_step_is_dropped_on_every_rank():
    counts = [len(list(DistributedBatchSampler(10, 0, 2, r, 2))) for r in range(2)]
    assert counts == [2, 2]  # samples 8 and 9 cannot fill a step on both ranks


def test_state_dict_round_trip():
    s = DistributedBatchSampler(100, 0, 2, 0, 2)
    s.load_state_dict({"consumed_samples": 40})
    assert s.state_dict() == {"consumed_samples": 40}
    assert next(iter(s)) == [40, 41]
    with pytest.raises(DataError, match="outside"):
        s.load_state_dict({"consumed_samples": 101})


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((10, 11, 1, 0, 1), "consumed_samples 11"),
        ((10, 0, 0, 0, 1), "micro_batch_size"),
        ((10, 0, 1, 2, 2), "data_parallel_rank 2"),
        ((10, 0, 1, 0, 0), "data_parallel_size=0"),
        ((-1, 0, 1, 0, 1), "total_samples"),
    ],
)
def test_bad_arguments(args, message):
    with pytest.raises(DataError, match=message):
        DistributedBatchSampler(*args)
