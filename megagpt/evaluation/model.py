"""A loaded model for evaluation: token log-probabilities of batches, at any tensor-parallel size.

``load_scorer(path)`` accepts a megagpt model directory (loaded exactly as ``megagpt generate``
loads it, ``megagpt.inference.pipeline.load_generator``) or any other checkpoint
``megagpt convert`` reads (a training run, its ``checkpoints/`` folder or a ``step_*`` folder, a
ModelScope or Hugging Face directory), through the checkpoint package's one reader
(``megagpt.checkpoint.convert.read``); this module never opens checkpoint files itself.

Under ``torchrun --nproc-per-node N`` the model is split N-way by tensor parallelism (every rank
runs the same calls and gets the same numbers); with ``tensor=T < N`` the other factor is data
parallel (``dp_rank``/``dp_size``), which ``megagpt eval``'s perplexity uses to share documents.
Pipeline parallelism is not offered: the scorer runs the whole model on every rank.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megagpt.errors import MegagptError

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class EvalError(MegagptError, ValueError):
    """A user error of ``megagpt eval`` (bad path, option, dataset or layout)."""


@dataclass
class Scorer:
    """A GPTModel (whole model, possibly tensor-parallel) with what scoring needs.

    Attributes:
        model: the model in eval mode; ``model(tokens [b, s])`` -> vocab-parallel logits
            [s, b, V_padded / tp].
        tokenizer: a ``megagpt.data`` tokenizer.
        vocab_size: the true vocabulary.
        max_positions: the model's learned positions (the longest window scored at once).
        tp_group, tp_size: the tensor-parallel group the model is split over.
        dp_rank, dp_size: this rank's data-parallel replica (documents are shared over them).
        generator: the KV-cache ``TextGenerator`` over the same model (for generation).
        rank: this process's global rank (rank 0 writes the results).
    """

    model: torch.nn.Module
    tokenizer: object
    vocab_size: int
    max_positions: int
    tp_group: object = None
    tp_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    dp_group: object = None
    generator: object = None
    rank: int = 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def is_writer(self) -> bool:
        """True on the one rank that writes results (global rank 0)."""
        return self.rank == 0

    @torch.no_grad()
    def token_logprobs(
        self, inputs: list[list[int]], targets: list[list[int]]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per row: (float64 log p(target_t | input_..t) [n], bool "target is the argmax" [n]).

        ``inputs[i]`` and ``targets[i]`` have the same length n_i <= ``max_positions``; rows are
        right-padded into one forward pass (a causal model never attends to padding on the
        right, so a row scores the same alone or batched). Collective over the TP group.
        """
        if len(inputs) != len(targets) or any(len(a) != len(b) for a, b in zip(inputs, targets)):
            raise ValueError("every input row needs a target row of the same length")
        longest = max(len(r) for r in inputs)
        if longest > self.max_positions or min(len(r) for r in inputs) == 0:
            raise ValueError(
                f"rows must have 1..{self.max_positions} tokens (the model's "
                f"positions); got up to {longest}"
            )
        b = len(inputs)
        tok = torch.zeros(b, longest, dtype=torch.long)
        tgt = torch.zeros(b, longest, dtype=torch.long)
        for i, (a, t) in enumerate(zip(inputs, targets)):
            tok[i, : len(a)] = torch.tensor(a, dtype=torch.long)
            tgt[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        device = self.device
        self.model.eval()
        logits = self.model(tok.to(device))  # [s, b, V/tp]
        lp, greedy = _vocab_parallel_logprobs(
            logits, tgt.to(device).transpose(0, 1), self._vocab_start(), self.tp_group, self.tp_size
        )  # [s, b] each
        lp, greedy = lp.transpose(0, 1).cpu(), greedy.transpose(0, 1).cpu()  # -> [b, s]
        return [(lp[i, : len(inputs[i])], greedy[i, : len(inputs[i])]) for i in range(b)]

    def _vocab_start(self) -> int:
        return int(getattr(self.model.word.word_embeddings, "vocab_start_index", 0))


def _vocab_parallel_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, group, tp_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-softmax at ``targets`` over a vocabulary split across the TP group, without
    gathering the full logits: logits [s, b, V/tp], targets [s, b] (global ids) -> float64
    log-probs [s, b] and "target reaches the maximum logit" [s, b].

    The softmax is taken in float32 (as torch's log_softmax of half-precision logits would be;
    float64 would double the largest tensor of evaluation); the results are float64 so that
    corpus sums keep their precision. The logits of padding rows are already the dtype's
    minimum (``WordEmbedding.logits``), so they add nothing to the normaliser.
    """
    x = logits.float()
    n_local = x.shape[-1]
    peak = x.max(dim=-1).values  # [s, b]
    if tp_size > 1:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    total = torch.exp(x - peak.unsqueeze(-1)).sum(dim=-1)  # [s, b]
    local = targets - vocab_start
    here = (local >= 0) & (local < n_local)
    picked = x.gather(-1, local.clamp(0, n_local - 1).unsqueeze(-1)).squeeze(-1)
    picked = torch.where(here, picked, torch.zeros_like(picked))
    if tp_size > 1:
        dist.all_reduce(total, group=group)
        dist.all_reduce(picked, group=group)  # exactly one rank holds each target
    return (picked - peak - torch.log(total)).double(), picked >= peak


def _layout(tensor: int | None) -> tuple[int, int]:
    """(tp, dp) for this process: tp defaults to the world size (one tensor-parallel group)."""
    from megagpt import parallel

    world = parallel.world_size_from_env()
    tp = tensor or world
    if tp < 1 or world % tp:
        raise EvalError(
            f"--tp {tp}: must divide the world size {world} (the remaining factor is data parallel)"
        )
    return tp, world // tp


def load_scorer(
    path: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    tensor: int | None = None,
    tokenizer: str | None = None,
) -> Scorer:
    """A Scorer for a model directory or any checkpoint ``megagpt convert`` reads.

    Starts megagpt's process groups when none exist (one local process, or the torchrun world
    as TP x DP with ``tensor`` defaulting to the world size). ``tokenizer`` overrides the one
    the checkpoint names (a training checkpoint records the run's ``data.tokenizer`` path,
    which may not exist where the evaluation runs).
    """
    from pathlib import Path

    from megagpt.checkpoint.canonical import CheckpointError
    from megagpt.inference.pipeline import generator_for, inference_context, read_model

    if not Path(path).exists():
        raise EvalError(f"{path}: no such model directory or checkpoint")
    if dtype not in ("auto", *_DTYPES):
        raise EvalError(f"--dtype must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}")
    tp, dp = _layout(tensor)
    warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
    warnings.filterwarnings("ignore", message=".*[Aa]pex.*")
    try:  # read before any process group starts
        cfg, weights, tok, _ = read_model(path, tokenizer, "--tokenizer")
    except (CheckpointError, FileNotFoundError) as e:
        raise EvalError(str(e)) from None
    if cfg.num_heads % tp:
        raise EvalError(
            f"{path}: {cfg.num_heads} heads cannot be split over tensor-parallel size {tp}"
        )
    ctx = inference_context(device, tp)  # DP = world / tp
    gen = generator_for(cfg, weights(), tok, ctx, dtype, source=path)
    cfg_vocab, positions = gen.vocab_size, gen.max_positions
    if tok.vocab_size > cfg_vocab:
        raise EvalError(
            f"{path}: the tokenizer has {tok.vocab_size} tokens but the model only "
            f"{cfg_vocab}: they do not belong together"
        )
    return Scorer(
        gen.model,
        tok,
        cfg_vocab,
        positions,
        ctx.tp_group,
        tp,
        ctx.dp_rank,
        dp,
        ctx.dp_group if dp > 1 else None,
        gen,
        rank=ctx.rank,
    )


def scorer_for_module(
    module: torch.nn.Module,
    tokenizer,
    *,
    vocab_size: int,
    max_positions: int,
    tp_group=None,
    tp_size: int = 1,
    rank: int = 0,
) -> Scorer:
    """A Scorer over a model already in memory (the trainer's GPTModel, pipeline size 1);
    ``rank`` is the process's global rank (``ParallelContext.rank``)."""
    from megagpt.inference.generate import TextGenerator

    stops = [t for t in (tokenizer.eod, tokenizer.sep) if t is not None]
    pad = next((t for t in (tokenizer.pad, tokenizer.eod) if t is not None), 0)
    gen = TextGenerator(
        module,
        vocab_size=vocab_size,
        max_positions=max_positions,
        stop_ids=stops,
        pad_id=pad,
        tp_group=tp_group,
        tp_size=tp_size,
    )
    return Scorer(
        module, tokenizer, vocab_size, max_positions, tp_group, tp_size, generator=gen, rank=rank
    )


def require_lm_eval():
    """Import and return ``megagpt.evaluation.harness`` (which registers the lm-eval model);
    EvalError naming the extra to install when lm-eval is missing."""
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise EvalError('lm-evaluation-harness is not installed: pip install -e ".[eval]"')
    import importlib

    return importlib.import_module("megagpt.evaluation.harness")
