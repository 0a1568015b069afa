"""Throughput accounting: tokens/s, model TFLOP/s per device and MFU, and the metric sinks.

FLOPs per trained token (model FLOPs, the numerator of MFU):

    6 * (12 * L * h^2)          dense matmuls of the decoder (QKV 3h^2, out h^2, MLP 8h^2)
  + 6 * L * s * h               attention scores and values, halved for the causal mask
  + 6 * h * V_padded            the tied output layer

Forward + backward = 3x forward; each multiply-add = 2 FLOPs. Activation recompute is NOT counted
(this is MFU, not HFU), attention IS counted (causal-halved, as Megatron-LM and llm.c do).
MFU = achieved model TFLOP/s per device / the device's dense peak for the training precision.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from megagpt.config.schema import ModelConfig

if TYPE_CHECKING:  # the planner imports this module; keep it free of torch at import
    import torch

# Dense (not 2:4-sparse) peak TFLOP/s per device, by precision. Sources: NVIDIA datasheets
# (H100 SXM bf16 989, A100 bf16 312; fp32 runs use TF32 tensor cores).
PEAK_TFLOPS = {
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.5},
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.5},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 183.0},
    "A10": {"bf16": 125.0, "fp16": 125.0, "fp32": 62.5},
    "V100": {"bf16": 0.0, "fp16": 125.0, "fp32": 15.7},
}


def flops_per_token(m: ModelConfig, padded_vocab: int, seq_length: int) -> float:
    """Training model FLOPs per token (see the module docstring for the formula)."""
    h, L = m.hidden_size, m.num_layers
    ffn_ratio = m.ffn / h
    dense = (4 + 2 * ffn_ratio) * h * h * L  # QKV + out = 4h^2, MLP = 2*ffn*h
    return 6.0 * dense + 6.0 * L * seq_length * h + 6.0 * h * padded_vocab


def device_peak_tflops(device: torch.device, precision: str, override: float = 0.0
                       ) -> float | None:
    """Peak dense TFLOP/s of ``device`` for ``precision``; None when unknown (CPU)."""
    if override > 0:
        return override
    if device.type != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(device)
    for key, table in PEAK_TFLOPS.items():
        if key in name:
            return table.get(precision) or None
    return None


class MetricsWriter:
    """metrics.jsonl in the run directory plus Weights & Biases (offline unless configured).

    Only one rank writes; the others get a writer whose methods do nothing.
    """

    def __init__(self, run_dir: str, *, enabled: bool, wandb_mode: str, project: str,
                 run_name: str, config: dict):
        self.enabled = enabled
        self._file = None
        self._wandb = None
        if not enabled:
            return
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self._file = open(os.path.join(run_dir, "metrics.jsonl"), "a", encoding="utf-8")
        if wandb_mode != "disabled":
            try:
                import wandb

                self._wandb = wandb.init(project=project, name=run_name, dir=run_dir,
                                         mode=wandb_mode, config=config, resume="allow")
            except Exception as e:  # a logger must never stop training
                print(f"[megagpt] wandb disabled: {type(e).__name__}: {e}", flush=True)
                self._wandb = None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"},
                            step=record["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
