"""Process-group setup decisions for NCCL clusters, checked on CPU with a fake CUDA device.

``torch.device("cuda", 3)`` is a plain value object: building it needs no GPU, so what
``initialize`` would hand torch.distributed and megatron-core on a GPU node is checked here.
"""

from __future__ import annotations

import datetime
import os

import pytest
import torch

from megagpt.config.schema import ParallelConfig
from megagpt.parallel import setup

CUDA3 = torch.device("cuda", 3)
CPU = torch.device("cpu")


def test_nccl_on_cuda_initialises_eagerly_on_its_own_gpu():
    kw = setup.init_process_group_kwargs("nccl", CUDA3, 30)
    assert kw["device_id"] == CUDA3  # NCCL communicator formed at init, sub-groups split
    assert kw["backend"] == "nccl" and kw["init_method"] == "env://"
    assert kw["timeout"] == datetime.timedelta(minutes=30)


def test_gloo_on_cpu_is_started_as_before():
    kw = setup.init_process_group_kwargs("gloo", CPU, 7)
    assert kw == {
        "backend": "gloo",
        "init_method": "env://",
        "timeout": datetime.timedelta(minutes=7),
    }


def test_no_gloo_groups_under_nccl_but_kept_under_gloo():
    cfg = ParallelConfig(tensor=2, pipeline=4)
    nccl = setup.model_parallel_kwargs(cfg, setup.resolve_backend("auto", CUDA3), 30)
    assert nccl["create_gloo_process_groups"] is False
    assert (nccl["tensor_model_parallel_size"], nccl["pipeline_model_parallel_size"]) == (2, 4)
    assert nccl["order"] == "tp-cp-ep-dp-pp" and nccl["distributed_timeout_minutes"] == 30
    gloo = setup.model_parallel_kwargs(cfg, setup.resolve_backend("auto", CPU), 30)
    assert gloo["create_gloo_process_groups"] is True


def test_the_kwargs_are_accepted_by_the_installed_libraries():
    # A renamed keyword would only fail on a cluster; check the names against the signatures.
    import inspect

    import torch.distributed as dist
    from megatron.core import parallel_state

    accepted = inspect.signature(parallel_state.initialize_model_parallel).parameters
    assert set(setup.model_parallel_kwargs(ParallelConfig(), "nccl", 30)) <= set(accepted)
    accepted = inspect.signature(dist.init_process_group).parameters
    assert set(setup.init_process_group_kwargs("nccl", CUDA3, 30)) <= set(accepted)


def _stub_groups(monkeypatch, *, world: int, rank: int, model_parallel: bool) -> dict:
    """torch.distributed and megatron-core's parallel_state replaced by recorders: what
    ``initialize`` hands them is checked, no process group starts. Returns the calls."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    calls: dict = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.setdefault("init", kw))
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: world)
    monkeypatch.setattr(dist, "get_rank", lambda *a, **k: rank)
    monkeypatch.setattr(ps, "model_parallel_is_initialized", lambda: model_parallel)
    monkeypatch.setattr(ps, "initialize_model_parallel", lambda **kw: calls.setdefault("mp", kw))
    for name in (
        "tensor_model_parallel",
        "pipeline_model_parallel",
        "data_parallel",
        "model_parallel",
    ):
        monkeypatch.setattr(ps, f"get_{name}_group", lambda n=name: f"<{n} group>")
    monkeypatch.setattr(ps, "get_tensor_model_parallel_world_size", lambda: 1)
    monkeypatch.setattr(ps, "get_pipeline_model_parallel_world_size", lambda: 1)
    monkeypatch.setattr(setup, "_check_layout", lambda ctx: None)
    return calls


def test_initialize_hands_both_decisions_over_on_cuda(monkeypatch):
    """``initialize`` on a CUDA device passes device_id and turns megatron's gloo groups off
    (torch.distributed and megatron-core stubbed: only the hand-over is checked)."""
    calls = _stub_groups(monkeypatch, world=16, rank=0, model_parallel=False)
    env = dict(RANK="0", WORLD_SIZE="16", LOCAL_RANK="3", MASTER_ADDR="node0", MASTER_PORT="6000")
    ctx = setup.initialize(ParallelConfig(tensor=2, pipeline=2), CUDA3, timeout_minutes=5, env=env)
    assert (ctx.dims.tp, ctx.dims.pp, ctx.dims.dp) == (2, 2, 4)
    assert ctx.device == CUDA3 and ctx.backend == "nccl"
    assert calls["init"]["backend"] == "nccl" and calls["init"]["device_id"] == CUDA3
    assert (calls["init"]["rank"], calls["init"]["world_size"]) == (0, 16)
    assert calls["mp"]["create_gloo_process_groups"] is False


@pytest.fixture
def fake_set_device(monkeypatch):
    """torch.cuda.set_device replaced by a recorder of the environment it would see (the
    driver reads CUDA_DEVICE_MAX_CONNECTIONS when the context is created there)."""
    seen = []
    monkeypatch.setattr(
        torch.cuda,
        "set_device",
        lambda i: seen.append((i, os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS"))),
    )
    monkeypatch.setenv("LOCAL_RANK", "3")
    return seen


def test_cuda_device_max_connections_set_before_the_context(monkeypatch, fake_set_device):
    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    assert setup.resolve_device("cuda") == CUDA3
    assert fake_set_device == [(3, "1")]


def test_cuda_device_max_connections_keeps_the_users_value(monkeypatch, fake_set_device):
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "8")
    setup.resolve_device("cuda")
    assert fake_set_device == [(3, "8")]


def test_cpu_leaves_cuda_device_max_connections_alone(monkeypatch, fake_set_device):
    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    assert setup.resolve_device("cpu") == CPU
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in os.environ and fake_set_device == []


def test_each_torchrun_attempt_gets_its_own_store_keys():
    """torchrun's agent store outlives a restart: without a prefix per attempt the restarted
    ranks read the dead attempt's gloo/NCCL addresses and fail ("Connection refused")."""
    agent = {"TORCHELASTIC_USE_AGENT_STORE": "True", "GROUP_WORLD_SIZE": "1"}
    assert (
        setup.restart_store_prefix({**agent, "TORCHELASTIC_RESTART_COUNT": "0"})
        == "megagpt/attempt_0"
    )
    assert (
        setup.restart_store_prefix({**agent, "TORCHELASTIC_RESTART_COUNT": "2"})
        == "megagpt/attempt_2"
    )
    # srun / a plain env:// start / c10d without the shared store: a new store each start.
    assert setup.restart_store_prefix({"RANK": "0"}) is None
    assert setup.restart_store_prefix({**agent, "TORCHELASTIC_USE_AGENT_STORE": "False"}) is None
    # Several nodes: per-node restart counts can differ, so no prefix; a warning instead.
    multi = {**agent, "GROUP_WORLD_SIZE": "2", "TORCHELASTIC_MAX_RESTARTS": "3"}
    assert setup.restart_store_prefix(multi) is None
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in setup.restart_warning(multi)
    assert setup.restart_warning(agent) is None


def test_initialize_under_torchrun_hands_the_attempts_store(monkeypatch):
    """Under torchrun's agent store: this attempt's prefixed store, the rank and world size
    handed over explicitly, and the environment left as it was."""
    calls = _stub_groups(monkeypatch, world=2, rank=1, model_parallel=True)
    monkeypatch.setattr(
        setup,
        "_attempt_store",
        lambda prefix, timeout, launch: calls.setdefault("store", (prefix, timeout)),
    )
    env = dict(
        RANK="1",
        WORLD_SIZE="2",
        LOCAL_RANK="1",
        GROUP_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT="29400",
        TORCHELASTIC_USE_AGENT_STORE="True",
        TORCHELASTIC_RESTART_COUNT="1",
    )
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    before = dict(os.environ)
    ctx = setup.initialize(ParallelConfig(), CPU, timeout_minutes=0.5)
    assert dict(os.environ) == before and (ctx.rank, ctx.dp_rank, ctx.dims.dp) == (1, 1, 2)
    init = calls["init"]
    assert "init_method" not in init and (init["rank"], init["world_size"]) == (1, 2)
    assert init["store"] == ("megagpt/attempt_1", datetime.timedelta(seconds=30))
    assert init["timeout"] == datetime.timedelta(seconds=30)  # parallel.timeout_s=30


def test_launch_env_is_read_from_the_launchers_variables():
    lone = setup.LaunchEnv.from_env({})
    assert lone.alone and (lone.rank, lone.world_size, lone.local_rank) == (0, 1, 0)
    run = setup.LaunchEnv.from_env(
        dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", MASTER_ADDR="node0", MASTER_PORT="6000")
    )
    assert not run.alone and run.master == ("node0", 6000) and run.store_prefix is None
    assert (run.rank, run.world_size, run.local_rank) == (3, 4, 1)
    # One process a launcher started (MASTER_ADDR given) still rendezvouses as it says.
    assert not setup.LaunchEnv.from_env(dict(MASTER_ADDR="node0", MASTER_PORT="1")).alone


@pytest.mark.parametrize(
    "env,match",
    [
        (dict(RANK="x", WORLD_SIZE="2"), "RANK='x' is not an integer"),
        (dict(RANK="2", WORLD_SIZE="2"), "RANK=2 outside WORLD_SIZE=2"),
        (dict(MASTER_ADDR="a", MASTER_PORT="p"), "MASTER_PORT='p'"),
    ],
)
def test_launch_env_names_a_malformed_variable(env, match):
    with pytest.raises(ValueError, match=match):
        setup.LaunchEnv.from_env(env)


def test_a_lone_process_gets_an_in_memory_store_and_explicit_rank():
    import torch.distributed as dist

    kw = setup.init_process_group_kwargs("gloo", CPU, 7, setup.LaunchEnv.from_env({}))
    assert "init_method" not in kw and isinstance(kw["store"], dist.HashStore)
    assert (kw["rank"], kw["world_size"]) == (0, 1)
    launched = setup.LaunchEnv.from_env(
        dict(RANK="1", WORLD_SIZE="2", MASTER_ADDR="h", MASTER_PORT="5")
    )
    kw = setup.init_process_group_kwargs("gloo", CPU, 7, launched)
    assert kw["init_method"] == "env://" and (kw["rank"], kw["world_size"]) == (1, 2)


def test_initialize_alone_leaves_the_environment_alone(monkeypatch):
    """A lone `megagpt train` used to get RANK/WORLD_SIZE/LOCAL_RANK written into its
    environment (inherited by any child process); the context carries them instead."""
    calls = _stub_groups(monkeypatch, world=1, rank=0, model_parallel=False)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    before = dict(os.environ)
    ctx = setup.initialize(ParallelConfig(), CPU)
    assert dict(os.environ) == before
    assert (calls["init"]["rank"], calls["init"]["world_size"]) == (0, 1)
    assert (ctx.rank, ctx.tp_rank, ctx.pp_rank, ctx.dp_rank) == (0, 0, 0, 0)
    assert (ctx.tp_group, ctx.dp_group, ctx.mp_group) == (
        "<tensor_model_parallel group>",
        "<data_parallel group>",
        "<model_parallel group>",
    )


def test_initialize_refuses_a_second_layout(monkeypatch):
    """megatron-core keeps one set of groups per process: another TP/PP is an error."""
    _stub_groups(monkeypatch, world=4, rank=0, model_parallel=True)  # existing TP=1 PP=1
    with pytest.raises(
        RuntimeError, match="already set up for TP=1 PP=1; this call asks for TP=2 PP=1"
    ):
        setup.initialize(ParallelConfig(tensor=2), CPU, env={})
