"""The fp32 master weights and Adam moments behind each DeepSpeed optimizer wrapper.

Checkpoints (``megagpt.checkpoint.reshard``) read and write a parameter's fp32 master, ``exp_avg``
and ``exp_avg_sq`` by model parameter, whatever the ZeRO stage and precision. DeepSpeed keeps
them in a different place for each optimizer it wraps ours in, so there is one adapter per
wrapper, picked once by ``adapter_for`` when the engine is built:

- ``PlainState``    fp32 at ZeRO 0: DeepSpeed steps torch's AdamW on the model parameters.
- ``UnfusedState``  fp16 at ZeRO 0: ``FP16_UnfusedOptimizer``, one fp32 master per parameter.
- ``MappedState``   ZeRO 1-3 and ``BF16_Optimizer`` (bf16 at any stage): flat fp32 partitions
                    that DeepSpeed maps back to parameters (``safe_get_full_*``; collective over
                    data parallel).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

KINDS = ("param", "exp_avg", "exp_avg_sq")


class OptimizerState(ABC):
    """Read and write the fp32 ``param`` / ``exp_avg`` / ``exp_avg_sq`` of model parameters."""

    def __init__(self, ds_optimizer: Any, device: torch.device):
        self.ds_optimizer = ds_optimizer
        self.device = device
        opt = ds_optimizer
        while not isinstance(opt, torch.optim.Optimizer):
            opt = opt.optimizer
        self.base: torch.optim.Optimizer = opt

    # -- per wrapper ----------------------------------------------------------------------
    @abstractmethod
    def flat_states(self) -> list[torch.Tensor]:
        """The tensors the base optimizer keeps Adam state for."""

    @abstractmethod
    def fp32_value(self, p: torch.nn.Parameter) -> torch.Tensor:
        """The full fp32 master of a (local, TP-sharded) parameter."""

    @abstractmethod
    def get(self, p: torch.nn.Parameter, kind: str) -> torch.Tensor:
        """This rank's TP shard of ``kind`` for ``p`` (collective over DP under ZeRO)."""

    @abstractmethod
    def set(self, p: torch.nn.Parameter, kind: str, value: torch.Tensor) -> None:
        """Set ``kind`` of ``p`` from its TP shard ``value`` (any dtype/device)."""

    def refresh_low_precision(self) -> None:  # noqa: B027 - only ZeRO-3 has work to do
        """After masters were set: make the copies the forward reads match them."""

    # -- shared ---------------------------------------------------------------------------
    def materialize(self) -> None:
        """AdamW creates its state at the first step; a checkpoint saved or loaded before it
        needs zero moments to exist."""
        flags = self.base.param_groups[0] if self.base.param_groups else {}
        on_device = flags.get("fused") or flags.get("capturable")
        for t in self.flat_states():
            if not self.base.state.get(t):
                self.base.state[t] = {
                    "step": torch.zeros(
                        (), dtype=torch.float32, device=t.device if on_device else "cpu"
                    ),
                    "exp_avg": torch.zeros_like(t, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(t, memory_format=torch.preserve_format),
                }

    def adam_step(self) -> int:
        states = [self.base.state.get(t) for t in self.flat_states()]
        return int(max((float(s["step"]) for s in states if s and "step" in s), default=0))

    def set_adam_step(self, step: int) -> None:
        for t in self.flat_states():
            self.base.state[t]["step"].fill_(float(step))


class PlainState(OptimizerState):
    def flat_states(self):
        return [p for g in self.base.param_groups for p in g["params"]]

    def fp32_value(self, p):
        return p

    def get(self, p, kind):
        return p if kind == "param" else self.base.state[p][kind]

    def set(self, p, kind, value):
        target = p.data if kind == "param" else self.base.state[p][kind]
        target.copy_(value.to(device=target.device, dtype=torch.float32))


class UnfusedState(OptimizerState):
    def __init__(self, ds_optimizer, device):
        super().__init__(ds_optimizer, device)
        # fp32_groups runs parallel to fp16_groups: id(model parameter) -> its fp32 master.
        self.masters = {
            id(lp): hp
            for lows, highs in zip(ds_optimizer.fp16_groups, ds_optimizer.fp32_groups)
            for lp, hp in zip(lows, highs)
        }

    def flat_states(self):
        return [hp for highs in self.ds_optimizer.fp32_groups for hp in highs]

    def fp32_value(self, p):
        return self.masters[id(p)]

    def get(self, p, kind):
        master = self.masters[id(p)]
        return master if kind == "param" else self.base.state[master][kind]

    def set(self, p, kind, value):
        value = value.to(device=self.device, dtype=torch.float32)
        master = self.masters[id(p)]
        if kind == "param":
            master.data.copy_(value)
            p.data.copy_(value.to(p.dtype))
        else:
            self.base.state[master][kind].copy_(value)


class MappedState(OptimizerState):
    _FLAT_ATTRS = (
        "fp32_partitioned_groups_flat",
        "single_partition_of_fp32_groups",
        "fp32_groups_flat_partition",
    )

    def __init__(self, ds_optimizer, device):
        super().__init__(ds_optimizer, device)
        from deepspeed import utils

        self._utils = utils
        for attr in self._FLAT_ATTRS:
            if getattr(ds_optimizer, attr, None) is not None:
                self._flat_attr = attr
                break
        else:
            raise _unknown(ds_optimizer)

    def flat_states(self):
        return list(getattr(self.ds_optimizer, self._flat_attr))

    def materialize(self):
        super().materialize()
        # ZeRO's per-parameter views of the moments are linked lazily, at the first step.
        if hasattr(self.ds_optimizer, "_lazy_init_hp_params_optimizer_state"):
            self.ds_optimizer._hp_optimizer_states_linked = False
            self.ds_optimizer._lazy_init_hp_params_optimizer_state()

    def fp32_value(self, p):
        value = self._utils.safe_get_full_fp32_param(p)
        if value is None:
            raise RuntimeError(
                f"DeepSpeed's {type(self.ds_optimizer).__name__} holds no fp32 "
                f"master for a parameter of shape {tuple(p.shape)}"
            )
        return value

    def get(self, p, kind):
        if kind == "param":
            return self.fp32_value(p)
        value = self._utils.safe_get_full_optimizer_state(p, kind)
        if value is None:
            raise RuntimeError(
                f"no fp32 {kind} for a parameter under {type(self.ds_optimizer).__name__}"
            )
        return value

    def set(self, p, kind, value):
        value = value.to(device=self.device, dtype=torch.float32)
        if kind == "param":
            self._utils.safe_set_full_fp32_param(p, value)
            if not hasattr(p, "ds_id"):  # ZeRO 0-2 keep the whole low-precision copy here
                p.data.copy_(value.to(p.dtype))
        else:
            self._utils.safe_set_full_optimizer_state(p, value, kind)

    def refresh_low_precision(self) -> None:
        # ZeRO-3: the forward gathers from (possibly low-precision) partitions of the masters.
        low = getattr(self.ds_optimizer, "fp16_partitioned_groups_flat", None)
        if low:
            for lp, hp in zip(low, self.ds_optimizer.fp32_partitioned_groups_flat):
                lp.data.copy_(hp.data)


def _unknown(ds_optimizer: Any) -> RuntimeError:
    return RuntimeError(
        f"megagpt checkpoints do not know DeepSpeed's {type(ds_optimizer).__name__}; every "
        "wrapper DeepSpeed picks for megagpt's configs (fp32/bf16/fp16 at ZeRO 0-3, with and "
        "without a pipeline) has an adapter in megagpt/engine/optim_state.py: please report "
        "this with your DeepSpeed version"
    )


def adapter_for(ds_optimizer: Any, device: torch.device) -> OptimizerState:
    """The adapter for the optimizer DeepSpeed's engine built (``engine.optimizer``)."""
    if isinstance(ds_optimizer, torch.optim.Optimizer):
        return PlainState(ds_optimizer, device)
    if type(ds_optimizer).__name__ == "FP16_UnfusedOptimizer":
        return UnfusedState(ds_optimizer, device)
    if any(getattr(ds_optimizer, a, None) is not None for a in MappedState._FLAT_ATTRS):
        return MappedState(ds_optimizer, device)
    raise _unknown(ds_optimizer)
