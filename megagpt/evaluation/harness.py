"""megagpt as an lm-evaluation-harness model (``--model megagpt``), and ``run_tasks``.

Importing this module registers the model with lm-eval (``lm_eval.api.registry``). lm-eval
0.4.13 has no plugin discovery for models, so the stock ``lm_eval`` command cannot see it;
``python -m megagpt.evaluation.lm_eval_cli`` is lm-eval's own command line with the model
registered (the same flags: ``--model megagpt --model_args path=DIR,batch_size=16``), and
``megagpt eval --tasks`` runs tasks in-process. The bundled tasks (``TASKS_DIR``) are added to
lm-eval's task search path by both.

Requests are scored in length-sorted batches (longest first, so a batch holds similar lengths);
``generate_until`` decodes with megagpt's KV-cache ``TextGenerator``. Under tensor parallelism
every rank runs every request in lockstep and reports lm-eval rank 0 (lm-eval's TP convention;
only the process with ``LOCAL_RANK=0`` aggregates and writes).
"""

from __future__ import annotations

import random
from pathlib import Path

import lm_eval.models  # noqa: F401  (see below)
import numpy as np
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

# lm-eval fills its model registry with its own models (lazily, by name) only while the
# registry is empty: registering "megagpt" first would hide "hf", "vllm" and the rest. Importing
# lm_eval.models registers them first.

from megagpt.evaluation.model import EvalError, Scorer, load_scorer
from megagpt.evaluation.perplexity import score_windows, windows

TASKS_DIR = str(Path(__file__).resolve().parent / "tasks")
DEFAULT_BATCH = 8
DEFAULT_GEN_TOKENS = 256


def _int_option(name: str, value, default: int) -> int:
    if value is None or value == "auto" or value == "":
        return default
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise EvalError(f"model_args {name}={value!r}: expected a whole number") from None
    if out < 1:
        raise EvalError(f"model_args {name}={value!r}: must be >= 1")
    return out


@register_model("megagpt")
class MegagptLM(TemplateLM):
    """lm-eval model over a megagpt model directory or checkpoint.

    ``--model_args``: ``path`` (model directory or checkpoint, required unless a loaded
    ``scorer`` is given in Python), ``batch_size`` (requests per forward, default 8),
    ``max_length`` (tokens per forward; default the model's positions), ``max_gen_toks``
    (default 256), ``dtype`` (auto/fp32/bf16/fp16), ``device`` (auto/cpu/cuda), ``tp``
    (tensor-parallel size; default the torchrun world), ``tokenizer`` (override), ``seed``
    (sampling seed of ``generate_until`` when a task samples).
    """

    def __init__(
        self,
        path: str | None = None,
        *,
        scorer: Scorer | None = None,
        batch_size=None,
        max_batch_size=None,
        max_length=None,
        max_gen_toks=None,
        dtype: str = "auto",
        device: str | None = None,
        tp=None,
        tokenizer: str | None = None,
        seed=1234,
        **unknown,
    ):
        super().__init__()
        if unknown:
            raise EvalError(
                f"--model_args: unknown option(s) {sorted(unknown)} for "
                "--model megagpt (see `megagpt eval --help`)"
            )
        if scorer is None:
            if not path:
                raise EvalError(
                    "--model megagpt needs --model_args path=DIR (a model "
                    "directory or training checkpoint)"
                )
            scorer = load_scorer(
                path,
                device=device or "auto",
                dtype=dtype,
                tensor=_int_option("tp", tp, 0) if tp else None,
                tokenizer=tokenizer,
            )
        self.scorer = scorer
        self.tok = scorer.tokenizer
        self.batch_size = _int_option("batch_size", batch_size, DEFAULT_BATCH)
        self.max_length = min(
            _int_option("max_length", max_length, scorer.max_positions), scorer.max_positions
        )
        self.max_gen_toks = _int_option("max_gen_toks", max_gen_toks, DEFAULT_GEN_TOKENS)
        self.seed = int(seed)
        self._device = scorer.device

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """``--model_args`` win over lm-eval's own ``--batch_size``/``--device``. lm-eval's
        ``--device`` defaults to "cuda:0" whether or not there is a GPU: that default means
        "auto" here (CUDA when available); the local GPU is chosen by megagpt's process setup."""
        extra = {
            k: v
            for k, v in (additional_config or {}).items()
            if v is not None and k not in arg_dict
        }
        if "device" in extra:
            extra["device"] = "auto" if extra["device"] == "cuda:0" else extra["device"]
        args = {**arg_dict, **extra}
        if str(args.get("device", "")).startswith("cuda:"):
            args["device"] = "cuda"  # megagpt takes the GPU of its LOCAL_RANK
        return cls(**args)

    # -- tokenizer ------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eot = self.tok.eod if self.tok.eod is not None else self.tok.sep
        if eot is None:
            raise EvalError(
                f"{self.tok.path}: the tokenizer has no end-of-document token, "
                "which lm-eval needs as the context of an empty prompt"
            )
        return eot

    @property
    def prefix_token_id(self) -> int:
        """The context of an empty prompt and of a rolling text's first token: the family's
        ``bos`` (``[CLS]``, which ModelScope's base/large models read first), else the end of
        document."""
        bos = self.tok.bos
        return bos if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return f"{self.tok.family}:{Path(self.tok.path).name}"

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs
    ) -> list[int]:
        # As lm-eval's hf model with add_bos_token: a context starts with the family's bos
        # (the BERT family's [CLS]) unless the caller asks for the bare ids.
        ids = self.tok.encode(string)
        return ids if add_special_tokens is False else self.tok.start(ids)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tok.decode(tokens)

    # -- scoring --------------------------------------------------------------------------
    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), continuation is the greedy choice) per request.

        Context and continuation longer than ``max_length`` keep their last tokens, after the
        family's bos (``Tokenizer.last``; the continuation is always scored whole when it
        fits).
        """
        rows = []
        for _, ctx, cont in requests:
            if not cont:
                raise EvalError("an lm-eval request has an empty continuation")
            whole = self.tok.last(ctx + cont, self.max_length + 1)
            rows.append((whole[:-1], whole[1:], min(len(cont), len(whole) - 1)))
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            scored = self.scorer.token_logprobs(
                [rows[i][0] for i in idx], [rows[i][1] for i in idx]
            )
            for i, (lp, greedy) in zip(idx, scored):
                n = rows[i][2]
                out[i] = (float(lp[-n:].sum()), bool(greedy[-n:].all()))
                if self.cache_hook is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each whole string: disjoint ``max_length`` windows, the
        first token predicted after ``prefix_token_id`` (as lm-eval's hf model)."""
        items, keep = [], []
        for n, req in enumerate(requests):
            (string,) = req.args
            ids = self.tok_encode(string, add_special_tokens=False)
            if not ids:
                keep.append(n)
                continue
            items += windows(n, [self.prefix_token_id] + ids, self.max_length, self.max_length)
        nll = score_windows(self.scorer, items, self.batch_size)
        out = []
        for n, req in enumerate(requests):
            value = 0.0 if n in keep else -nll[n]
            if self.cache_hook is not None:
                self.cache_hook.add_partial("loglikelihood_rolling", req.args, value)
            out.append(value)
        return out

    # -- generation -----------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations decoded with the KV cache, cut at the first ``until`` string; greedy
        unless the task asks for ``do_sample`` with a temperature > 0."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for n, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(n)
        for members in groups.values():
            kwargs = dict(requests[members[0]].args[1])
            order = sorted(members, key=lambda n: -len(self.tok_encode(requests[n].args[0])))
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                texts = self._generate([requests[n].args[0] for n in idx], kwargs)
                for n, text in zip(idx, texts):
                    out[n] = text
                    if self.cache_hook is not None:
                        self.cache_hook.add_partial("generate_until", requests[n].args, text)
        return out

    def _generate(self, contexts: list[str], kwargs: dict) -> list[str]:
        from megagpt.inference.sampling import make_params

        kwargs = dict(kwargs)
        until = kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        eot_text = self.tok_decode([self.eot_token_id])
        if eot_text and eot_text not in until:
            until.append(eot_text)
        new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        if do_sample and temperature > 0:
            params = make_params(kwargs.pop("top_k", None), kwargs.pop("top_p", None), temperature)
        else:
            params = make_params(top_k=1)
        gen = self.scorer.generator
        room = self.max_length - min(new, self.max_length - 1)
        prompts = [self.tok.last(self.tok_encode(c) or [self.eot_token_id], room) for c in contexts]
        limits = [min(len(p) + new, self.scorer.max_positions) for p in prompts]
        keys = None if params.greedy else gen.keys_for(prompts, 1, self.seed)
        texts = [""] * len(prompts)
        finished = [False] * len(prompts)
        for state in gen.steps(prompts, params, limits, keys, use_cache=True):
            # Every TP rank holds the same tokens (TP rank 0's choice), so they all stop at
            # the same step.
            ends = state.ends.tolist()
            for i, p in enumerate(prompts):
                if not finished[i]:
                    texts[i] = self.tok_decode(state.tokens[i, len(p) : ends[i]].tolist())
                    finished[i] = bool(state.done[i]) or any(u in texts[i] for u in until)
            if all(finished):
                break
        return [_cut(t, until) for t in texts]


def _cut(text: str, until: list[str]) -> str:
    """``text`` up to the first occurrence of any ``until`` string."""
    end = len(text)
    for u in until:
        if u:
            at = text.find(u)
            if at != -1:
                end = min(end, at)
    return text[:end]


def find_tasks(names: list[str], include_path: list[str] | None = None):
    """(an lm-eval TaskManager, the ``names`` it does not know): the bundled tasks and
    ``include_path`` alone when they hold every name (indexing lm-eval's thousands of default
    tasks takes seconds), else those plus lm-eval's own."""
    from lm_eval.tasks import TaskManager

    paths = [TASKS_DIR, *(include_path or [])]
    tm = TaskManager(include_path=paths, include_defaults=False)
    if all(n in tm.all_tasks for n in names):
        return tm, []
    tm = TaskManager(include_path=paths, include_defaults=True)
    return tm, [n for n in names if n not in tm.all_tasks]


def task_manager(names: list[str], include_path: list[str] | None = None):
    """An lm-eval TaskManager that finds ``names`` (``find_tasks``); EvalError naming the
    ``--tasks`` it does not know."""
    tm, missing = find_tasks(names, include_path)
    if missing:
        raise EvalError(
            f"--tasks: unknown lm-eval task(s) {missing}; list them with "
            "`lm_eval ls tasks`, or add a folder of task YAMLs with --include-path"
        )
    return tm


def run_tasks(
    lm: MegagptLM,
    tasks: list[str],
    *,
    num_fewshot: int | None = None,
    limit: float | None = None,
    include_path: list[str] | None = None,
    manager=None,
    log_samples: bool = False,
    keep_rng: bool = False,
) -> dict | None:
    """``lm_eval.simple_evaluate`` of ``tasks`` on ``lm``; the results dict on the writing
    process (lm-eval returns None elsewhere). ``manager``: a ``task_manager`` already made
    (else one is made with ``include_path``). ``keep_rng`` restores Python's, NumPy's and
    torch's random state afterwards (lm-eval reseeds them; a training run must not notice)."""
    from lm_eval import simple_evaluate

    manager = manager or task_manager(tasks, include_path)
    saved = _rng_state() if keep_rng else None
    try:
        return simple_evaluate(
            model=lm,
            tasks=list(tasks),
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=log_samples,
            batch_size=lm.batch_size,
            verbosity="WARNING",
        )
    finally:
        if saved is not None:
            _set_rng_state(saved)


def flat_metrics(results: dict, prefix: str = "eval") -> dict[str, float]:
    """``{"eval/<task>/<metric>": value}`` from lm-eval results: numeric metrics only, the
    default filter's ``,none`` suffix dropped (other filters kept as ``metric@filter``)."""
    out: dict[str, float] = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if (
                key in ("alias", "sample_len")
                or not isinstance(value, (int, float))
                or isinstance(value, bool)
            ):
                continue
            metric, _, filt = key.partition(",")
            name = metric if filt in ("", "none") else f"{metric}@{filt}"
            out[f"{prefix}/{task}/{name}"] = float(value)
    return out


def _rng_state():
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def _set_rng_state(state) -> None:
    py, npy, cpu, cuda = state
    random.setstate(py)
    np.random.set_state(npy)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
