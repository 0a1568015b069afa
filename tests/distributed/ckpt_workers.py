"""Worker functions for the checkpoint/conversion tests (run on every rank by launcher.py)."""

from __future__ import annotations

import torch


def local_shards_of_model_dir(directory: str, tp: int) -> dict:
    """Load a model directory at TP=``tp``; return this rank's local parameter shards by
    canonical name (as lists), to compare with another tool's shards. The word embedding is
    the padded one (equal to unpadded shards when the vocabulary is a multiple of 128 x tp)."""
    from megagpt import parallel
    from megagpt.checkpoint import load_into, load_tensors, read_config
    from megagpt.config import ParallelConfig
    from megagpt.model import GPTModel, canonical_parameters, megatron_config

    cfg = read_config(directory)
    pcfg = ParallelConfig(tensor=tp)
    ctx = parallel.initialize(pcfg, torch.device("cpu"))
    model = GPTModel(cfg, megatron_config(cfg, pcfg))
    load_into(model, load_tensors(directory), cfg, ctx.tp_rank, tp)
    out = {name: p.detach().tolist() for name, p in canonical_parameters(model)}
    parallel.destroy()
    return out
