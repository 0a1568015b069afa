"""Process-group setup, in one place, called once per process.

``initialize(parallel_cfg, device)`` starts torch.distributed (env:// under torchrun/srun, an
in-memory store for a single local process), then megatron-core's model-parallel groups, and
returns the ``ParallelContext`` that callers pass on. The launcher's environment is read
(``LaunchEnv``), never written.
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megagpt.config.schema import ParallelConfig
from megagpt.parallel.context import ParallelContext
from megagpt.parallel.dims import ParallelDims


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher (torchrun, srun, the test launcher) announced in the environment.

    ``master`` is (MASTER_ADDR, MASTER_PORT), None when no launcher started this process;
    ``store_prefix`` the key prefix of this torchrun attempt (``restart_store_prefix``)."""

    rank: int
    world_size: int
    local_rank: int
    master: tuple[str, int] | None
    store_prefix: str | None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> LaunchEnv:
        """Read (only) the launcher's variables; ValueError naming a malformed one."""

        def number(key: str, default: str) -> int:
            value = env.get(key, default)
            try:
                return int(value)
            except ValueError:
                raise ValueError(
                    f"environment variable {key}={value!r} is not an integer (set by the launcher)"
                ) from None

        master = None
        if "MASTER_ADDR" in env:
            master = (env["MASTER_ADDR"], number("MASTER_PORT", "29500"))
        launch = cls(
            rank=number("RANK", "0"),
            world_size=number("WORLD_SIZE", "1"),
            local_rank=number("LOCAL_RANK", "0"),
            master=master,
            store_prefix=None if master is None else restart_store_prefix(env),
        )
        if not 0 <= launch.rank < launch.world_size:
            raise ValueError(
                f"environment variable RANK={launch.rank} outside "
                f"WORLD_SIZE={launch.world_size} (set by the launcher)"
            )
        return launch

    @property
    def alone(self) -> bool:
        """One process that no launcher started (a launcher always gives MASTER_ADDR)."""
        return self.world_size == 1 and self.master is None


def world_size_from_env() -> int:
    """World size the launcher announced (torchrun/srun set WORLD_SIZE), 1 for a plain process."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda:<LOCAL_RANK> when CUDA is available, else cpu; returns the device.

    On CUDA it first sets ``CUDA_DEVICE_MAX_CONNECTIONS=1`` unless the environment already
    says otherwise: megatron-core's tensor/sequence-parallel layers rely on their collectives
    being issued to the GPU in program order, which holds only with one hardware work queue,
    and the driver reads the variable when the CUDA context is created (at ``set_device``).
    Setting it here, not only in ``launch/``, covers a plain ``python -m``/``torchrun`` start.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def resolve_backend(backend: str, device: torch.device) -> str:
    """``parallel.backend`` with 'auto' resolved: nccl on a CUDA device, gloo otherwise."""
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    return backend


def init_process_group_kwargs(
    backend: str, device: torch.device, timeout_minutes: float, launch: LaunchEnv | None = None
) -> dict[str, Any]:
    """Keyword arguments of ``torch.distributed.init_process_group`` for ``backend`` on
    ``device``, for the process ``launch`` describes (None: plain ``env://``).

    Under NCCL on a CUDA device it passes ``device_id``: the communicator is then formed
    inside this call (a broken NCCL setup fails here, at start-up, instead of at the first
    collective) and megatron-core's sub-groups are split from it (``ncclCommSplit``) rather
    than built from scratch, which is what start-up at 1,024 ranks needs. Gloo gets none.

    The rank and world size are given explicitly. A lone process gets an in-memory store (no
    port to race for: a free port picked, then bound, can be taken in between by another
    process); a torchrun attempt on one node its own keys in the agent's store
    (``restart_store_prefix``); any other launch rendezvouses through ``env://``.
    """
    timeout = datetime.timedelta(minutes=timeout_minutes)
    kwargs: dict[str, Any] = {"backend": backend, "init_method": "env://", "timeout": timeout}
    if backend == "nccl" and device.type == "cuda":
        kwargs["device_id"] = device
    if launch is None:
        return kwargs
    kwargs.update(rank=launch.rank, world_size=launch.world_size)
    if launch.alone:
        del kwargs["init_method"]
        kwargs["store"] = dist.HashStore()
    elif launch.store_prefix is not None:
        del kwargs["init_method"]
        kwargs["store"] = _attempt_store(launch.store_prefix, timeout, launch)
    return kwargs


def restart_store_prefix(env: Mapping[str, str] | None = None) -> str | None:
    """Key prefix that isolates this torchrun attempt in the launcher's store, or None.

    Under torchrun the workers' ``env://`` store is the *agent's* TCPStore
    (``TORCHELASTIC_USE_AGENT_STORE=True``; static and c10d rendezvous both share it), and it
    outlives a restart: the keys the previous attempt's ranks published (gloo's and NCCL's
    addresses under ``default_pg/...``) are still there when the restarted ranks look. A fresh
    rank 0 then reads a dead rank's old address and fails with "Connection refused", every
    attempt (torch 2.13 assumes a new store per attempt, which neither rendezvous makes). A
    prefix per ``TORCHELASTIC_RESTART_COUNT`` gives each attempt its own keys.

    Only on one node: each node's agent keeps its own restart count (an agent whose workers
    were healthy restarts them for the others without counting), so across nodes the counts
    can differ and would split the job. Several nodes need a new store per attempt instead:
    ``--rdzv-backend c10d`` with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (what
    ``launch/torchrun.sh`` does), where rank 0 hosts a fresh store on a fresh port each time.
    """
    env = os.environ if env is None else env
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None  # plain env:// (srun, tests, the c10d launch above): a new store per start
    if env.get("GROUP_WORLD_SIZE", "1") != "1":
        return None
    return f"megagpt/attempt_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def restart_warning(env: Mapping[str, str] | None = None) -> str | None:
    """Why a multi-node torchrun job could not restart in place, or None."""
    env = os.environ if env is None else env
    if (
        env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        and env.get("GROUP_WORLD_SIZE", "1") != "1"
        and env.get("TORCHELASTIC_MAX_RESTARTS", "0") != "0"
    ):
        return (
            "torchrun --max-restarts on several nodes with the launcher's shared store: a "
            "restart may find the previous attempt's addresses and fail; launch with "
            "--rdzv-backend c10d and TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
            "(launch/torchrun.sh does)"
        )
    return None


def _attempt_store(prefix: str, timeout: datetime.timedelta, launch: LaunchEnv) -> dist.PrefixStore:
    """A client of the agent's store (the launcher's MASTER_ADDR:MASTER_PORT) seen through
    ``prefix``."""
    if launch.master is None:
        raise RuntimeError(
            "torchrun's agent store announced (TORCHELASTIC_USE_AGENT_STORE) "
            "without MASTER_ADDR/MASTER_PORT"
        )
    addr, port = launch.master
    store = dist.TCPStore(addr, port, launch.world_size, is_master=False, timeout=timeout)
    return dist.PrefixStore(prefix, store)


def model_parallel_kwargs(
    cfg: ParallelConfig, backend: str, timeout_minutes: float
) -> dict[str, Any]:
    """Keyword arguments of megatron-core's ``parallel_state.initialize_model_parallel``.

    megatron-core also builds a gloo twin of every data-parallel group unless told not to;
    only its distributed optimizer uses them, which megagpt does not (DeepSpeed's ZeRO
    optimizers are ours). Under NCCL they would cost a gloo rendezvous per group at start-up
    (slow at 1,024 ranks) and need gloo's network interface set right on every node, so they
    are not created. On a gloo run they are the same backend and stay as they were.
    """
    return {
        "tensor_model_parallel_size": cfg.tensor,
        "pipeline_model_parallel_size": cfg.pipeline,
        "distributed_timeout_minutes": timeout_minutes,
        "order": "tp-cp-ep-dp-pp",
        "create_gloo_process_groups": backend != "nccl",
    }


def initialize(
    cfg: ParallelConfig,
    device: torch.device,
    *,
    timeout_minutes: float = 30,
    env: Mapping[str, str] | None = None,
) -> ParallelContext:
    """Start torch.distributed and megatron-core's TP/PP/DP groups; returns this process's
    ``ParallelContext`` (layout, coordinates, groups, ``device``, backend), which callers pass on.

    ``timeout_minutes`` (fractions allowed; the trainer passes ``parallel.timeout_s`` / 60) bounds
    every collective of every group, the start-up rendezvous included. ``env`` is the launcher's
    environment (default ``os.environ``), only read: the rank, world size and store are handed
    to ``init_process_group`` explicitly, and nothing is written back.

    A process group started by the caller (tests, a harness) is used as it is, its backend
    included. Calling again in the same process returns a context over the same groups; a
    different TP/PP layout is a RuntimeError (megatron-core keeps one set of groups).
    """
    from megatron.core import parallel_state

    backend = resolve_backend(cfg.backend, device)
    if not dist.is_initialized():
        launch = LaunchEnv.from_env(os.environ if env is None else env)
        warning = restart_warning(env)
        if warning and launch.rank == 0:
            print(f"[megagpt] warning: {warning}", file=sys.stderr, flush=True)
        dist.init_process_group(
            **init_process_group_kwargs(backend, device, timeout_minutes, launch)
        )
    else:  # started by the caller (tests, a harness): its backend decides
        backend = dist.get_backend()
    dims = ParallelDims.from_world(cfg.tensor, cfg.pipeline, dist.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        have = (
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
        )
        if have != (dims.tp, dims.pp):
            raise RuntimeError(
                f"process groups already set up for TP={have[0]} PP={have[1]}; "
                f"this call asks for TP={dims.tp} PP={dims.pp} (one layout per "
                "process: call megagpt.parallel.destroy() first)"
            )
    else:
        parallel_state.initialize_model_parallel(
            **model_parallel_kwargs(cfg, backend, timeout_minutes)
        )
    ctx = ParallelContext.at(
        dims,
        dist.get_rank(),
        device,
        backend,
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        pp_group=parallel_state.get_pipeline_model_parallel_group(),
        dp_group=parallel_state.get_data_parallel_group(),
        mp_group=parallel_state.get_model_parallel_group(),
    )
    _check_layout(ctx)
    return ctx


def _check_layout(ctx: ParallelContext) -> None:
    """megatron-core's groups must be the ones our arithmetic (and DeepSpeed's topology)
    expects: the same coordinates for this rank."""
    from megatron.core import parallel_state as ps

    got = (
        ps.get_pipeline_model_parallel_rank(),
        ps.get_data_parallel_rank(),
        ps.get_tensor_model_parallel_rank(),
    )
    if got != (ctx.pp_rank, ctx.dp_rank, ctx.tp_rank):
        raise RuntimeError(
            f"rank {ctx.rank}: megatron-core placed it at (pp, dp, tp)={got}, "
            f"megagpt's layout says {(ctx.pp_rank, ctx.dp_rank, ctx.tp_rank)}"
        )


def is_initialized() -> bool:
    """True once ``initialize`` (or a caller) has started torch.distributed and megatron-core's
    model-parallel groups in this process."""
    from megatron.core import parallel_state

    return dist.is_initialized() and parallel_state.model_parallel_is_initialized()


def destroy() -> None:
    """Tear down megatron-core's groups and torch.distributed (tests and the end of a run)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
