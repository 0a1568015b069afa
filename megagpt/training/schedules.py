"""Learning-rate schedules, as pure functions of progress (no state to checkpoint).

Pretraining schedules are functions of consumed tokens (GPT-3: linear warmup over 375M tokens,
cosine decay to 10% of peak at 260B tokens), so a batch-size ramp and stopping early and
resuming change nothing. "noam" is ModelScope's fine-tuning schedule, a function of the step.
"""

from __future__ import annotations

import math

from megagpt.config.schema import OptimConfig


def noam_multiplier(step: int, warmup_steps: int) -> float:
    """min(s^-0.5, s * W^-1.5) with s = step + 1 (ModelScope's LambdaLR "noam")."""
    s = step + 1
    return min(s**-0.5, s * warmup_steps**-1.5)


def learning_rate(o: OptimConfig, *, tokens: float, step: int) -> float:
    """LR after ``tokens`` consumed tokens / ``step`` finished optimizer steps."""
    if o.schedule == "noam":
        return o.lr * noam_multiplier(step, o.warmup_steps)
    if o.schedule == "constant":
        return o.lr
    if o.warmup_tokens > 0 and tokens < o.warmup_tokens:
        return o.lr * tokens / o.warmup_tokens
    floor = o.lr * o.min_lr_ratio
    if tokens >= o.decay_tokens:
        return floor
    frac = (tokens - o.warmup_tokens) / max(1.0, o.decay_tokens - o.warmup_tokens)
    if o.schedule == "linear":
        return o.lr - (o.lr - floor) * frac
    return floor + 0.5 * (o.lr - floor) * (1.0 + math.cos(math.pi * frac))


def batch_size_at(consumed_samples: int, global_batch: int, rampup: list) -> int:
    """Global batch at ``consumed_samples`` with an optional [start, increment, ramp_samples]
    ramp (Megatron's rule: the batch grows by ``increment`` in equal sample intervals)."""
    if not rampup:
        return global_batch
    start, increment, ramp_samples = rampup
    steps = (global_batch - start) // increment
    if steps <= 0 or consumed_samples >= ramp_samples:
        return global_batch
    per_increment = ramp_samples / steps
    return min(global_batch, start + increment * int(consumed_samples // per_increment))
