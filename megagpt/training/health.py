"""Which training steps are bad (NaN/Inf, a skipped step, a loss spike), agreed by every rank."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


class StepHealth:
    """Whether a step was bad, and how many bad steps came in a row.

    Bad: a NaN/Inf loss or grad norm, or a step DeepSpeed skipped for one, or (with
    ``loss_spike_factor`` k > 0) a loss above k x the mean of the last 100 good losses. fp16's
    dynamic loss scaling skips overflowing steps by design while it finds its scale, so under
    fp16 a skipped step is bad only at the minimum scale (1), where DeepSpeed cannot go lower.
    """

    WINDOW = 100
    MIN_HISTORY = 10  # good steps before the spike detector trusts its mean

    def __init__(self, precision: str, spike_factor: float):
        self.fp16 = precision == "fp16"
        self.spike_factor = spike_factor
        self.streak = 0
        self.good: list[float] = []

    def check(self, out: dict) -> str:
        """The reason ``out`` (``Engine.train_step``'s result) is a bad step, or ''; call
        ``count`` with the verdict every rank agreed on."""
        loss, norm = out["loss"], out["grad_norm"]
        if not math.isfinite(loss):
            reason = f"loss is {loss}"
        elif self.fp16 and out["skipped"]:
            reason = "fp16 overflow at the minimum loss scale" if out["loss_scale"] <= 1 else ""
        elif not math.isfinite(norm):
            reason = f"grad norm is {norm}"
        elif out["skipped"]:
            reason = "DeepSpeed skipped the step (gradient overflow)"
        elif (
            self.spike_factor > 0
            and len(self.good) >= self.MIN_HISTORY
            and loss > self.spike_factor * sum(self.good) / len(self.good)
        ):
            reason = (
                f"loss spike: {loss:.4f} > {self.spike_factor:g} x the mean "
                f"{sum(self.good) / len(self.good):.4f} of the last {len(self.good)} "
                "good steps"
            )
        else:
            reason = ""
        return reason

    def count(self, bad: bool, out: dict) -> None:
        if bad:
            self.streak += 1
            return
        self.streak = 0
        if not out["skipped"]:
            self.good = (self.good + [out["loss"]])[-self.WINDOW :]


def any_rank_reason(reason: str, device: torch.device) -> str:
    """``reason`` if any rank saw a bad step (every rank then takes the same branch)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return reason
    flag = torch.tensor([1.0 if reason else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return reason or ("bad step on another rank" if flag.item() > 0 else "")
