"""``megagpt finetune``: the Trainer on src_txt / src_txt + tgt_txt data.

What differs from pretraining, all here, handed to ``build_run`` and ``Trainer.from_parts``:

* data: ``finetune.train_file`` / ``eval_file`` (jsonl or csv) encoded by
  ``megagpt.data.finetune`` with the original loss masks; epochs of reshuffled samples, each epoch
  whole global batches (``EpochBatches``); ``train.steps`` caps the run (0 = every epoch);
* start weights: ``finetune.init_from``, a megagpt model directory, a training checkpoint of any
  layout, a ModelScope or Hugging Face directory, or nothing (from scratch); read and loaded by
  the same functions as pretraining's ``checkpoint.load`` (``megagpt.training.setup``);
* evaluation after every epoch (``FinetuneEvaluator``): perplexity over the real tokens of the
  loss masks (padding excluded, the original counted it), and for src+tgt data greedy generation
  scored with BLEU and ROUGE-L against the targets.

Tokenizer, run directory, checkpoints, exact resume and the final ``<run.dir>/model`` are the
Trainer's.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megagpt.checkpoint import is_model_dir
from megagpt.config import Config, ConfigError
from megagpt.training.setup import (
    RunParts,
    StartWeights,
    TrainState,
    build_run,
    load_tokenizer,
    log0,
    read_start_weights,
)
from megagpt.training.signals import StopFlag
from megagpt.training.trainer import Trainer
from megagpt.training.validation import run_eval_tasks


def resolve_start(path: str) -> StartWeights | None:
    """Read ``finetune.init_from``: a megagpt model directory, a run directory (its ``model/``
    when present, else its latest checkpoint), a checkpoints or step_* folder of any TP/PP/DP
    layout, a ModelScope GPT-3 directory or a Hugging Face GPT-2 directory. None: from scratch.
    ConfigError names the setting and the file when the path holds nothing readable."""
    if not path:
        return None
    if is_model_dir(str(Path(path) / "model")):
        path = str(Path(path) / "model")
    return read_start_weights(path, "finetune.init_from", training_as_weights=True)


def epoch_steps(samples: int, global_batch: int, epochs: int, steps: int) -> tuple[int, int]:
    """(optimizer steps per epoch, steps of the run) for ``samples`` training samples: an epoch
    is its whole global batches, and a non-zero ``steps`` (train.steps) caps the run."""
    per_epoch = samples // global_batch if global_batch > 0 else 0
    total = epochs * per_epoch
    return per_epoch, total if steps == 0 else min(steps, total)


@dataclasses.dataclass
class Prepared:
    """What ``prepare`` resolved before any process group."""

    start: StartWeights | None  # None: from scratch
    tokenizer: Any
    train: Any  # megagpt.data.finetune.FinetuneDataset
    eval: Any  # the same, or None: no evaluation
    per_epoch: int  # optimizer steps per epoch


def prepare(cfg: Config) -> Prepared:
    """Check the finetune section, adopt the start point's model and tokenizer, read the data.

    Runs before any process group. Resolves into ``cfg``: model.* (from the start point),
    model.seq_length, data.tokenizer, model.vocab_size (from scratch: the tokenizer's),
    train.steps (epochs x steps per epoch, capped by a non-zero train.steps) and
    train.eval_interval (one epoch).
    """
    from megagpt.data.errors import DataError
    from megagpt.data.finetune import build_finetune_dataset
    from megagpt.training.text_metrics import missing_packages

    ft, t = cfg.finetune, cfg.train
    problems = []
    if not ft.train_file:
        problems.append("finetune.train_file is empty: give a .jsonl or .csv file")
    if ft.epochs < 1:
        problems.append("finetune.epochs must be >= 1")
    if ft.seq_length < 2:
        problems.append("finetune.seq_length must be >= 2")
    if ft.eval_batch_size < 1:
        problems.append("finetune.eval_batch_size must be >= 1")
    if ft.eval_max_new_tokens < 1:
        problems.append(f"finetune.eval_max_new_tokens must be >= 1, got {ft.eval_max_new_tokens}")
    if ft.eval_generate_limit < 0:
        problems.append(
            f"finetune.eval_generate_limit must be >= 0 (0 = every sample), got "
            f"{ft.eval_generate_limit}"
        )
    if t.rampup_batch_size:
        problems.append(
            "train.rampup_batch_size is not supported by fine-tuning (epochs are "
            "whole global batches)"
        )
    if problems:
        raise ConfigError("invalid finetune config:\n  - " + "\n  - ".join(problems))

    start = resolve_start(ft.init_from)
    if start is not None:
        keep = {"dropout": cfg.model.dropout, "attention_dropout": cfg.model.attention_dropout}
        cfg.model = dataclasses.replace(start.model, **keep)
        if not cfg.data.tokenizer:
            cfg.data.tokenizer = start.tokenizer
    if ft.seq_length > cfg.model.max_position_embeddings > 0:
        raise ConfigError(
            f"finetune.seq_length ({ft.seq_length}) exceeds the model's "
            f"{cfg.model.max_position_embeddings} positions"
        )
    cfg.model.seq_length = ft.seq_length
    if not cfg.data.tokenizer:
        raise ConfigError(
            "data.tokenizer is empty: set it, or finetune.init_from to a model "
            "directory (its tokenizer is used)"
        )
    # The start weights fix the vocabulary; from scratch the tokenizer sets it.
    tokenizer = load_tokenizer(cfg, vocab_fixed_by="finetune.init_from" if start else "")
    build = {"src_column": ft.src_column, "tgt_column": ft.tgt_column, "mode": ft.mode}
    try:
        train_ds = build_finetune_dataset(ft.train_file, tokenizer, ft.seq_length, **build)
        eval_ds = (
            build_finetune_dataset(ft.eval_file, tokenizer, ft.seq_length, **build)
            if ft.eval_file
            else None
        )
    except DataError as e:
        raise ConfigError(f"finetune data: {e}") from None
    if eval_ds is not None and eval_ds.paired and missing_packages():
        raise ConfigError(
            "src+tgt evaluation scores BLEU / ROUGE-L and needs: pip install "
            + " ".join(missing_packages())
        )
    gb = t.global_batch_size
    per_epoch, t.steps = epoch_steps(len(train_ds), gb, ft.epochs, t.steps)
    if gb > 0 and per_epoch == 0:
        raise ConfigError(
            f"{ft.train_file} has {len(train_ds)} samples, fewer than one global "
            f"batch (train.global_batch_size={gb})"
        )
    t.eval_interval = per_epoch if eval_ds is not None else 0
    return Prepared(start, tokenizer, train_ds, eval_ds, per_epoch)


class EpochBatches:
    """Fine-tuning's batches: epochs of (reshuffled) samples, each epoch ``epoch_samples``
    global samples (whole global batches). Micro-step k gives DP rank r the global samples
    ``first + (k * DP + r) * micro ...``, the split of pretraining's sampler."""

    def __init__(
        self,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        epoch_samples: int,
        seed: int,
        shuffle: bool,
    ):
        self.micro, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self.epoch_samples, self.seed, self.shuffle = epoch_samples, seed, shuffle

    def __call__(self, dataset, start_sample: int, count: int) -> list[dict]:
        """This rank's ``count`` micro-batches of global samples from ``start_sample``."""
        from megagpt.data.finetune import global_sample_indices

        out = []
        for k in range(count):
            first = start_sample + (k * self.dp_size + self.dp_rank) * self.micro
            idx = global_sample_indices(
                first, self.micro, len(dataset), self.epoch_samples, self.seed, self.shuffle
            )
            out.append(_batch(dataset, idx))
        return out


class FinetuneEvaluator:
    """Fine-tuning's evaluator: token-level perplexity of the evaluation set, BLEU / ROUGE-L of
    greedy generations for src+tgt data, then ``train.eval_tasks``; logged with the epoch."""

    def __init__(self, parts: RunParts, per_epoch: int):
        self.parts, self.per_epoch = parts, per_epoch
        self.cfg, self.ctx, self.engine = parts.cfg, parts.ctx, parts.engine

    def __call__(self, step: int) -> float:
        """Evaluate at ``step``; returns the token-level loss. Collective."""
        loss_sum, tokens = self.eval_token_loss()
        loss = loss_sum / max(tokens, 1.0)
        record = {
            "step": step,
            "epoch": step / self.per_epoch,
            "valid_loss": loss,
            "valid_ppl": math.exp(min(loss, 80.0)),
            "valid_tokens": int(tokens),
        }
        if self.parts.valid_ds.paired:
            record.update(self.eval_generation())
        self.parts.metrics.log(record)
        extra = "".join(
            f" | {k[6:]} {record[k]:.2f}" for k in ("valid_bleu", "valid_rouge_l") if k in record
        )
        log0(
            f"evaluation at step {step} (epoch {record['epoch']:.2f}) | loss "
            f"{loss:.4f} | ppl {record['valid_ppl']:.2f} over {int(tokens)} tokens{extra}"
        )
        run_eval_tasks(self.parts, step)
        return loss

    @torch.no_grad()
    def eval_token_loss(self) -> tuple[float, float]:
        """(sum of token cross entropy, number of tokens) over the loss masks of the whole
        evaluation set: a token-level perplexity that never counts padding."""
        ds, ft, ctx = self.parts.valid_ds, self.cfg.finetune, self.ctx
        n = len(ds)
        if ctx.dims.pp > 1:
            # The pipeline engine returns a micro-batch's masked mean averaged over DP: give
            # every DP rank the same micro-batch (of the training shape), weight by its tokens.
            micro = self.cfg.train.micro_batch_size
            total = count = 0.0
            for first in range(0, n, micro):
                mb = _batch(ds, list(range(first, min(first + micro, n))), pad_to=micro)
                tokens = float(mb["loss_mask"].sum())
                total += self.engine.eval_loss([mb]) * tokens
                count += tokens
            return total, count
        # PP = 1: each DP rank takes every DP-th sample; all ranks run the same number of
        # batches (ZeRO-3 gathers parameters collectively), short ones padded with empty rows.
        dp, rank, size = ctx.dims.dp, ctx.dp_rank, ft.eval_batch_size
        mine = list(range(rank, n, dp))
        batches = math.ceil(math.ceil(n / dp) / size)
        ds_engine = self.engine.ds
        ds_engine.eval()
        sums = torch.zeros(2, dtype=torch.float64)
        for b in range(batches):
            mb = _batch(ds, mine[b * size : (b + 1) * size], pad_to=size)
            tokens, labels, mask = (mb[k].to(ctx.device) for k in ("tokens", "labels", "loss_mask"))
            loss = ds_engine(tokens, labels, mask)
            sums += torch.tensor(
                [float(loss) * float(mask.sum()), float(mask.sum())], dtype=torch.float64
            )
        if dp > 1:
            sums = sums.to(ctx.device)
            dist.all_reduce(sums, group=ctx.dp_group)
        return float(sums[0]), float(sums[1])

    @torch.no_grad()
    def eval_generation(self) -> dict:
        """Greedy continuations of the evaluation sources, scored against the targets."""
        from megagpt.inference.generate import TextGenerator
        from megagpt.inference.sampling import make_params
        from megagpt.training import text_metrics

        ft, ds, tok, ctx = self.cfg.finetune, self.parts.valid_ds, self.parts.tokenizer, self.ctx
        if ctx.dims.pp > 1 or self.cfg.parallel.zero_stage == 3:
            log0(
                "BLEU / ROUGE-L skipped: generation during fine-tuning needs "
                "parallel.pipeline=1 and parallel.zero_stage < 3 (score the final model "
                "directory with `megagpt generate` instead)"
            )
            return {}
        n = len(ds) if ft.eval_generate_limit <= 0 else min(len(ds), ft.eval_generate_limit)
        cap = self.cfg.model.max_position_embeddings
        stops = [i for i in (tok.eod, tok.sep) if i is not None]
        pad = next((i for i in (tok.pad, tok.eod) if i is not None), 0)
        gen = TextGenerator(
            self.engine.module,
            vocab_size=self.cfg.model.vocab_size,
            max_positions=cap,
            stop_ids=stops,
            pad_id=pad,
            tp_group=ctx.tp_group,
            tp_size=ctx.dims.tp,
        )
        greedy = make_params(top_k=1)
        dp, rank, size = ctx.dims.dp, ctx.dp_rank, ft.eval_batch_size
        mine = list(range(rank, n, dp))
        pairs = []
        for b in range(0, len(mine), size):
            chunk = mine[b : b + size]
            prompts = [tok.last(ds.sources[i] or stops[:1], cap - 1) for i in chunk]
            outs = gen.generate(prompts, greedy, max_new_tokens=ft.eval_max_new_tokens)
            for i, p, out in zip(chunk, prompts, outs):
                pred = tok.decode(out[0][len(p) :])
                # The reference as the tokenizer can produce it (the original decodes labels).
                ref = tok.decode(tok.encode(ds.targets[i]))
                pairs.append((i, pred, ref))
        if dp > 1:
            gathered: list = [None] * dp
            dist.all_gather_object(gathered, pairs, group=ctx.dp_group)
            pairs = [p for part in gathered for p in part]
        pairs.sort()
        preds, refs = [p[1] for p in pairs], [p[2] for p in pairs]
        return {
            "valid_bleu": text_metrics.bleu(preds, refs),
            "valid_rouge_l": text_metrics.rouge_l(preds, refs),
            "valid_generated": len(pairs),
        }


def _batch(ds, indices: list[int], pad_to: int = 0) -> dict:
    """A micro-batch dict of ``indices``; rows past them (up to ``pad_to``) carry no loss."""
    import numpy as np

    idx = list(indices) + [0] * max(0, pad_to - len(indices))
    ids = torch.from_numpy(np.ascontiguousarray(ds.ids[idx]))
    mask = torch.from_numpy(np.ascontiguousarray(ds.loss_mask[idx]))
    if len(idx) > len(indices):
        mask[len(indices) :] = 0.0
    return {
        "tokens": ids[:, :-1].contiguous(),
        "labels": ids[:, 1:].contiguous(),
        "loss_mask": mask,
    }


def finetune(cfg: Config) -> TrainState:
    """Run ``megagpt finetune`` for a loaded config; returns the final step and samples."""
    # The stop flag first, as for pretraining: a stop signal during setup is kept.
    stop = StopFlag()
    prep = prepare(cfg)
    parts = build_run(
        cfg, stop, tokenizer=prep.tokenizer, datasets=(prep.train, prep.eval), start=prep.start
    )
    start = f"{prep.start.kind} {prep.start.path}" if prep.start else "scratch"
    log0(
        f"fine-tuning: {len(prep.train)} samples "
        f"({'src+tgt' if prep.train.paired else 'continuation'}), "
        f"{prep.per_epoch} steps per epoch, {cfg.train.steps} steps; start: {start}"
    )
    for name, ds in (("train", prep.train), ("eval", prep.eval)):
        if ds is not None and ds.empty_samples:
            log0(
                f"warning: {ds.empty_samples} {name} samples have no token in the loss "
                f"(source longer than finetune.seq_length={cfg.finetune.seq_length})"
            )
    ctx = parts.ctx
    batches = EpochBatches(
        cfg.train.micro_batch_size,
        ctx.dp_rank,
        ctx.dims.dp,
        prep.per_epoch * cfg.train.global_batch_size,
        cfg.train.seed,
        cfg.finetune.shuffle,
    )
    evaluate = FinetuneEvaluator(parts, prep.per_epoch)
    trainer = Trainer.from_parts(parts, batches, evaluate)
    if cfg.finetune.eval_at_start and parts.valid_ds is not None and parts.state.step == 0:
        evaluate(0)
    return trainer.run()
