"""Throughput accounting: tokens/s, model TFLOP/s per device and MFU, and the metric sinks.

FLOPs per trained token (model FLOPs, the numerator of MFU):

    6 * (12 * L * h^2)          dense matmuls of the decoder (QKV 3h^2, out h^2, MLP 8h^2)
  + 6 * L * s * h               attention scores and values, halved for the causal mask
  + 6 * h * V_padded            the tied output layer

Forward + backward = 3x forward; each multiply-add = 2 FLOPs. Activation recompute is NOT counted
(this is MFU, not HFU), attention IS counted (causal-halved, as Megatron-LM and llm.c do).
MFU = achieved model TFLOP/s per device / the device's dense peak for the training precision
(fp32: the TF32 tensor-core peak when train.tf32 lets matmuls use them, else plain fp32).
Tokens/s and MFU count only the training work of a logging window (``ThroughputWindow``).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from megagpt.config.schema import ModelConfig

if TYPE_CHECKING:  # the planner imports this module; keep it free of torch at import
    import torch


class DevicePeak(NamedTuple):
    """Dense (not 2:4-sparse) peak TFLOP/s of one device, from its NVIDIA datasheet (the
    datasheets quote the sparse figure for tensor cores: halved here)."""

    half: float  # bf16 / fp16 tensor cores
    tf32: float | None  # TF32 tensor cores (fp32 matmuls with train.tf32); None = no TF32 units
    fp32: float  # plain fp32, CUDA cores (fp32 matmuls without TF32)
    bf16: bool = True  # False: no bf16 tensor cores (V100 runs bf16 emulated; no honest peak)


# Keyed by the exact name torch.cuda.get_device_name reports: the variants of one chip differ
# (H100 PCIe and NVL run lower clocks and power than SXM), so a substring such as "H100" would
# give a PCIe card the SXM peak. Unknown names get no MFU until logging.peak_tflops is set.
PEAK_TFLOPS: dict[str, DevicePeak] = {
    # H100 SXM5 / H200 SXM: bf16 1,979*, TF32 989*, FP32 67 (989 = 1,979 / 2 rounded, the
    # figure Megatron-LM and torchtitan use).
    "NVIDIA H100 80GB HBM3": DevicePeak(989.0, 494.5, 67.0),
    "NVIDIA H200": DevicePeak(989.0, 494.5, 67.0),
    # H100 PCIe: bf16 1,513*, TF32 756*, FP32 51.
    "NVIDIA H100 PCIe": DevicePeak(756.5, 378.0, 51.0),
    # H100 NVL / H200 NVL (per GPU): bf16 1,671*, TF32 835*, FP32 60.
    "NVIDIA H100 NVL": DevicePeak(835.5, 417.5, 60.0),
    "NVIDIA H200 NVL": DevicePeak(835.5, 417.5, 60.0),
    # A100 SXM4 and PCIe, 40 and 80 GB: bf16 312, TF32 156, FP32 19.5 (one datasheet column).
    "NVIDIA A100-SXM4-80GB": DevicePeak(312.0, 156.0, 19.5),
    "NVIDIA A100-SXM4-40GB": DevicePeak(312.0, 156.0, 19.5),
    "NVIDIA A100 80GB PCIe": DevicePeak(312.0, 156.0, 19.5),
    "NVIDIA A100-PCIE-40GB": DevicePeak(312.0, 156.0, 19.5),
    # L40S: bf16 733*, TF32 366*, FP32 91.6.  A10: bf16 250*, TF32 125*, FP32 31.2.
    "NVIDIA L40S": DevicePeak(362.05, 183.0, 91.6),
    "NVIDIA A10": DevicePeak(125.0, 62.5, 31.2),
    # V100: fp16 tensor cores only (no bf16, no TF32). SXM2 125 / 15.7, PCIe 112 / 14,
    # V100S PCIe 130 / 16.4.
    "Tesla V100-SXM2-32GB": DevicePeak(125.0, None, 15.7, bf16=False),
    "Tesla V100-SXM2-16GB": DevicePeak(125.0, None, 15.7, bf16=False),
    "Tesla V100-PCIE-32GB": DevicePeak(112.0, None, 14.0, bf16=False),
    "Tesla V100-PCIE-16GB": DevicePeak(112.0, None, 14.0, bf16=False),
    "Tesla V100S-PCIE-32GB": DevicePeak(130.0, None, 16.4, bf16=False),
}


def _normalise(name: str) -> str:
    return " ".join(name.split()).casefold()


_BY_NAME = {_normalise(k): v for k, v in PEAK_TFLOPS.items()}


def flops_per_token(m: ModelConfig, padded_vocab: int, seq_length: int) -> float:
    """Training model FLOPs per token (see the module docstring for the formula)."""
    h, L = m.hidden_size, m.num_layers
    ffn_ratio = m.ffn / h
    dense = (4 + 2 * ffn_ratio) * h * h * L  # QKV + out = 4h^2, MLP = 2*ffn*h
    return 6.0 * dense + 6.0 * L * seq_length * h + 6.0 * h * padded_vocab


def device_peak(device_name: str) -> DevicePeak | None:
    """The table row of ``device_name`` (exact name, case and spacing ignored); None if unknown."""
    return _BY_NAME.get(_normalise(device_name))


def peak_tflops(
    device_name: str | None, precision: str, *, tf32: bool, override: float = 0.0
) -> float | None:
    """Dense peak TFLOP/s that MFU divides by, for a run in ``precision`` on ``device_name``
    (None: CPU or no name); ``tf32`` says whether fp32 matmuls run on TF32 tensor cores.

    ``override`` (logging.peak_tflops) > 0 wins. None when the device is unknown or has no
    honest peak for the precision (bf16 on V100). Pure: no torch, no GPU.
    """
    if override > 0:
        return override
    row = device_peak(device_name) if device_name else None
    if row is None:
        return None
    if precision in ("bf16", "fp16"):
        return row.half if (precision == "fp16" or row.bf16) else None
    if precision == "fp32":
        # Without TF32 units (V100) fp32 matmuls run on CUDA cores whatever the flag says.
        return row.tf32 if (tf32 and row.tf32) else row.fp32
    raise ValueError(f"train.precision={precision!r}: expected bf16, fp16 or fp32")


# Device names already warned about: the note is printed once per process, however many
# trainers or benchmarks ask (a plain module-level set; nothing else reads it).
_WARNED: set[str] = set()


def device_peak_tflops(
    device: torch.device,
    precision: str,
    override: float = 0.0,
    *,
    tf32: bool = True,
    log: Callable[[str], None] = print,
) -> float | None:
    """Peak dense TFLOP/s of ``device`` for ``precision`` (see ``peak_tflops``); None on CPU
    and on an unknown GPU, for which it logs once how to set ``logging.peak_tflops``."""
    if override > 0:
        return override
    if device.type != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(device)
    peak = peak_tflops(name, precision, tf32=tf32)
    if peak is None and name not in _WARNED:
        _WARNED.add(name)
        why = (
            "has no bf16 tensor cores"
            if device_peak(name) is not None
            else "is not in megagpt.training.metrics.PEAK_TFLOPS"
        )
        log(
            f"GPU {name!r} {why}: MFU is not reported; set logging.peak_tflops to its dense "
            f"{precision} peak TFLOP/s to get it"
        )
    return peak


class ThroughputWindow:
    """Tokens and seconds of training work between two log lines.

    Only the time between ``resume()`` and ``pause(tokens)`` counts, so what the loop does
    outside (evaluation, checkpoint saves, the stop-signal vote) lands in no window's
    tokens/s or MFU. ``clock`` (default ``time.perf_counter``) is injectable for tests.
    """

    def __init__(self, clock: Callable[[], float] | None = None):
        self._clock = clock or time.perf_counter
        self._since: float | None = None
        self.tokens = 0
        self.seconds = 0.0

    def resume(self) -> None:
        """Training work starts (batch assembly, then the step)."""
        if self._since is not None:
            raise RuntimeError("ThroughputWindow.resume() while already running")
        self._since = self._clock()

    def pause(self, tokens: int) -> None:
        """Training work of ``tokens`` tokens ends; the clock stops until ``resume()``."""
        if self._since is None:
            raise RuntimeError("ThroughputWindow.pause() without resume()")
        self.seconds += self._clock() - self._since
        self._since = None
        self.tokens += tokens

    def take(self) -> tuple[int, float]:
        """(tokens, seconds) since the last ``take()``; starts the next window."""
        if self._since is not None:
            raise RuntimeError("ThroughputWindow.take() while running: pause() first")
        out = (self.tokens, self.seconds)
        self.tokens, self.seconds = 0, 0.0
        return out


def strict_record(record: dict) -> dict:
    """``record`` with every non-finite float replaced by None and flagged by
    ``<key>_nonfinite: True`` (strict JSON readers reject NaN and Infinity)."""
    out = {}
    for key, value in record.items():
        if isinstance(value, float) and not math.isfinite(value):
            out[key] = None
            out[f"{key}_nonfinite"] = True
        else:
            out[key] = value
    return out


class MetricsWriter:
    """metrics.jsonl in the run directory plus Weights & Biases (offline unless configured)
    and, with ``tensorboard`` (logging.tensorboard), TensorBoard events in run_dir/tensorboard.

    Only one rank writes; the others get a writer whose methods do nothing.
    """

    def __init__(
        self,
        run_dir: str,
        *,
        enabled: bool,
        wandb_mode: str,
        project: str,
        run_name: str,
        config: dict,
        tensorboard: bool = False,
    ):
        self.enabled = enabled
        self._file = None
        self._wandb = None
        self._tb = None
        if not enabled:
            return
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self._file = open(os.path.join(run_dir, "metrics.jsonl"), "a", encoding="utf-8")
        if wandb_mode != "disabled":
            try:
                import wandb

                self._wandb = wandb.init(
                    project=project,
                    name=run_name,
                    dir=run_dir,
                    mode=wandb_mode,
                    config=config,
                    resume="allow",
                )
            except Exception as e:  # a logger must never stop training
                print(f"[megagpt] wandb disabled: {type(e).__name__}: {e}", flush=True)
                self._wandb = None
        if tensorboard:
            self._tb = _tensorboard_writer(os.path.join(run_dir, "tensorboard"))

    def log(self, record: dict) -> None:
        """Append ``record`` as one line of strict JSON: a non-finite float becomes null, with
        ``<key>_nonfinite: true`` beside it (Python's NaN/Infinity literals are not JSON)."""
        if not self.enabled:
            return
        self._file.write(json.dumps(strict_record(record), allow_nan=False) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        if self._tb is not None:
            for key, value in record.items():
                if (
                    key != "step"
                    and isinstance(value, (int, float))
                    and not isinstance(value, bool)
                ):
                    self._tb.add_scalar(key, value, record["step"])
            self._tb.flush()

    def truncate_after(self, step: int) -> None:
        """Drop the records of steps after ``step`` (a resume from the checkpoint of ``step``
        re-runs them), so each step appears once; also drops a line cut short by a kill.

        Rewritten through a temporary file and an atomic rename: a crash here leaves either
        the old file or the new one."""
        if not self.enabled or self._file is None:
            return
        path = self._file.name
        self._file.close()
        kept = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:  # a line half-written when the process was killed
                    continue
                if isinstance(record, dict) and record.get("step", 0) <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)
        self._file = open(path, "a", encoding="utf-8")
        if self._tb is not None:
            # TensorBoard cannot rewrite old event files: a new writer with purge_step hides
            # the earlier runs' events of the steps re-run from here.
            log_dir = self._tb.log_dir
            self._tb.close()
            self._tb = _tensorboard_writer(log_dir, purge_step=step + 1)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _tensorboard_writer(log_dir: str, purge_step: int | None = None):
    """A torch.utils.tensorboard SummaryWriter into ``log_dir``, or None (with a note) when the
    tensorboard package is missing: like wandb, a logger must never stop training."""
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=log_dir, purge_step=purge_step)
    except Exception as e:  # ImportError without the package; OSError on an unwritable dir
        print(
            f"[megagpt] tensorboard disabled: {type(e).__name__}: {e} (pip install "
            'tensorboard, or pip install -e ".[plot]")',
            flush=True,
        )
        return None
