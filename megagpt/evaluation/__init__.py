"""Evaluation: perplexity / bits per character on datasets, lm-evaluation-harness tasks.

``megagpt eval`` (``megagpt.evaluation.cli``), the lm-eval model ``megagpt``
(``megagpt.evaluation.harness``, needs ``pip install -e ".[eval]"``) and the periodic task
evaluation of pretraining (``megagpt.evaluation.training``). Names are imported on first use,
so ``import megagpt`` never imports lm-eval.
"""

from megagpt.lazy import lazy_getattr

_EXPORTS = {
    "EvalError": "megagpt.evaluation.model",
    "Scorer": "megagpt.evaluation.model",
    "load_scorer": "megagpt.evaluation.model",
    "perplexity": "megagpt.evaluation.perplexity",
    "require_lm_eval": "megagpt.evaluation.model",
}

__all__ = list(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)
