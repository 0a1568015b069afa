"""How fp32 matmuls run on CUDA: TF32 tensor cores or IEEE fp32 (``train.tf32``).

PyTorch leaves cuBLAS matmuls in IEEE fp32 by default, so an fp32 run never touched the TF32
tensor cores whose peak its MFU was divided by. The trainer sets the flags once, after the
device is resolved, and MFU picks the peak column from the same decision.
"""

from __future__ import annotations

import torch


def uses_tf32(device_type: str, tf32: bool) -> bool:
    """Whether fp32 matmuls run on TF32 tensor cores: ``train.tf32`` on a CUDA device (CPUs
    have no TF32 path). Pure; the MFU peak of an fp32 run follows it."""
    return tf32 and device_type == "cuda"


def configure_matmul_precision(device: torch.device, tf32: bool) -> bool:
    """Set cuBLAS and cuDNN fp32 math to TF32 (``tf32``) or IEEE fp32 on a CUDA ``device``;
    returns ``uses_tf32``. Nothing changes on CPU.

    Set both ways explicitly (cuDNN defaults to TF32, cuBLAS to IEEE) so that ``train.tf32``
    false means IEEE everywhere and the plain-fp32 peak is the honest denominator. The legacy
    ``allow_tf32`` flags are used, not the newer ``fp32_precision`` strings: PyTorch (2.13)
    raises when the legacy flags are read after the new API set them, while the new API reads
    the legacy settings fine."""
    on = uses_tf32(device.type, tf32)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on
    return on
