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
    assert kw == {"backend": "gloo", "init_method": "env://",
                  "timeout": datetime.timedelta(minutes=7)}


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


def test_initialize_hands_both_decisions_over_on_cuda(monkeypatch):
    """``initialize`` on a CUDA device passes device_id and turns megatron's gloo groups off
    (torch.distributed and megatron-core stubbed: only the hand-over is checked)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    calls = {}
    monkeypatch.setattr(setup, "_DIMS", None)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.setdefault("init", kw))
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 16)
    monkeypatch.setattr(parallel_state, "model_parallel_is_initialized", lambda: False)
    monkeypatch.setattr(parallel_state, "initialize_model_parallel",
                        lambda **kw: calls.setdefault("mp", kw))
    monkeypatch.setattr(setup, "_check_layout", lambda dims: None)
    for key, value in dict(RANK="0", WORLD_SIZE="16", LOCAL_RANK="3").items():
        monkeypatch.setenv(key, value)
    dims = setup.initialize(ParallelConfig(tensor=2, pipeline=2), CUDA3, timeout_minutes=5)
    assert (dims.tp, dims.pp, dims.dp) == (2, 2, 4)
    assert calls["init"]["backend"] == "nccl" and calls["init"]["device_id"] == CUDA3
    assert calls["mp"]["create_gloo_process_groups"] is False


@pytest.fixture
def fake_set_device(monkeypatch):
    """torch.cuda.set_device replaced by a recorder of the environment it would see (the
    driver reads CUDA_DEVICE_MAX_CONNECTIONS when the context is created there)."""
    seen = []
    monkeypatch.setattr(torch.cuda, "set_device",
                        lambda i: seen.append((i, os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS"))))
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
    assert setup.restart_store_prefix({**agent, "TORCHELASTIC_RESTART_COUNT": "0"}) \
        == "megagpt/attempt_0"
    assert setup.restart_store_prefix({**agent, "TORCHELASTIC_RESTART_COUNT": "2"}) \
        == "megagpt/attempt_2"
    # srun / a plain env:// start / c10d without the shared store: a new store each start.
    assert setup.restart_store_prefix({"RANK": "0"}) is None
    assert setup.restart_store_prefix({**agent, "TORCHELASTIC_USE_AGENT_STORE": "False"}) is None
    # Several nodes: per-node restart counts can differ, so no prefix; a warning instead.
    multi = {**agent, "GROUP_WORLD_SIZE": "2", "TORCHELASTIC_MAX_RESTARTS": "3"}
    assert setup.restart_store_prefix(multi) is None
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in setup.restart_warning(multi)
    assert setup.restart_warning(agent) is None


def test_initialize_under_torchrun_hands_the_attempts_store(monkeypatch):
    import torch.distributed as dist
    from megatron.core import parallel_state

    calls = {}
    monkeypatch.setattr(setup, "_DIMS", None)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.setdefault("init", kw))
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)
    monkeypatch.setattr(parallel_state, "model_parallel_is_initialized", lambda: True)
    monkeypatch.setattr(setup, "_check_layout", lambda dims: None)
    monkeypatch.setattr(setup, "_attempt_store",
                        lambda prefix, timeout: calls.setdefault("store", (prefix, timeout)))
    for key, value in dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", GROUP_WORLD_SIZE="1",
                           TORCHELASTIC_USE_AGENT_STORE="True",
                           TORCHELASTIC_RESTART_COUNT="1").items():
        monkeypatch.setenv(key, value)
    setup.initialize(ParallelConfig(), CPU, timeout_minutes=0.5)
    init = calls["init"]
    assert "init_method" not in init and (init["rank"], init["world_size"]) == (1, 2)
    assert init["store"] == ("megagpt/attempt_1", datetime.timedelta(seconds=30))
    assert init["timeout"] == datetime.timedelta(seconds=30)  # parallel.timeout_s=30
