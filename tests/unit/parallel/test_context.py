"""The parallel context and DeepSpeed's ``mpu`` over it: pure logic, no process group."""

from __future__ import annotations

import itertools

import pytest
import torch

from megagpt.parallel import MegatronMPU, ParallelContext, ParallelDims

CPU = torch.device("cpu")
LAYOUTS = [
    ParallelDims(tp=1, pp=1, dp=1),
    ParallelDims(tp=2, pp=1, dp=3),
    ParallelDims(tp=2, pp=2, dp=2),
    ParallelDims(tp=4, pp=3, dp=2),
]


@pytest.mark.parametrize("dims", LAYOUTS, ids=str)
def test_every_rank_sits_in_one_group_of_each_kind_covering_the_world(dims):
    contexts = [ParallelContext.at(dims, r, CPU) for r in range(dims.world)]
    for kind, size in (("tp_ranks", dims.tp), ("pp_ranks", dims.pp), ("dp_ranks", dims.dp)):
        groups = {tuple(getattr(c, kind)) for c in contexts}
        assert all(len(g) == size for g in groups)
        members = sorted(itertools.chain.from_iterable(groups))
        assert members == list(range(dims.world)), kind  # disjoint and covering
        for c in contexts:
            assert c.rank in getattr(c, kind)
    for c in contexts:
        # A rank's coordinate along an axis is its position in that axis's group.
        assert c.tp_ranks.index(c.rank) == c.tp_rank
        assert c.dp_ranks.index(c.rank) == c.dp_rank
        assert c.pp_ranks.index(c.rank) == c.pp_rank
        assert dims.rank(c.pp_rank, c.dp_rank, c.tp_rank) == c.rank


@pytest.mark.parametrize("dims", LAYOUTS, ids=str)
def test_groups_are_the_ones_megatron_core_builds(dims):
    """megatron-core (order tp-cp-ep-dp-pp) must form exactly these groups, or collectives and
    checkpoint shards go to the wrong peers; its rank generator is pure arithmetic too."""
    from megatron.core.parallel_state import RankGenerator

    gen = RankGenerator(tp=dims.tp, ep=1, dp=dims.dp, pp=dims.pp, cp=1, order="tp-cp-ep-dp-pp")
    for kind, token in (("tp_ranks", "tp"), ("dp_ranks", "dp"), ("pp_ranks", "pp")):
        ours = {tuple(getattr(ParallelContext.at(dims, r, CPU), kind)) for r in range(dims.world)}
        assert ours == {tuple(g) for g in gen.get_ranks(token)}, kind


def test_stage_and_writer_flags():
    dims = ParallelDims(tp=2, pp=3, dp=2)
    first, middle, last = (ParallelContext.at(dims, dims.rank(p, 1, 1), CPU) for p in range(3))
    assert (first.is_first_stage, first.is_last_stage) == (True, False)
    assert (middle.is_first_stage, middle.is_last_stage) == (False, False)
    assert (last.is_first_stage, last.is_last_stage) == (False, True)
    assert not first.writes_shards  # DP rank 1: DP rank 0 holds the same shard and writes it
    assert ParallelContext.at(dims, dims.rank(0, 0, 1), CPU).writes_shards


def test_a_context_whose_coordinates_disagree_with_its_rank_is_refused():
    dims = ParallelDims(tp=2, pp=1, dp=2)
    with pytest.raises(ValueError, match=r"rank 1 .* sits at \(pp, dp, tp\)=\(0, 0, 1\)"):
        ParallelContext(
            dims=dims,
            rank=1,
            tp_rank=0,
            pp_rank=0,
            dp_rank=1,
            tp_group=None,
            pp_group=None,
            dp_group=None,
            device=CPU,
            backend="gloo",
        )
    with pytest.raises(ValueError, match="rank 4 outside world of 4"):
        ParallelContext.at(dims, 4, CPU)


def test_context_is_immutable():
    ctx = ParallelContext.at(ParallelDims(1, 1, 1), 0, CPU)
    with pytest.raises(AttributeError):
        ctx.rank = 1  # type: ignore[misc]


def test_mpu_answers_deepspeed_from_the_context():
    dims = ParallelDims(tp=2, pp=1, dp=3)
    ctx = ParallelContext.at(dims, 5, CPU, tp_group="TP", dp_group="DP", pp_group="PP")
    mpu = MegatronMPU(ctx)
    # Old Megatron's "model parallel" and DeepSpeed's "slice parallel" mean tensor parallel.
    for prefix in ("tensor_model", "model", "slice"):
        assert getattr(mpu, f"get_{prefix}_parallel_rank")() == 1
        assert getattr(mpu, f"get_{prefix}_parallel_world_size")() == 2
        assert getattr(mpu, f"get_{prefix}_parallel_group")() == "TP"
    assert mpu.get_tensor_model_parallel_src_rank() == 4  # TP rank 0 of ranks [4, 5]
    assert (
        mpu.get_data_parallel_rank(),
        mpu.get_data_parallel_world_size(),
        mpu.get_data_parallel_group(),
    ) == (2, 3, "DP")
    assert (
        mpu.get_pipeline_model_parallel_rank(),
        mpu.get_pipeline_model_parallel_world_size(),
        mpu.get_pipeline_model_parallel_group(),
    ) == (0, 1, "PP")


def test_mpu_offers_no_sequence_parallelism():
    """DeepSpeed switches to its Ulysses sequence parallelism when its mpu has these names
    (``hasattr``); megagpt's sequence parallelism is megatron-core's, so they must be absent."""
    mpu = MegatronMPU(ParallelContext.at(ParallelDims(1, 1, 1), 0, CPU))
    for name in (
        "initialize_sequence_parallel",
        "get_sequence_parallel_world_size",
        "get_sequence_parallel_group",
        "get_sequence_data_parallel_group",
    ):
        assert not hasattr(mpu, name), name
