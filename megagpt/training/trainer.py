"""The Trainer: pretraining loop over indexed datasets, with exact resume.

Order of work, so that bad input fails before anything expensive or collective starts:
config validation -> tokenizer and data paths -> process groups -> model -> engine -> resume.
"""

from __future__ import annotations

import math
import os
import random
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megagpt import parallel
from megagpt.checkpoint import (
    checkpoint_dir,
    latest_tag,
    resolve_load,
    resume_tag,
    verify_or_raise,
)
from megagpt.checkpoint.training import TrainingCheckpoints
from megagpt.config import Config, ConfigError, dump_yaml, validate
from megagpt.config.schema import to_dict
from megagpt.training import watchdog
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
    """Every data.paths entry must be an existing PREFIX.bin / PREFIX.idx pair whose token ids
    fit ``cfg.model.vocab_size``; ConfigError / DataError name the entry otherwise."""
    for i, prefix in enumerate(cfg.data.paths):
        for ext in (".bin", ".idx"):
            if not os.path.isfile(prefix + ext):
                raise ConfigError(f"data.paths[{i}]: {prefix + ext} does not exist (give the "
                                  "prefix written by `megagpt preprocess --output-prefix`)")
    # Every token id must fit the model's vocabulary (set from data.tokenizer by then): an id
    # past it raises a bare IndexError at TP=1 and silently reads another rank's rows at TP>1.
    from megagpt.data.indexed import check_vocab

    for i, prefix in enumerate(cfg.data.paths):
        check_vocab(prefix, cfg.model.vocab_size, f"data.paths[{i}]")


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


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed(seed)


class _StopFlag:
    """Stop signals ask for a checkpoint at the next step boundary and an exit.

    * SIGUSR1 (Slurm's pre-timeout signal, ``--signal=B:USR1@...``) is caught from the start, so
      one that arrives during setup does not kill the job: the first step boundary saves.
    * SIGTERM (``scancel``, a requeue, or torchrun stopping the surviving workers of an attempt
      whose rank died) keeps its default, immediate exit until ``arm()``: during setup there is
      nothing to save, and a rank blocked in a rendezvous must not hold up torchrun's restart.
      Once armed (training), it is caught like SIGUSR1; but a main thread blocked in a
      collective whose peer is gone cannot act on it (Python runs handlers between bytecodes
      only), so a helper thread, woken through ``signal.set_wakeup_fd``, ends the process with
      status 143 if the SIGTERM is not honoured within ``TERM_GRACE_S`` (longer while a save or
      export is under way), saying where it was. A rank never ignores termination for long.
    """

    # Under torchrun's SIGTERM -> SIGKILL window (30 s) and Slurm's usual KillWait (30 s).
    TERM_GRACE_S = 20.0
    # A save/export in progress gets this long after the SIGTERM before the helper gives up.
    SAVE_GRACE_S = 600.0
    _helper: threading.Thread | bool | None = None  # the process's helper thread, once started
    _current: _StopFlag | None = None  # the armed flag it serves

    def __init__(self):
        self.raised = False
        self.armed = False
        self._done = threading.Event()
        self._set(signal.SIGUSR1, self._handler)

    @staticmethod
    def _set(sig, action) -> None:
        try:
            signal.signal(sig, action)
        except ValueError:  # not the main thread (e.g. under a test harness)
            pass

    def _handler(self, signum, frame):
        self.raised = True

    def arm(self) -> None:
        """Training starts: SIGTERM now means save and exit, bounded by the helper thread."""
        if self.armed or threading.current_thread() is not threading.main_thread():
            return
        self.armed = True
        _StopFlag._current = self
        self._set(signal.SIGTERM, self._handler)
        if _StopFlag._helper is None:
            _StopFlag._helper = self._start_helper()

    @classmethod
    def _start_helper(cls) -> threading.Thread | bool:
        """The wakeup fd is process-wide: one helper thread per process, which serves whichever
        flag is armed. False when another owner holds the wakeup fd (then no forced exit)."""
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        if previous != -1:
            signal.set_wakeup_fd(previous)
            os.close(read_fd)
            os.close(write_fd)
            return False
        thread = threading.Thread(target=cls._enforce_term, args=(read_fd,), daemon=True,
                                  name="megagpt-sigterm")
        thread.start()
        return thread

    @classmethod
    def _enforce_term(cls, read_fd: int) -> None:
        """Helper thread: after a SIGTERM, end the process unless the trainer exits in time."""
        import time

        while True:
            while signal.SIGTERM not in os.read(read_fd, 64):
                pass
            flag, start = cls._current, time.monotonic()
            while flag is not None and not flag._done.wait(1.0):
                waited = time.monotonic() - start
                phase, _ = watchdog.where()
                limit = cls.SAVE_GRACE_S if phase in ("save", "export") else cls.TERM_GRACE_S
                if waited >= limit:
                    rank = os.environ.get("RANK", "0")
                    print(f"[megagpt] rank {rank}: SIGTERM not honoured within {waited:.0f} s "
                          f"(main thread busy in {watchdog.describe()}, e.g. a collective whose"
                          f" peer is gone): exiting", file=sys.stderr, flush=True)
                    os._exit(128 + signal.SIGTERM)

    def release(self) -> None:
        """After training: a late SIGUSR1 (the pre-timeout signal) is ignored rather than
        killing a process that is only shutting down; SIGTERM gets its default back."""
        self._done.set()
        if _StopFlag._current is self:
            _StopFlag._current = None
        for sig, action in ((signal.SIGUSR1, signal.SIG_IGN), (signal.SIGTERM, signal.SIG_DFL)):
            self._set(sig, action)

    def any_rank(self, device: torch.device) -> bool:
        flag = torch.tensor([1.0 if self.raised else 0.0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


class _StepHealth:
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
        elif (self.spike_factor > 0 and len(self.good) >= self.MIN_HISTORY
              and loss > self.spike_factor * sum(self.good) / len(self.good)):
            reason = (f"loss spike: {loss:.4f} > {self.spike_factor:g} x the mean "
                      f"{sum(self.good) / len(self.good):.4f} of the last {len(self.good)} "
                      "good steps")
        else:
            reason = ""
        return reason

    def count(self, bad: bool, out: dict) -> None:
        if bad:
            self.streak += 1
            return
        self.streak = 0
        if not out["skipped"]:
            self.good = (self.good + [out["loss"]])[-self.WINDOW:]


def _any_rank_reason(reason: str, device: torch.device) -> str:
    """``reason`` if any rank saw a bad step (every rank then takes the same branch)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return reason
    flag = torch.tensor([1.0 if reason else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return reason or ("bad step on another rank" if flag.item() > 0 else "")


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
        backend = parallel.resolve_backend(cfg.parallel.backend, self.device)
        timeout_s = watchdog.collective_timeout_s(cfg.parallel.timeout_s, backend)
        watchdog.set_timeout(timeout_s)
        if backend == "nccl":  # read when the NCCL process group starts
            watchdog.enable_flight_recorder(cfg.run.dir)
        watchdog.mark("rendezvous")
        self.dims = parallel.initialize(cfg.parallel, self.device, timeout_minutes=timeout_s / 60)
        watchdog.mark("setup")
        self.rank = dist.get_rank()
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if restart:
            log0(f"torchrun restart {restart} of {os.environ.get('TORCHELASTIC_MAX_RESTARTS', '?')}"
                 f": resuming from the run's latest checkpoint")
        self.run_dir = cfg.run.dir
        self.ckpt_dir = checkpoint_dir(self.run_dir)
        if self.rank == 0:
            Path(self.ckpt_dir).mkdir(parents=True, exist_ok=True)
            (Path(self.run_dir) / "config.yaml").write_text(dump_yaml(cfg), encoding="utf-8")
        dist.barrier()
        _seed(cfg.train.seed + 100 * parallel.pp_rank())
        self.state = TrainState()
        self._build_engine()
        watchdog.mark("resume")
        self._resume()
        watchdog.mark("data", self.state.step)
        self._build_data()
        self.metrics = MetricsWriter(
            self.run_dir, enabled=self.rank == 0, wandb_mode=cfg.logging.wandb,
            project=cfg.logging.wandb_project, run_name=cfg.run.name, config=to_dict(cfg),
            tensorboard=cfg.logging.tensorboard)
        self.stop.arm()  # from here a SIGTERM saves at the next step boundary (see _StopFlag)

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
        self.checkpoints = TrainingCheckpoints(self.ckpt_dir, cfg.checkpoint,
                                               self.engine.checkpoint_state())
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
        weights (model directory, ModelScope or Hugging Face dir) that start the run at step 0.

        The run's own checkpoint is verified against its manifest first; a damaged newest one is
        named and the newest intact one resumed (``checkpoint.require_latest``: fail instead). A
        ``checkpoint.load`` checkpoint is verified and refused when damaged."""
        ck = self.cfg.checkpoint
        directory = self.ckpt_dir
        tag = resume_tag(self.ckpt_dir, require_latest=ck.require_latest, log=log0)
        if tag is None and ck.load:
            if self._load_pretrained(ck.load):
                return
            directory, tag = resolve_load(ck.load)
            verify_or_raise(directory, tag)
        if tag is None:
            return
        loaded = self.checkpoints.load(directory, tag)
        client = loaded.client
        self.state = TrainState(step=int(client["step"]),
                                consumed_samples=int(client["consumed_samples"]))
        if not loaded.rng_restored:
            # Another TP/PP layout: per-rank RNG streams do not map across layouts; reseed.
            seed = self.cfg.train.seed + 100 * parallel.pp_rank() + 7919 * self.state.step
            _seed(seed)
            self.engine.dropout_rng.seed(seed, parallel.tp_rank())
        log0(f"resumed from {directory}/{tag}: step {self.state.step}, "
             f"{self.state.consumed_samples} samples consumed; read the "
             f"{loaded.source}")

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
            (planned, n_valid, 0), cfg.train.seed, cache,
            weights_schedule=cfg.data.weights_schedule or None)
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
        skipped_total = bad_total = 0
        last_saved = st.step
        # A resume re-runs the steps logged after its checkpoint: each step is logged once.
        self.metrics.truncate_after(st.step)
        health = _StepHealth(t.precision, t.loss_spike_factor)
        rewinds = 0
        while st.step < t.steps:
            window.resume()
            gb = batch_size_at(st.consumed_samples, t.global_batch_size, t.rampup_batch_size)
            self.engine.set_global_batch(gb)
            n_micro = gb // (t.micro_batch_size * self.dims.dp)
            watchdog.mark("data", st.step + 1)  # where a collective timeout says it was
            batches = self._micro_batches(self.train_ds, st.consumed_samples, n_micro)
            lr = learning_rate(cfg.optim, tokens=st.consumed_samples * seq, step=st.step)
            self.engine.set_lr(lr)
            watchdog.mark("train_step")
            out = self.engine.train_step(batches)  # its loss is a host float: the GPU is done
            window.pause(tokens=gb * seq)
            if "compile_s" in out:  # train.compile: this first step built the graphs
                log0(f"torch.compile: {out['compile_s']:.1f} s compiling the decoder layers "
                     f"(in step {st.step + 1}, counted in its tokens/s window)")
                self.metrics.log({"step": st.step + 1, "compile_s": out["compile_s"]})
            st.step += 1
            st.consumed_samples += gb
            window_losses.append(out["loss"])
            skipped_total += int(out["skipped"])
            # A bad step (NaN/Inf loss or grad norm, a loss spike) was skipped by the engine
            # (weights untouched) unless said otherwise; max_bad_steps in a row stop the run
            # with nothing saved, so `latest` stays at the last good checkpoint.
            reason = _any_rank_reason(health.check(out), self.device)
            health.count(bool(reason), out)
            if reason:
                bad_total += 1
                applied = "skipped, weights unchanged" if out["skipped"] else "applied"
                log0(f"step {st.step}: bad step ({reason}); optimizer step {applied} "
                     f"[{health.streak}/{t.max_bad_steps} in a row]")
            too_many = bool(reason) and health.streak >= t.max_bad_steps
            if st.step % t.log_interval == 0 or st.step == t.steps or too_many:
                window_tokens, elapsed = window.take()
                tps = window_tokens / elapsed
                tflops = fpt * tps / self.dims.world / 1e12
                record = {
                    "step": st.step, "loss": sum(window_losses) / len(window_losses),
                    "bad_steps": bad_total,
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
            if too_many:
                why = (f"{health.streak} consecutive bad steps (steps "
                       f"{st.step - health.streak + 1}-{st.step}, train.max_bad_steps="
                       f"{t.max_bad_steps}); last: {reason}")
                if rewinds >= t.rewind_on_bad_steps or latest_tag(self.ckpt_dir) is None:
                    self._stop_for_bad_steps(why)
                # What large runs do for loss spikes: back to the last good weights, and on
                # with the data after the bad batches. Everything since that checkpoint is
                # skipped (the good steps before the streak too): the sampler is a position
                # in the sample order, so only a contiguous range can be skipped.
                rewinds += 1
                skip_to, bad_step = st.consumed_samples, st.step
                self._resume()
                st = self.state
                log0(f"{why}: rewound to step {st.step} (rewind {rewinds}/"
                     f"{t.rewind_on_bad_steps}); skipping samples {st.consumed_samples}-"
                     f"{skip_to - 1}, the batches of steps {st.step + 1}-{bad_step}")
                st.consumed_samples = skip_to
                last_saved = st.step
                self.metrics.truncate_after(st.step)
                health = _StepHealth(t.precision, t.loss_spike_factor)
                continue
            if t.eval_interval and self.valid_ds is not None and (
                    st.step % t.eval_interval == 0 or st.step == t.steps):
                watchdog.mark("eval")
                self.evaluate()
            watchdog.mark("stop_vote")
            stopping = stop.any_rank(self.device)
            interval = cfg.checkpoint.interval
            # No interval checkpoint inside a run of bad steps: the next one is taken after a
            # good step, so the newest checkpoint is always one to go back to.
            if stopping or (interval and st.step % interval == 0 and health.streak == 0):
                self._save_if_finite()
                last_saved = st.step
            if stopping:
                log0(f"stop signal received: saved step {st.step}, exiting")
                break
        if last_saved != st.step:
            self._save_if_finite()
        if st.step >= t.steps:
            if not self.engine.weights_finite():
                self._stop_for_bad_steps("the final weights are not finite")
            self.export_model(os.path.join(self.run_dir, "model"))
        self.metrics.close()
        stop.release()
        return st

    def _save_if_finite(self) -> None:
        """``save()``, unless a weight is NaN/Inf (checked on every rank): then the run stops
        and ``latest`` stays at the last good checkpoint."""
        if not self.engine.weights_finite():
            self._stop_for_bad_steps(f"the weights at step {self.state.step} are not finite")
        self.save()

    def _stop_for_bad_steps(self, why: str) -> None:
        """End a run that cannot go on safely: no checkpoint, no model directory."""
        from megagpt.errors import TrainingError

        latest = latest_tag(self.ckpt_dir)  # the newest committed one: saved before the streak
        last = f"{self.ckpt_dir}/{latest}" if latest else "none (step 0)"
        self.metrics.close()
        self.stop.release()
        raise TrainingError(
            f"stopping at step {self.state.step}: {why}. Nothing was saved or exported; the "
            f"last good checkpoint is {last}. A relaunch resumes from it: lower optim.lr, "
            f"check the data, or raise train.max_bad_steps")

    def export_model(self, directory: str) -> None:
        """Write the consolidated model directory (config, tokenizer, safetensors weights).

        Collective. The (dp 0, tp 0) rank of each pipeline stage writes that stage's shard, so
        no rank ever holds the whole model (a shared filesystem is assumed, as for
        checkpoints).
        """
        from megagpt.checkpoint import model_dir

        watchdog.mark("export", self.state.step)
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
        self.run_eval_tasks()
        return loss

    def run_eval_tasks(self) -> None:
        """``train.eval_tasks``: lm-eval tasks beside validation (megagpt.evaluation), logged
        as ``eval/<task>/<metric>`` at this step; pretraining and fine-tuning alike."""
        if not self.cfg.train.eval_tasks:
            return
        from megagpt.evaluation.training import run_eval_tasks

        found = run_eval_tasks(
            self.engine.module, self.tokenizer, tasks=self.cfg.train.eval_tasks,
            limit=self.cfg.train.eval_tasks_limit, vocab_size=self.cfg.model.vocab_size,
            max_positions=self.cfg.model.max_position_embeddings,
            tp_group=parallel.tp_group(), tp_size=self.dims.tp, step=self.state.step,
            log=self.metrics.log, batch_size=self.cfg.train.micro_batch_size)
        log0(f"eval tasks at step {self.state.step} | " + ", ".join(
            f"{k.removeprefix('eval/')} {v:.4f}" for k, v in found.items()))

    def save(self) -> None:
        """Checkpoint this step (``megagpt.checkpoint.training`` writes and commits it)."""
        watchdog.mark("save", self.state.step)
        tag = self.checkpoints.save(self.state.step, {
            "step": self.state.step, "consumed_samples": self.state.consumed_samples,
            "config": to_dict(self.cfg)})
        log0(f"saved checkpoint {self.ckpt_dir}/{tag}")


def train(cfg: Config) -> TrainState:
    """Run ``megagpt train`` for a loaded config; returns the final step and samples."""
    return Trainer(cfg).run()
