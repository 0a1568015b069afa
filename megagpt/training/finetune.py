"""``megagpt finetune``: the pretraining Trainer on src_txt / src_txt + tgt_txt data.

What differs from pretraining, all here:

* data: ``finetune.train_file`` / ``eval_file`` (jsonl or csv) encoded by
  ``megagpt.data.finetune`` with the original loss masks; epochs of reshuffled samples, each epoch
  whole global batches; ``train.steps`` caps the run (0 = every epoch);
* start weights: ``finetune.init_from``, a megagpt model directory, a training checkpoint of any
  layout, a ModelScope or Hugging Face directory, or nothing (from scratch);
* evaluation after every epoch: perplexity over the real tokens of the loss masks (padding
  excluded, the original counted it), and for src+tgt data greedy generation scored with BLEU and
  ROUGE-L against the targets.

Run directory, checkpoints, exact resume and the final ``<run.dir>/model`` are the Trainer's.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
import torch.distributed as dist

from megagpt import parallel
from megagpt.checkpoint import is_model_dir, load_into
from megagpt.config import Config, ConfigError
from megagpt.config.schema import ModelConfig
from megagpt.training.trainer import Trainer, TrainState, log0


@dataclasses.dataclass
class StartPoint:
    """Where fine-tuning weights come from: ``kind`` "scratch" or the checkpoint kind read by
    ``megagpt.checkpoint.convert`` ("megagpt", "training", "modelscope", "hf")."""

    kind: str
    path: str = ""
    model: ModelConfig | None = None
    tokenizer: str = ""
    tensors: dict | None = None  # full canonical weights, cut to this layout at load time


def resolve_start(path: str) -> StartPoint:
    """Read ``finetune.init_from``: a megagpt model directory, a run directory (its ``model/``
    when present, else its latest checkpoint), a checkpoints or step_* folder of any TP/PP/DP
    layout, a ModelScope GPT-3 directory or a Hugging Face GPT-2 directory."""
    from megagpt.checkpoint.canonical import CheckpointError
    from megagpt.checkpoint.convert import read

    if not path:
        return StartPoint("scratch")
    if is_model_dir(str(Path(path) / "model")):
        path = str(Path(path) / "model")
    try:
        src = read(path)
    except (CheckpointError, FileNotFoundError) as e:
        raise ConfigError(f"finetune.init_from={path!r}: {e}") from None
    return StartPoint(src.kind, path, src.cfg, src.tokenizer or "", src.tensors)


def prepare(cfg: Config):
    """Check the finetune section, adopt the start point's model and tokenizer, read the data.

    Runs before any process group. Returns (start, train dataset, eval dataset or None) and
    resolves into ``cfg``: model.* (from the start point), model.seq_length, data.tokenizer,
    train.steps (epochs x steps per epoch, capped by a non-zero train.steps) and
    train.eval_interval (one epoch).
    """
    from megagpt.data import build_tokenizer
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
    if t.rampup_batch_size:
        problems.append("train.rampup_batch_size is not supported by fine-tuning (epochs are "
                        "whole global batches)")
    if problems:
        raise ConfigError("invalid finetune config:\n  - " + "\n  - ".join(problems))

    start = resolve_start(ft.init_from)
    source_tokenizer = ""
    if start.kind != "scratch":
        model, source_tokenizer = start.model, start.tokenizer
        keep = {"dropout": cfg.model.dropout, "attention_dropout": cfg.model.attention_dropout}
        cfg.model = dataclasses.replace(model, **keep)
        if not cfg.data.tokenizer:
            cfg.data.tokenizer = source_tokenizer
    if ft.seq_length > cfg.model.max_position_embeddings > 0:
        raise ConfigError(f"finetune.seq_length ({ft.seq_length}) exceeds the model's "
                          f"{cfg.model.max_position_embeddings} positions")
    cfg.model.seq_length = ft.seq_length
    if not cfg.data.tokenizer:
        raise ConfigError("data.tokenizer is empty: set it, or finetune.init_from to a model "
                          "directory (its tokenizer is used)")
    try:
        tokenizer = build_tokenizer(cfg.data.tokenizer)
    except (OSError, ValueError, DataError) as e:
        raise ConfigError(f"data.tokenizer={cfg.data.tokenizer!r}: {e}") from None
    if start.kind != "scratch" and tokenizer.vocab_size != cfg.model.vocab_size:
        raise ConfigError(f"data.tokenizer has {tokenizer.vocab_size} tokens but the model of "
                          f"finetune.init_from has a vocabulary of {cfg.model.vocab_size}; use "
                          "the model's own tokenizer (leave data.tokenizer empty)")
    build = {"src_column": ft.src_column, "tgt_column": ft.tgt_column, "mode": ft.mode}
    try:
        train_ds = build_finetune_dataset(ft.train_file, tokenizer, ft.seq_length, **build)
        eval_ds = (build_finetune_dataset(ft.eval_file, tokenizer, ft.seq_length, **build)
                   if ft.eval_file else None)
    except DataError as e:
        raise ConfigError(f"finetune data: {e}") from None
    if eval_ds is not None and eval_ds.paired and missing_packages():
        raise ConfigError("src+tgt evaluation scores BLEU / ROUGE-L and needs: pip install "
                          + " ".join(missing_packages()))
    gb = t.global_batch_size
    per_epoch = len(train_ds) // gb if gb > 0 else 0
    if gb > 0 and per_epoch == 0:
        raise ConfigError(f"{ft.train_file} has {len(train_ds)} samples, fewer than one global "
                          f"batch (train.global_batch_size={gb})")
    total = ft.epochs * per_epoch
    # train.steps caps the run (0 = every epoch).
    t.steps = total if t.steps == 0 else min(t.steps, total)
    t.eval_interval = per_epoch if eval_ds is not None else 0
    return start, train_ds, eval_ds


class FinetuneTrainer(Trainer):
    """The Trainer with fine-tuning data, start weights and evaluation."""

    needs_indexed_data = False

    def __init__(self, cfg: Config):
        self.start, self._train, self._eval = prepare(cfg)
        self.per_epoch = len(self._train) // cfg.train.global_batch_size
        super().__init__(cfg)
        log0(f"fine-tuning: {len(self._train)} samples "
             f"({'src+tgt' if self._train.paired else 'continuation'}), "
             f"{self.per_epoch} steps per epoch, {cfg.train.steps} steps; start: "
             f"{self.start.kind} {self.start.path}".rstrip())
        for name, ds in (("train", self._train), ("eval", self._eval)):
            if ds is not None and ds.empty_samples:
                log0(f"warning: {ds.empty_samples} {name} samples have no token in the loss "
                     f"(source longer than finetune.seq_length={cfg.finetune.seq_length})")

    # -- start weights --------------------------------------------------------------------
    def _has_own_checkpoint(self) -> bool:
        # Only whether to skip loading the start weights: `_resume` verifies (and, when the
        # newest is damaged, falls back), so a `latest` naming a lost folder must not raise here.
        return (Path(self.ckpt_dir) / "latest").is_file() or bool(self.cfg.checkpoint.load)

    def _init_weights(self, module: torch.nn.Module) -> None:
        super()._init_weights(module)
        if self.start.tensors is not None and not self._has_own_checkpoint():
            # Weights only, cut for this TP/PP layout; optimizer, step and data start afresh.
            load_into(module, self.start.tensors, self.cfg.model, parallel.tp_rank(),
                      self.dims.tp, source=self.start.path)
            log0(f"weights from {self.start.kind} {self.start.path}")
        self.start.tensors = None  # loaded (or superseded by the run's own checkpoint)

    # -- data -----------------------------------------------------------------------------
    def _build_data(self) -> None:
        self.train_ds, self.valid_ds = self._train, self._eval

    def _micro_batches(self, dataset, start_sample: int, count: int) -> list[dict]:
        """This rank's ``count`` micro-batches of global samples from ``start_sample`` (the
        sampler's split: micro-step k gives rank r the samples k*micro*DP + r*micro ...)."""
        from megagpt.data.finetune import global_sample_indices

        micro, dp = self.cfg.train.micro_batch_size, self.dims.dp
        out = []
        for k in range(count):
            first = start_sample + (k * dp + parallel.dp_rank()) * micro
            idx = global_sample_indices(first, micro, len(dataset),
                                        self.per_epoch * self.cfg.train.global_batch_size,
                                        self.cfg.train.seed, self.cfg.finetune.shuffle)
            out.append(_batch(dataset, idx))
        return out

    # -- evaluation -----------------------------------------------------------------------
    def run(self) -> TrainState:
        if self.cfg.finetune.eval_at_start and self.valid_ds is not None and \
                self.state.step == 0:
            self.evaluate()
        return super().run()

    def evaluate(self) -> float:
        loss_sum, tokens = self.eval_token_loss()
        loss = loss_sum / max(tokens, 1.0)
        record = {"step": self.state.step, "epoch": self.state.step / self.per_epoch,
                  "valid_loss": loss, "valid_ppl": math.exp(min(loss, 80.0)),
                  "valid_tokens": int(tokens)}
        if self.valid_ds.paired:
            record.update(self.eval_generation())
        self.metrics.log(record)
        extra = "".join(f" | {k[6:]} {record[k]:.2f}" for k in ("valid_bleu", "valid_rouge_l")
                        if k in record)
        log0(f"evaluation at step {self.state.step} (epoch {record['epoch']:.2f}) | loss "
             f"{loss:.4f} | ppl {record['valid_ppl']:.2f} over {int(tokens)} tokens{extra}")
        self.run_eval_tasks()
        return loss

    @torch.no_grad()
    def eval_token_loss(self) -> tuple[float, float]:
        """(sum of token cross entropy, number of tokens) over the loss masks of the whole
        evaluation set: a token-level perplexity that never counts padding."""
        ds, ft = self.valid_ds, self.cfg.finetune
        n = len(ds)
        if self.dims.pp > 1:
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
        dp, rank, size = self.dims.dp, parallel.dp_rank(), ft.eval_batch_size
        mine = list(range(rank, n, dp))
        batches = math.ceil(math.ceil(n / dp) / size)
        ds_engine = self.engine.ds
        ds_engine.eval()
        sums = torch.zeros(2, dtype=torch.float64)
        for b in range(batches):
            mb = _batch(ds, mine[b * size:(b + 1) * size], pad_to=size)
            tokens, labels, mask = (mb[k].to(self.device) for k in ("tokens", "labels",
                                                                    "loss_mask"))
            loss = ds_engine(tokens, labels, mask)
            sums += torch.tensor([float(loss) * float(mask.sum()), float(mask.sum())],
                                 dtype=torch.float64)
        if dp > 1:
            sums = sums.to(self.device)
            dist.all_reduce(sums, group=parallel.dp_group())
        return float(sums[0]), float(sums[1])

    @torch.no_grad()
    def eval_generation(self) -> dict:
        """Greedy continuations of the evaluation sources, scored against the targets."""
        from megagpt.inference.generate import TextGenerator
        from megagpt.inference.sampling import make_params
        from megagpt.training import text_metrics

        ft, ds, tok = self.cfg.finetune, self.valid_ds, self.tokenizer
        if self.dims.pp > 1 or self.cfg.parallel.zero_stage == 3:
            log0("BLEU / ROUGE-L skipped: generation during fine-tuning needs "
                 "parallel.pipeline=1 and parallel.zero_stage < 3 (score the final model "
                 "directory with `megagpt generate` instead)")
            return {}
        n = len(ds) if ft.eval_generate_limit <= 0 else min(len(ds), ft.eval_generate_limit)
        cap = self.cfg.model.max_position_embeddings
        stops = [i for i in (tok.eod, tok.sep) if i is not None]
        pad = next((i for i in (tok.pad, tok.eod) if i is not None), 0)
        gen = TextGenerator(self.engine.module, vocab_size=self.cfg.model.vocab_size,
                            max_positions=cap, stop_ids=stops, pad_id=pad,
                            tp_group=parallel.tp_group(), tp_size=self.dims.tp)
        greedy = make_params(top_k=1)
        dp, rank, size = self.dims.dp, parallel.dp_rank(), ft.eval_batch_size
        mine = list(range(rank, n, dp))
        pairs = []
        for b in range(0, len(mine), size):
            chunk = mine[b:b + size]
            prompts = [(ds.sources[i] or stops[:1])[-(cap - 1):] for i in chunk]
            outs = gen.generate(prompts, greedy, max_new_tokens=ft.eval_max_new_tokens)
            for i, p, out in zip(chunk, prompts, outs):
                pred = tok.decode(out[0][len(p):])
                # The reference as the tokenizer can produce it (the original decodes labels).
                ref = tok.decode(tok.encode(ds.targets[i]))
                pairs.append((i, pred, ref))
        if dp > 1:
            gathered: list = [None] * dp
            dist.all_gather_object(gathered, pairs, group=parallel.dp_group())
            pairs = [p for part in gathered for p in part]
        pairs.sort()
        preds, refs = [p[1] for p in pairs], [p[2] for p in pairs]
        return {"valid_bleu": text_metrics.bleu(preds, refs),
                "valid_rouge_l": text_metrics.rouge_l(preds, refs),
                "valid_generated": len(pairs)}


def _batch(ds, indices: list[int], pad_to: int = 0) -> dict:
    """A micro-batch dict of ``indices``; rows past them (up to ``pad_to``) carry no loss."""
    import numpy as np

    idx = list(indices) + [0] * max(0, pad_to - len(indices))
    ids = torch.from_numpy(np.ascontiguousarray(ds.ids[idx]))
    mask = torch.from_numpy(np.ascontiguousarray(ds.loss_mask[idx]))
    if len(idx) > len(indices):
        mask[len(indices):] = 0.0
    return {"tokens": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(),
            "loss_mask": mask}


def finetune(cfg: Config) -> TrainState:
    """Run ``megagpt finetune`` for a loaded config; returns the final step and samples."""
    return FinetuneTrainer(cfg).run()
