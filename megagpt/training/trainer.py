"""The Trainer: pretraining loop over indexed datasets, with exact resume.

Order of work, so that bad input fails before anything expensive or collective starts:
config validation -> tokenizer and data paths -> process groups -> model -> engine -> resume.
"""

from __future__ import annotations

import math
import os
import random
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megagpt import parallel
from megagpt.checkpoint import checkpoint_dir, commit, latest_tag, resolve_load, tag_for
from megagpt.config import Config, ConfigError, dump_yaml, validate
from megagpt.config.schema import to_dict
from megagpt.training.metrics import (
    MetricsWriter,
    ThroughputWindow,
    device_peak_tflops,
    flops_per_token,
)
from megagpt.training.precision import configure_matmul_precision
from megagpt.training.schedules import batch_size_at, learning_rate


def log0(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"[megagpt] {msg}", flush=True)


def check_data_paths(cfg: Config) -> None:
    """Every data.paths entry must be an existing PREFIX.bin / PREFIX.idx pair."""
    for i, prefix in enumerate(cfg.data.paths):
        for ext in (".bin", ".idx"):
            if not os.path.isfile(prefix + ext):
                raise ConfigError(f"data.paths[{i}]: {prefix + ext} does not exist (give the "
                                  "prefix written by `megagpt preprocess --output-prefix`)")


def prepare_tokenizer(cfg: Config):
    """Load data.tokenizer and make model.vocab_size its true size (recorded in config.yaml)."""
    from megagpt.data import DataError, build_tokenizer

    try:
        tok = build_tokenizer(cfg.data.tokenizer)
    except (OSError, ValueError, DataError) as e:
        raise ConfigError(f"data.tokenizer={cfg.data.tokenizer!r}: {e}") from None
    if tok.vocab_size != cfg.model.vocab_size:
        log0(f"model.vocab_size {cfg.model.vocab_size} -> {tok.vocab_size} "
             f"(the size of data.tokenizer)")
        cfg.model.vocab_size = tok.vocab_size
    return tok


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _rng_file(checkpoint: str, pp: int, tp: int) -> str:
    return os.path.join(checkpoint, "rng", f"pp{pp:03d}-tp{tp:03d}.pt")


def _save_rng(checkpoint: str, tp_region: torch.Tensor) -> None:
    """This rank's RNG streams, as plain tensors and lists (readable with weights_only=True).

    Every data-parallel rank of a (pp, tp) position draws the same streams (same seed, same
    dropout shapes), so DP rank 0 writes them and any DP size can read them back."""
    if parallel.dp_rank() != 0:
        return
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, state, gauss_next = random.getstate()
    blob = {"torch": torch.get_rng_state(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": [version, list(state), gauss_next], "tp_region": tp_region}
    if torch.cuda.is_available():
        blob["cuda"] = torch.cuda.get_rng_state()
    path = _rng_file(checkpoint, parallel.pp_rank(), parallel.tp_rank())
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(blob, path + ".tmp")
    os.replace(path + ".tmp", path)


def _load_rng(checkpoint: str, tp_region) -> bool:
    """Restore this rank's RNG streams saved by ``_save_rng`` (the TP-region dropout stream into
    ``tp_region``); False when none fit (another TP/PP layout, or an older checkpoint)."""
    path = _rng_file(checkpoint, parallel.pp_rank(), parallel.tp_rank())
    if not os.path.isfile(path):
        return False
    blob = torch.load(path, weights_only=True)
    if "tp_region" in blob:
        tp_region.set_state(blob["tp_region"])
    kind, keys, pos, has_gauss, gauss = blob["numpy"]
    _set_rng_state({"torch": blob["torch"],
                    "numpy": (kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss),
                    "python": (blob["python"][0], tuple(blob["python"][1]), blob["python"][2]),
                    **({"cuda": blob["cuda"]} if "cuda" in blob else {})})
    return True


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed(seed)


class _StopFlag:
    """SIGUSR1/SIGTERM (Slurm's pre-timeout signal, a requeue) ask for a checkpoint and exit."""

    def __init__(self):
        self.raised = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            try:
                signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. under a test harness)
                pass

    def _handler(self, signum, frame):
        self.raised = True

    def release(self) -> None:
        """After training: a late SIGUSR1 (the pre-timeout signal) is ignored rather than
        killing a process that is only shutting down; SIGTERM gets its default back."""
        for sig, action in ((signal.SIGUSR1, signal.SIG_IGN), (signal.SIGTERM, signal.SIG_DFL)):
            try:
                signal.signal(sig, action)
            except ValueError:
                pass

    def any_rank(self, device: torch.device) -> bool:
        flag = torch.tensor([1.0 if self.raised else 0.0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


@dataclass
class TrainState:
    step: int = 0
    consumed_samples: int = 0


class Trainer:
    """Pretraining on ``cfg``; ``run()`` trains to ``train.steps`` and returns the final state.

    Fine-tuning (``megagpt.training.finetune``) subclasses it and replaces the data hooks
    (``_build_data``, ``_micro_batches``, ``evaluate``) and the start weights (``_init_weights``).
    """

    # Pretraining reads indexed datasets (data.paths); a subclass with its own data says False.
    needs_indexed_data = True

    def __init__(self, cfg: Config):
        self.cfg = cfg
        # Handlers first: a Slurm pre-timeout signal during setup must not kill the job (and
        # torchrun starts workers with SIGUSR1 ignored).
        self.stop = _StopFlag()
        world = parallel.world_size_from_env()
        cuda = torch.cuda.is_available()
        validate(cfg, world, cuda=cuda, need_data=self.needs_indexed_data)
        self.tokenizer = prepare_tokenizer(cfg)
        check_data_paths(cfg)
        validate(cfg, world, cuda=cuda, need_data=self.needs_indexed_data)  # vocab may change
        self.device = parallel.resolve_device(cfg.train.device)
        configure_matmul_precision(self.device, cfg.train.tf32)
        self.dims = parallel.initialize(cfg.parallel, self.device)
        self.rank = dist.get_rank()
        self.run_dir = cfg.run.dir
        self.ckpt_dir = checkpoint_dir(self.run_dir)
        if self.rank == 0:
            Path(self.ckpt_dir).mkdir(parents=True, exist_ok=True)
            (Path(self.run_dir) / "config.yaml").write_text(dump_yaml(cfg), encoding="utf-8")
        dist.barrier()
        _seed(cfg.train.seed + 100 * parallel.pp_rank())
        self.state = TrainState()
        self._build_engine()
        self._resume()
        self._build_data()
        self.metrics = MetricsWriter(
            self.run_dir, enabled=self.rank == 0, wandb_mode=cfg.logging.wandb,
            project=cfg.logging.wandb_project, run_name=cfg.run.name, config=to_dict(cfg))

    # -- setup ----------------------------------------------------------------------------
    def _build_engine(self) -> None:
        from megagpt.engine import Engine, build_model
        from megagpt.model import padded_vocab_size

        cfg = self.cfg
        module = build_model(cfg, self.dims, self.device)
        self._init_weights(module)
        # The TP-region dropout stream (model/rng.py): one per TP rank, from the run seed.
        module.dropout_rng.seed(cfg.train.seed + 100 * parallel.pp_rank(), parallel.tp_rank())
        self.engine = Engine(cfg, module, self.dims, self.device)
        self.padded_vocab = padded_vocab_size(cfg.model.vocab_size, self.dims.tp)
        n_local = sum(p.numel() for p in module.parameters())
        log0(f"model {cfg.model.name or 'custom'}: {cfg.model.num_layers} layers, "
             f"h={cfg.model.hidden_size}, heads={cfg.model.num_heads}, vocab "
             f"{cfg.model.vocab_size} (padded {self.padded_vocab}); rank 0 holds "
             f"{n_local / 1e6:.2f}M parameters; world {self.dims.world} = TP {self.dims.tp} x "
             f"PP {self.dims.pp} x DP {self.dims.dp}; ZeRO {cfg.parallel.zero_stage}; "
             f"{cfg.train.precision} on {self.device}")
        log0(self.engine.describe_precision())

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Start weights of the local model part (pretraining: the seeded layout-free init)."""
        from megagpt.model import initialize_weights

        initialize_weights(module, self.cfg.model, self.cfg.train.seed, parallel.tp_rank(),
                           self.dims.tp)

    def _resume(self) -> None:
        """Continue from the run's own latest checkpoint, else from ``checkpoint.load``: a
        training checkpoint of any TP/PP/DP/ZeRO layout (the engine reshards it), or pretrained
        weights (model directory, ModelScope or Hugging Face dir) that start the run at step 0."""
        directory, tag = self.ckpt_dir, latest_tag(self.ckpt_dir)
        if tag is None and self.cfg.checkpoint.load:
            if self._load_pretrained(self.cfg.checkpoint.load):
                return
            directory, tag = resolve_load(self.cfg.checkpoint.load)
        if tag is None:
            return
        client = self.engine.load(directory, tag)
        self.state = TrainState(step=int(client["step"]),
                                consumed_samples=int(client["consumed_samples"]))
        tp_region = self.engine.dropout_rng
        if _load_rng(os.path.join(directory, tag), tp_region):
            pass  # this rank's streams, saved by the same (pp, tp) position
        elif "rng" in client:  # DeepSpeed's native files (checkpoint.native) of an older run
            _set_rng_state(client["rng"])
        else:
            # Another TP/PP layout: per-rank RNG streams do not map across layouts; reseed.
            seed = self.cfg.train.seed + 100 * parallel.pp_rank() + 7919 * self.state.step
            _seed(seed)
            tp_region.seed(seed, parallel.tp_rank())
        log0(f"resumed from {directory}/{tag}: step {self.state.step}, "
             f"{self.state.consumed_samples} samples consumed")

    def _load_pretrained(self, path: str) -> bool:
        """Weights from a model directory / ModelScope / Hugging Face dir (True), or False when
        ``path`` is a training checkpoint."""
        from megagpt.checkpoint.canonical import CheckpointError
        from megagpt.checkpoint.convert import detect, read_weights

        try:
            if detect(path) == "training":
                return False
            src, tensors = read_weights(path)
        except CheckpointError as e:
            raise ConfigError(f"checkpoint.load={path!r}: {e}") from None
        diff = [f"model.{k}: {getattr(self.cfg.model, k)!r} here, {getattr(src, k)!r} there"
                for k in ("num_layers", "num_heads", "hidden_size", "ffn",
                          "max_position_embeddings", "vocab_size", "activation", "layernorm_eps")
                if getattr(self.cfg.model, k) != getattr(src, k)]
        if diff:
            raise ConfigError(f"checkpoint.load={path!r} does not fit the model: "
                              + "; ".join(diff) + " (set those model keys)")
        self.engine.load_weights(tensors, source=path)
        log0(f"initialised weights from {path} (step 0, fresh optimizer)")
        return True

    def _build_data(self) -> None:
        from megagpt.data import build_gpt_datasets

        cfg, dims = self.cfg, self.dims
        seq = cfg.model.seq_length
        # The sample index covers the planned run (the decay horizon), not just this run's
        # train.steps, so stopping early and resuming with more steps sees the same samples.
        planned = max(cfg.train.steps * cfg.train.global_batch_size,
                      math.ceil(cfg.optim.decay_tokens / seq)
                      if cfg.optim.schedule in ("cosine", "linear") else 0)
        n_valid = (cfg.train.eval_iters * cfg.train.micro_batch_size * dims.dp
                   if cfg.train.eval_interval > 0 else 0)
        cache = cfg.data.cache_dir or os.path.join(self.run_dir, "data_cache")
        self.train_ds, self.valid_ds, _ = build_gpt_datasets(
            cfg.data.paths, cfg.data.weights or None, cfg.data.split, seq,
            (planned, n_valid, 0), cfg.train.seed, cache)
        if n_valid == 0:
            self.valid_ds = None

    # -- batches --------------------------------------------------------------------------
    def _micro_batches(self, dataset, start_sample: int, count: int) -> list[dict]:
        """This rank's ``count`` micro-batches of the global samples from ``start_sample``."""
        from megagpt.data import DistributedBatchSampler

        micro = self.cfg.train.micro_batch_size
        sampler = DistributedBatchSampler(
            total_samples=len(dataset), consumed_samples=start_sample, micro_batch_size=micro,
            data_parallel_rank=parallel.dp_rank(), data_parallel_size=self.dims.dp)
        out = []
        for indices in sampler:
            tokens = torch.from_numpy(
                np.stack([dataset[i]["tokens"] for i in indices]).astype(np.int64))
            out.append({"tokens": tokens[:, :-1].contiguous(),
                        "labels": tokens[:, 1:].contiguous(),
                        "loss_mask": torch.ones(tokens.shape[0], tokens.shape[1] - 1)})
            if len(out) == count:
                break
        if len(out) < count:
            raise RuntimeError(f"the dataset ran out of samples at {start_sample} "
                               f"(holds {len(dataset)})")
        return out

    # -- the loop -------------------------------------------------------------------------
    def run(self) -> TrainState:
        cfg, t, st = self.cfg, self.cfg.train, self.state
        seq = cfg.model.seq_length
        stop = self.stop
        tf32 = configure_matmul_precision(self.device, t.tf32)  # set in __init__; returns it
        fpt = flops_per_token(cfg.model, self.padded_vocab, seq)
        peak = device_peak_tflops(self.device, t.precision, cfg.logging.peak_tflops, tf32=tf32,
                                  log=log0)
        if st.step >= t.steps:
            log0(f"nothing to do: at step {st.step}, train.steps={t.steps}")
        # Only batch assembly + the step are timed: evaluation, saves and the stop vote below
        # stay out of tokens/s and MFU.
        window, window_losses = ThroughputWindow(), []
        skipped_total = 0
        last_saved = st.step
        while st.step < t.steps:
            window.resume()
            gb = batch_size_at(st.consumed_samples, t.global_batch_size, t.rampup_batch_size)
            self.engine.set_global_batch(gb)
            n_micro = gb // (t.micro_batch_size * self.dims.dp)
            batches = self._micro_batches(self.train_ds, st.consumed_samples, n_micro)
            lr = learning_rate(cfg.optim, tokens=st.consumed_samples * seq, step=st.step)
            self.engine.set_lr(lr)
            out = self.engine.train_step(batches)  # its loss is a host float: the GPU is done
            window.pause(tokens=gb * seq)
            st.step += 1
            st.consumed_samples += gb
            window_losses.append(out["loss"])
            skipped_total += int(out["skipped"])
            if not math.isfinite(out["loss"]) and not out["skipped"]:
                raise FloatingPointError(f"step {st.step}: loss is {out['loss']}; stopping "
                                         f"(last checkpoint: step {last_saved})")
            if st.step % t.log_interval == 0 or st.step == t.steps:
                window_tokens, elapsed = window.take()
                tps = window_tokens / elapsed
                tflops = fpt * tps / self.dims.world / 1e12
                record = {
                    "step": st.step, "loss": sum(window_losses) / len(window_losses),
                    "lr": lr, "grad_norm": out["grad_norm"], "loss_scale": out["loss_scale"],
                    "skipped_steps": skipped_total, "consumed_samples": st.consumed_samples,
                    "global_batch": gb, "tokens_per_s": tps, "tflops_per_device": tflops,
                    "mfu": tflops / peak if peak else None,
                }
                self.metrics.log(record)
                mfu = f" | MFU {record['mfu']:.1%}" if peak else ""
                log0(f"step {st.step}/{t.steps} | loss {record['loss']:.4f} | lr {lr:.3e} | "
                     f"grad {out['grad_norm']:.3f} | {tps:,.0f} tok/s | "
                     f"{tflops:.3f} TFLOP/s/device{mfu}")
                window_losses = []
            if t.eval_interval and self.valid_ds is not None and (
                    st.step % t.eval_interval == 0 or st.step == t.steps):
                self.evaluate()
            stopping = stop.any_rank(self.device)
            interval = cfg.checkpoint.interval
            if stopping or (interval and st.step % interval == 0):
                self.save()
                last_saved = st.step
            if stopping:
                log0(f"stop signal received: saved step {st.step}, exiting")
                break
        if last_saved != st.step:
            self.save()
        if st.step >= t.steps:
            self.export_model(os.path.join(self.run_dir, "model"))
        self.metrics.close()
        stop.release()
        return st

    def export_model(self, directory: str) -> None:
        """Write the consolidated model directory (config, tokenizer, safetensors weights).

        Collective. The (dp 0, tp 0) rank of each pipeline stage writes that stage's shard, so
        no rank ever holds the whole model (a shared filesystem is assumed, as for
        checkpoints).
        """
        from megagpt.checkpoint import model_dir

        tensors = model_dir.full_tensors(self.engine.module, self.cfg.model, parallel.tp_group(),
                                         self.dims.tp, getter=self.engine.fp32_value)
        if parallel.dp_rank() == 0 and parallel.tp_rank() == 0:
            model_dir.save_tensors(directory, tensors, parallel.pp_rank(), self.dims.pp)
        dist.barrier()
        if self.rank == 0:
            if self.dims.pp > 1:
                model_dir.write_index(directory, self.dims.pp)
            model_dir.write_config(directory, self.cfg.model,
                                   {"trained_steps": self.state.step,
                                    "trained_tokens": self.state.consumed_samples
                                    * self.cfg.model.seq_length})
            model_dir.copy_tokenizer(directory, self.cfg.data.tokenizer)
        dist.barrier()
        log0(f"wrote model directory {directory}")

    def evaluate(self) -> float:
        micro = self.cfg.train.micro_batch_size
        batches = self._micro_batches(self.valid_ds, 0, self.cfg.train.eval_iters)
        loss = self.engine.eval_loss(batches)
        ppl = math.exp(min(loss, 80.0))
        self.metrics.log({"step": self.state.step, "valid_loss": loss, "valid_ppl": ppl,
                          "valid_samples": len(batches) * micro * self.dims.dp})
        log0(f"validation at step {self.state.step} | loss {loss:.4f} | ppl {ppl:.2f}")
        return loss

    def save(self) -> None:
        tag = tag_for(self.state.step)
        client = {"step": self.state.step, "consumed_samples": self.state.consumed_samples,
                  "rng": _rng_state(), "config": to_dict(self.cfg)}
        self.engine.save(self.ckpt_dir, tag, client)
        _save_rng(os.path.join(self.ckpt_dir, tag), self.engine.dropout_rng.get_state())
        commit(self.ckpt_dir, tag, self.cfg.checkpoint.keep_last)
        log0(f"saved checkpoint {self.ckpt_dir}/{tag}")


def train(cfg: Config) -> TrainState:
    """Run ``megagpt train`` for a loaded config; returns the final step and samples."""
    return Trainer(cfg).run()
