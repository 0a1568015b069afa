"""lm-eval tasks during pretraining (``train.eval_tasks``), run beside validation perplexity.

Every rank runs the tasks on its local model (pipeline size 1): the ranks of a tensor-parallel
group compute each forward pass together, and the data-parallel replicas repeat the same passes
(with ZeRO-3 each forward needs every replica's partitions, so all must take part anyway).
Only global rank 0 logs, through the run's MetricsWriter (metrics.jsonl, W&B, TensorBoard).
lm-eval reseeds Python's, NumPy's and torch's generators; their states are restored, so a
run with ``eval_tasks`` trains exactly as one without.
"""

from __future__ import annotations

import time

import torch


def run_eval_tasks(
    module: torch.nn.Module,
    tokenizer,
    *,
    tasks: list[str],
    limit: int,
    vocab_size: int,
    max_positions: int,
    tp_group,
    tp_size: int,
    step: int,
    log,
    batch_size: int = 8,
    rank: int = 0,
) -> dict[str, float]:
    """Run ``tasks`` on ``module`` and log ``{"step", "eval/<task>/<metric>": ...}``.

    ``log(record)`` is the MetricsWriter's ``log`` (it writes on rank 0 only); ``rank`` is this
    process's global rank (``ParallelContext.rank``: the scorer's writer rank); returns the
    metrics (empty on ranks where lm-eval returns no results). The module is left in train
    mode.
    """
    from megagpt.evaluation.model import require_lm_eval, scorer_for_module

    harness = require_lm_eval()
    was_training = module.training
    start = time.perf_counter()
    scorer = scorer_for_module(
        module,
        tokenizer,
        vocab_size=vocab_size,
        max_positions=max_positions,
        tp_group=tp_group,
        tp_size=tp_size,
        rank=rank,
    )
    lm = harness.MegagptLM(scorer=scorer, batch_size=batch_size)
    try:
        results = harness.run_tasks(lm, list(tasks), limit=limit or None, keep_rng=True)
    finally:
        module.train(was_training)
    metrics = harness.flat_metrics(results) if results is not None else {}
    if metrics:
        log({"step": step, **metrics, "eval/seconds": time.perf_counter() - start})
    return metrics
