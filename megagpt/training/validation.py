"""Evaluation during training: pretraining's validation loss, and ``train.eval_tasks``.

An evaluator is a callable ``evaluate(step) -> loss`` that logs its own records; the Trainer
calls it at ``train.eval_interval``. Fine-tuning's (``megagpt.training.finetune``) scores token
perplexity and generation instead; both run ``run_eval_tasks`` after their own figures.
"""

from __future__ import annotations

import math
from typing import Callable

from megagpt.training.setup import BatchSource, RunParts, log0

# step -> validation loss (the evaluator logs its records itself)
Evaluator = Callable[[int], float]


def run_eval_tasks(parts: RunParts, step: int) -> None:
    """``train.eval_tasks``: lm-eval tasks beside validation (megagpt.evaluation), logged as
    ``eval/<task>/<metric>`` at ``step``; pretraining and fine-tuning alike. Collective."""
    cfg = parts.cfg
    if not cfg.train.eval_tasks:
        return
    from megagpt.evaluation.training import run_eval_tasks as run_tasks

    found = run_tasks(
        parts.engine.module,
        parts.tokenizer,
        tasks=cfg.train.eval_tasks,
        limit=cfg.train.eval_tasks_limit,
        vocab_size=cfg.model.vocab_size,
        max_positions=cfg.model.max_position_embeddings,
        tp_group=parts.ctx.tp_group,
        tp_size=parts.ctx.dims.tp,
        step=step,
        log=parts.metrics.log,
        batch_size=cfg.train.micro_batch_size,
        rank=parts.ctx.rank,
    )
    log0(
        f"eval tasks at step {step} | "
        + ", ".join(f"{k.removeprefix('eval/')} {v:.4f}" for k, v in found.items())
    )


class ValidationLoss:
    """Pretraining's evaluator: the mean loss of ``train.eval_iters`` micro-batches per DP rank
    from the start of the validation split (the same samples every time), its perplexity, then
    ``train.eval_tasks``."""

    def __init__(self, parts: RunParts, batches: BatchSource):
        self.parts, self.batches = parts, batches

    def __call__(self, step: int) -> float:
        """Evaluate at ``step``, log ``valid_loss`` / ``valid_ppl``; returns the loss."""
        parts, t = self.parts, self.parts.cfg.train
        micro_batches = self.batches(parts.valid_ds, 0, t.eval_iters)
        loss = parts.engine.eval_loss(micro_batches)
        ppl = math.exp(min(loss, 80.0))
        parts.metrics.log(
            {
                "step": step,
                "valid_loss": loss,
                "valid_ppl": ppl,
                "valid_samples": len(micro_batches) * t.micro_batch_size * parts.ctx.dims.dp,
            }
        )
        log0(f"validation at step {step} | loss {loss:.4f} | ppl {ppl:.2f}")
        run_eval_tasks(parts, step)
        return loss
