"""Rank functions of the distributed data tests (run by tests/distributed/launcher.py)."""

from __future__ import annotations

import hashlib

import torch.distributed as dist


def build_indices(
    prefix: str, cache_dir: str, split: str, num_samples: list[int], fail_on_rank: int = -1
) -> dict:
    """build_gpt_datasets on every rank; report what this rank built and what it sees."""
    from megagpt.data import DataError, build_gpt_datasets, gpt_dataset

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    builds = []
    real = gpt_dataset.build_sample_index

    def counting(*args, **kwargs):
        if rank == fail_on_rank:
            raise RuntimeError("disk full")
        builds.append(1)
        return real(*args, **kwargs)

    gpt_dataset.build_sample_index = counting
    try:
        train, _, _ = build_gpt_datasets(
            [prefix], None, split, 16, tuple(num_samples), 7, cache_dir
        )
        digest = hashlib.sha256()
        for i in range(len(train)):
            digest.update(train[i]["tokens"].tobytes())
        result = {
            "builds": len(builds),
            "train": digest.hexdigest(),
            "len": len(train),
            "error": None,
        }
    except (DataError, RuntimeError) as exc:
        result = {"builds": len(builds), "error": f"{type(exc).__name__}: {exc}"}
    dist.barrier()  # every rank got here: nobody was left waiting
    dist.destroy_process_group()
    return result


def build_scheduled(prefixes: list[str], cache_dir: str, schedule: list, num_samples: int) -> dict:
    """build_gpt_datasets with data.weights_schedule on every rank (rank 0 builds the blend
    index, the other waits and loads it); report which dataset each sample of this rank's
    micro-batches comes from, as the trainer's sampler would hand them out."""
    from megagpt.data import DistributedBatchSampler, blending, build_gpt_datasets

    dist.init_process_group("gloo")
    builds = []
    real = blending.build_schedule_index

    def counting(*args, **kwargs):
        builds.append(1)
        return real(*args, **kwargs)

    blending.build_schedule_index = counting
    train, _, _ = build_gpt_datasets(
        prefixes, None, "1", 16, (num_samples, 0, 0), 5, cache_dir, weights_schedule=schedule
    )
    sampler = DistributedBatchSampler(len(train), 0, 4, dist.get_rank(), dist.get_world_size())
    samples = {i: int(train.dataset_index[i]) for batch in sampler for i in batch}
    dist.barrier()
    dist.destroy_process_group()
    return {"builds": len(builds), "samples": samples}
