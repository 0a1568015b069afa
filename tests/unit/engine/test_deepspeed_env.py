"""What the engine hands DeepSpeed from the parallel context (pure: no process group)."""

from __future__ import annotations

import os

import pytest
import torch

from megagpt.parallel import ParallelContext, ParallelDims

CPU = torch.device("cpu")


def test_a_lone_process_tells_deepspeed_it_is_local_rank_0(monkeypatch):
    """DeepSpeed reads LOCAL_RANK from the environment (engine and ZeRO-3); a process no
    launcher started has none, and its only local rank is 0."""
    from megagpt.engine.engine import deepspeed_local_rank

    # set then delete: monkeypatch then restores the variable as it was (an absent variable
    # deleted alone is not recorded, and the LOCAL_RANK set here would leak into later tests)
    monkeypatch.setenv("LOCAL_RANK", "unset")
    monkeypatch.delenv("LOCAL_RANK")
    deepspeed_local_rank(ParallelContext.at(ParallelDims(1, 1, 1), 0, CPU))
    assert os.environ["LOCAL_RANK"] == "0"


@pytest.mark.parametrize("world,env", [(1, "3"), (2, None)])
def test_launchers_local_rank_is_left_to_the_launcher(monkeypatch, world, env):
    from megagpt.engine.engine import deepspeed_local_rank

    monkeypatch.setenv("LOCAL_RANK", "unset")  # recorded, so restored afterwards
    if env is None:
        monkeypatch.delenv("LOCAL_RANK")
    else:
        monkeypatch.setenv("LOCAL_RANK", env)
    deepspeed_local_rank(ParallelContext.at(ParallelDims(1, 1, world), 1 % world, CPU))
    assert os.environ.get("LOCAL_RANK") == env


def test_engine_refuses_a_context_without_process_groups():
    from megagpt.config import load_config
    from megagpt.engine import Engine

    cfg = load_config(None, ["model.name=gpt3-tiny"])
    with pytest.raises(ValueError, match="process groups of megagpt.parallel.initialize"):
        Engine(cfg, torch.nn.Linear(2, 2), ParallelContext.at(ParallelDims(1, 1, 1), 0, CPU))
