"""Process-group setup, in one place, called once per process.

``initialize(parallel_cfg, device)`` starts torch.distributed (env:// under torchrun/srun, or a
single local process), then megatron-core's model-parallel groups. Everything else asks
``megagpt.parallel`` for ranks and groups.
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist

from megagpt.config.schema import ParallelConfig
from megagpt.parallel.dims import ParallelDims

_DIMS: ParallelDims | None = None
_ENV_SET: list[str] = []  # launcher variables ``initialize`` set for a lone process


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


def init_process_group_kwargs(backend: str, device: torch.device, timeout_minutes: int
                              ) -> dict:
    """Keyword arguments of ``torch.distributed.init_process_group`` for ``backend`` on
    ``device``.

    Under NCCL on a CUDA device it passes ``device_id``: the communicator is then formed
    inside this call (a broken NCCL setup fails here, at start-up, instead of at the first
    collective) and megatron-core's sub-groups are split from it (``ncclCommSplit``) rather
    than built from scratch, which is what start-up at 1,024 ranks needs. Gloo gets none.
    """
    kwargs = {"backend": backend, "init_method": "env://",
              "timeout": datetime.timedelta(minutes=timeout_minutes)}
    if backend == "nccl" and device.type == "cuda":
        kwargs["device_id"] = device
    return kwargs


def restart_store_prefix(env: dict | None = None) -> str | None:
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


def restart_warning(env: dict | None = None) -> str | None:
    """Why a multi-node torchrun job could not restart in place, or None."""
    env = os.environ if env is None else env
    if (env.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and env.get("GROUP_WORLD_SIZE", "1")
            != "1" and env.get("TORCHELASTIC_MAX_RESTARTS", "0") != "0"):
        return ("torchrun --max-restarts on several nodes with the launcher's shared store: a "
                "restart may find the previous attempt's addresses and fail; launch with "
                "--rdzv-backend c10d and TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
                "(launch/torchrun.sh does)")
    return None


def _attempt_store(prefix: str, timeout: datetime.timedelta):
    """A client of the agent's store (MASTER_ADDR:MASTER_PORT) seen through ``prefix``."""
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          int(os.environ["WORLD_SIZE"]), is_master=False, timeout=timeout)
    return dist.PrefixStore(prefix, store)


def model_parallel_kwargs(cfg: ParallelConfig, backend: str, timeout_minutes: int) -> dict:
    """Keyword arguments of megatron-core's ``parallel_state.initialize_model_parallel``.

    megatron-core also builds a gloo twin of every data-parallel group unless told not to;
    only its distributed optimizer uses them, which megagpt does not (DeepSpeed's ZeRO
    optimizers are ours). Under NCCL they would cost a gloo rendezvous per group at start-up
    (slow at 1,024 ranks) and need gloo's network interface set right on every node, so they
    are not created. On a gloo run they are the same backend and stay as they were.
    """
    return {"tensor_model_parallel_size": cfg.tensor,
            "pipeline_model_parallel_size": cfg.pipeline,
            "distributed_timeout_minutes": timeout_minutes, "order": "tp-cp-ep-dp-pp",
            "create_gloo_process_groups": backend != "nccl"}


def initialize(cfg: ParallelConfig, device: torch.device, *, timeout_minutes: float = 30
               ) -> ParallelDims:
    """Start torch.distributed and megatron-core's TP/PP/DP groups; returns the dims.

    ``timeout_minutes`` (fractions allowed; the trainer passes ``parallel.timeout_s`` / 60) bounds
    every collective of every group, the start-up rendezvous included.

    Idempotent: a second call with the same layout returns the existing dims.
    """
    global _DIMS
    from megatron.core import parallel_state

    if _DIMS is not None:
        if (_DIMS.tp, _DIMS.pp) != (cfg.tensor, cfg.pipeline):
            raise RuntimeError(f"process groups already set up for TP={_DIMS.tp} PP={_DIMS.pp}")
        return _DIMS
    backend = resolve_backend(cfg.backend, device)
    if not dist.is_initialized():
        kwargs = init_process_group_kwargs(backend, device, timeout_minutes)
        # One process that no launcher started (a launcher always gives MASTER_ADDR).
        alone = world_size_from_env() == 1 and "MASTER_ADDR" not in os.environ
        if alone:
            # A plain `megagpt train` on one process: an in-memory store, no port to race for
            # (a free port picked, then bound, can be taken in between by another process).
            # DeepSpeed insists on the launcher's variables; ``destroy`` takes them back, so a
            # later child process does not inherit a RANK without a rendezvous.
            for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
                if key not in os.environ:
                    os.environ[key] = "1" if key == "WORLD_SIZE" else "0"
                    _ENV_SET.append(key)
            del kwargs["init_method"]
            kwargs.update(store=dist.HashStore(), rank=0, world_size=1)
        prefix = None if alone else restart_store_prefix()
        warning = restart_warning()
        if warning and os.environ.get("RANK") == "0":
            print(f"[megagpt] warning: {warning}", file=sys.stderr, flush=True)
        if prefix is not None:  # under torchrun: this attempt's own keys (see the function)
            del kwargs["init_method"]
            kwargs.update(store=_attempt_store(prefix, kwargs["timeout"]),
                          rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
        dist.init_process_group(**kwargs)
    else:  # started by the caller (tests, a harness): its backend decides
        backend = dist.get_backend()
    world = dist.get_world_size()
    dims = ParallelDims.from_world(cfg.tensor, cfg.pipeline, world)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            **model_parallel_kwargs(cfg, backend, timeout_minutes))
    _check_layout(dims)
    _DIMS = dims
    return dims


def _check_layout(dims: ParallelDims) -> None:
    """megatron-core's groups must be the ones our arithmetic (and DeepSpeed's topology) expects."""
    from megatron.core import parallel_state as ps

    rank = dist.get_rank()
    pp, dp, tp = dims.coords(rank)
    got = (ps.get_pipeline_model_parallel_rank(), ps.get_data_parallel_rank(),
           ps.get_tensor_model_parallel_rank())
    if got != (pp, dp, tp):
        raise RuntimeError(f"rank {rank}: megatron-core placed it at (pp, dp, tp)={got}, "
                           f"megagpt's layout says {(pp, dp, tp)}")


def dims() -> ParallelDims:
    if _DIMS is None:
        raise RuntimeError("megagpt.parallel.initialize() has not been called")
    return _DIMS


def is_initialized() -> bool:
    return _DIMS is not None


def destroy() -> None:
    """Tear down the groups (tests and the end of a run)."""
    global _DIMS
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    _DIMS = None
    while _ENV_SET:
        os.environ.pop(_ENV_SET.pop(), None)


def tp_rank() -> int:
    from megatron.core import parallel_state as ps
    return ps.get_tensor_model_parallel_rank()


def tp_group():
    from megatron.core import parallel_state as ps
    return ps.get_tensor_model_parallel_group()


def pp_rank() -> int:
    from megatron.core import parallel_state as ps
    return ps.get_pipeline_model_parallel_rank()


def dp_rank() -> int:
    from megatron.core import parallel_state as ps
    return ps.get_data_parallel_rank()


def dp_group():
    from megatron.core import parallel_state as ps
    return ps.get_data_parallel_group()


class MegatronMPU:
    """The old Megatron accessor names DeepSpeed's engine asks its ``mpu`` for, answered from
    megatron-core's parallel_state."""

    def __getattr__(self, name: str):
        from megatron.core import parallel_state as ps
        aliases = {
            "get_model_parallel_rank": ps.get_tensor_model_parallel_rank,
            "get_model_parallel_world_size": ps.get_tensor_model_parallel_world_size,
            "get_model_parallel_group": ps.get_tensor_model_parallel_group,
            "get_slice_parallel_rank": ps.get_tensor_model_parallel_rank,
            "get_slice_parallel_world_size": ps.get_tensor_model_parallel_world_size,
            "get_slice_parallel_group": ps.get_tensor_model_parallel_group,
        }
        if name in aliases:
            return aliases[name]
        return getattr(ps, name)
