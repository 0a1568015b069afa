"""The Trainer: the training loop over a run's parts, with exact resume.

``megagpt.training.setup.build_run`` builds the parts (config, process groups, engine,
checkpoints, data, metrics) in one straight line; the Trainer loops: batches, LR, the step, bad
steps (skip, rewind or stop), metrics, evaluation, stop signals, checkpoints, and the model
directory at the end. Pretraining (``Trainer(cfg)``) and fine-tuning
(``megagpt.training.finetune``) differ only in the datasets, batches and evaluator they give it.
"""

from __future__ import annotations

import os

import torch.distributed as dist

from megagpt.checkpoint import latest_tag
from megagpt.config import Config, accumulation_steps
from megagpt.config.schema import to_dict
from megagpt.training import watchdog
from megagpt.training.health import StepHealth, any_rank_reason
from megagpt.training.metrics import ThroughputWindow, device_peak_tflops, flops_per_token
from megagpt.training.precision import configure_matmul_precision
from megagpt.training.schedules import batch_size_at, learning_rate
from megagpt.training.setup import (
    BatchSource,
    IndexedBatches,
    RunParts,
    TrainState,
    build_run,
    log0,
    resume,
)
from megagpt.training.signals import StopFlag
from megagpt.training.validation import Evaluator, ValidationLoss

__all__ = ["Trainer", "TrainState", "log0", "train"]


class Trainer:
    """Trains a run's parts to ``train.steps``; ``run()`` returns the final state.

    ``Trainer(cfg)`` pretrains on ``cfg``'s indexed datasets with validation loss as the
    evaluator. ``Trainer.from_parts`` takes parts built elsewhere with their own batches and
    evaluator (fine-tuning).
    """

    def __init__(self, cfg: Config):
        # The stop flag first: a Slurm pre-timeout signal during setup must not kill the job
        # (and torchrun starts workers with SIGUSR1 ignored).
        stop = StopFlag()
        parts = build_run(cfg, stop)
        batches = IndexedBatches(cfg.train.micro_batch_size, parts.ctx.dp_rank, parts.ctx.dims.dp)
        self._adopt(parts, batches, ValidationLoss(parts, batches))

    @classmethod
    def from_parts(cls, parts: RunParts, batches: BatchSource, evaluate: Evaluator) -> Trainer:
        """A trainer over ``parts`` (``build_run``'s), taking this rank's micro-batches from
        ``batches(dataset, first_sample, count)`` and evaluating with ``evaluate(step)``."""
        trainer = cls.__new__(cls)
        trainer._adopt(parts, batches, evaluate)
        return trainer

    def _adopt(self, parts: RunParts, batches: BatchSource, evaluate: Evaluator) -> None:
        self.cfg, self.ctx, self.stop = parts.cfg, parts.ctx, parts.stop
        self.dims, self.device, self.rank = parts.ctx.dims, parts.ctx.device, parts.ctx.rank
        self.tokenizer, self.engine, self.checkpoints = (
            parts.tokenizer,
            parts.engine,
            parts.checkpoints,
        )
        self.state, self.train_ds, self.valid_ds = parts.state, parts.train_ds, parts.valid_ds
        self.metrics, self.padded_vocab = parts.metrics, parts.padded_vocab
        self.run_dir, self.ckpt_dir = parts.run_dir, parts.checkpoints.directory
        self._micro_batches, self.evaluate = batches, evaluate
        self.stop.arm()  # from here a SIGTERM saves at the next step boundary (see StopFlag)

    # -- the loop -------------------------------------------------------------------------
    def run(self) -> TrainState:
        """Train to ``train.steps`` (or a stop signal), save, export ``<run.dir>/model`` when the
        run is complete; returns the final state. Collective."""
        cfg, t, st = self.cfg, self.cfg.train, self.state
        seq = cfg.model.seq_length
        stop = self.stop
        tf32 = configure_matmul_precision(self.device, t.tf32)  # set in __init__; returns it
        fpt = flops_per_token(cfg.model, self.padded_vocab, seq)
        peak = device_peak_tflops(
            self.device, t.precision, cfg.logging.peak_tflops, tf32=tf32, log=log0
        )
        if st.step >= t.steps:
            log0(f"nothing to do: at step {st.step}, train.steps={t.steps}")
        # Only batch assembly + the step are timed: evaluation, saves and the stop vote below
        # stay out of tokens/s and MFU.
        window, window_losses = ThroughputWindow(), []
        skipped_total = bad_total = 0
        last_saved = st.step
        # A resume re-runs the steps logged after its checkpoint: each step is logged once.
        self.metrics.truncate_after(st.step)
        health = StepHealth(t.precision, t.loss_spike_factor)
        rewinds = 0
        while st.step < t.steps:
            window.resume()
            gb = batch_size_at(st.consumed_samples, t.global_batch_size, t.rampup_batch_size)
            self.engine.set_global_batch(gb)
            n_micro = accumulation_steps(gb, t.micro_batch_size, self.dims.dp)
            watchdog.mark("data", st.step + 1)  # where a collective timeout says it was
            batches = self._micro_batches(self.train_ds, st.consumed_samples, n_micro)
            lr = learning_rate(cfg.optim, tokens=st.consumed_samples * seq, step=st.step)
            self.engine.set_lr(lr)
            watchdog.mark("train_step")
            out = self.engine.train_step(batches)  # its loss is a host float: the GPU is done
            window.pause(tokens=gb * seq)
            if "compile_s" in out:  # train.compile: this first step built the graphs
                log0(
                    f"torch.compile: {out['compile_s']:.1f} s compiling the decoder layers "
                    f"(in step {st.step + 1}, counted in its tokens/s window)"
                )
                self.metrics.log({"step": st.step + 1, "compile_s": out["compile_s"]})
            st.step += 1
            st.consumed_samples += gb
            window_losses.append(out["loss"])
            skipped_total += int(out["skipped"])
            # A bad step (NaN/Inf loss or grad norm, a loss spike) was skipped by the engine
            # (weights untouched) unless said otherwise; max_bad_steps in a row stop the run
            # with nothing saved, so `latest` stays at the last good checkpoint.
            reason = any_rank_reason(health.check(out), self.device)
            health.count(bool(reason), out)
            if reason:
                bad_total += 1
                applied = "skipped, weights unchanged" if out["skipped"] else "applied"
                log0(
                    f"step {st.step}: bad step ({reason}); optimizer step {applied} "
                    f"[{health.streak}/{t.max_bad_steps} in a row]"
                )
            too_many = bool(reason) and health.streak >= t.max_bad_steps
            if st.step % t.log_interval == 0 or st.step == t.steps or too_many:
                window_tokens, elapsed = window.take()
                tps = window_tokens / elapsed
                tflops = fpt * tps / self.dims.world / 1e12
                record = {
                    "step": st.step,
                    "loss": sum(window_losses) / len(window_losses),
                    "bad_steps": bad_total,
                    "lr": lr,
                    "grad_norm": out["grad_norm"],
                    "loss_scale": out["loss_scale"],
                    "skipped_steps": skipped_total,
                    "consumed_samples": st.consumed_samples,
                    "global_batch": gb,
                    "tokens_per_s": tps,
                    "tflops_per_device": tflops,
                    "mfu": tflops / peak if peak else None,
                }
                self.metrics.log(record)
                mfu = f" | MFU {record['mfu']:.1%}" if peak else ""
                log0(
                    f"step {st.step}/{t.steps} | loss {record['loss']:.4f} | lr {lr:.3e} | "
                    f"grad {out['grad_norm']:.3f} | {tps:,.0f} tok/s | "
                    f"{tflops:.3f} TFLOP/s/device{mfu}"
                )
                window_losses = []
            if too_many:
                why = (
                    f"{health.streak} consecutive bad steps (steps "
                    f"{st.step - health.streak + 1}-{st.step}, train.max_bad_steps="
                    f"{t.max_bad_steps}); last: {reason}"
                )
                if rewinds >= t.rewind_on_bad_steps or latest_tag(self.ckpt_dir) is None:
                    self._stop_for_bad_steps(why)
                # What large runs do for loss spikes: back to the last good weights, and on
                # with the data after the bad batches. Everything since that checkpoint is
                # skipped (the good steps before the streak too): the sampler is a position
                # in the sample order, so only a contiguous range can be skipped.
                rewinds += 1
                skip_to, bad_step = st.consumed_samples, st.step
                st = self.state = resume(cfg, self.ctx, self.engine, self.checkpoints)
                log0(
                    f"{why}: rewound to step {st.step} (rewind {rewinds}/"
                    f"{t.rewind_on_bad_steps}); skipping samples {st.consumed_samples}-"
                    f"{skip_to - 1}, the batches of steps {st.step + 1}-{bad_step}"
                )
                st.consumed_samples = skip_to
                last_saved = st.step
                self.metrics.truncate_after(st.step)
                health = StepHealth(t.precision, t.loss_spike_factor)
                continue
            if (
                t.eval_interval
                and self.valid_ds is not None
                and (st.step % t.eval_interval == 0 or st.step == t.steps)
            ):
                watchdog.mark("eval")
                self.evaluate(st.step)
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
            f"check the data, or raise train.max_bad_steps"
        )

    def export_model(self, directory: str) -> None:
        """Write the consolidated model directory (config, tokenizer, safetensors weights).

        Collective. The (dp 0, tp 0) rank of each pipeline stage writes that stage's shard, so
        no rank ever holds the whole model (a shared filesystem is assumed, as for
        checkpoints).
        """
        from megagpt.checkpoint import model_dir

        watchdog.mark("export", self.state.step)
        ctx = self.ctx
        tensors = model_dir.full_tensors(
            self.engine.module,
            self.cfg.model,
            ctx.tp_group,
            self.dims.tp,
            getter=self.engine.fp32_value,
        )
        if ctx.dp_rank == 0 and ctx.tp_rank == 0:
            model_dir.save_tensors(directory, tensors, ctx.pp_rank, self.dims.pp)
        dist.barrier()
        if self.rank == 0:
            if self.dims.pp > 1:
                model_dir.write_index(directory, self.dims.pp)
            model_dir.write_config(
                directory,
                self.cfg.model,
                {
                    "trained_steps": self.state.step,
                    "trained_tokens": self.state.consumed_samples * self.cfg.model.seq_length,
                },
            )
            model_dir.copy_tokenizer(directory, self.cfg.data.tokenizer)
        dist.barrier()
        log0(f"wrote model directory {directory}")

    def save(self) -> None:
        """Checkpoint this step (``megagpt.checkpoint.training`` writes and commits it)."""
        watchdog.mark("save", self.state.step)
        tag = self.checkpoints.save(
            self.state.step,
            {
                "step": self.state.step,
                "consumed_samples": self.state.consumed_samples,
                "config": to_dict(self.cfg),
            },
        )
        log0(f"saved checkpoint {self.ckpt_dir}/{tag}")


def train(cfg: Config) -> TrainState:
    """Run ``megagpt train`` for a loaded config; returns the final step and samples."""
    return Trainer(cfg).run()
