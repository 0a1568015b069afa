"""GPU types and cluster shapes the planner knows, with the numbers it assumes for them.

Peak TFLOP/s come from ``megagpt.training.metrics.PEAK_TFLOPS`` (dense, not 2:4 sparse; keyed
by the name ``torch.cuda.get_device_name`` reports), so the planner's MFU and the trainer's MFU
share one denominator. Link bandwidths are per GPU and per direction, from the vendors'
datasheets:

* NVLink 4 (H100/H200 SXM): 900 GB/s bidirectional -> 450 GB/s each way; NVLink 3 (A100 SXM):
  600 -> 300 GB/s.
* InfiniBand: one NIC per GPU, NDR 400 Gb/s = 50 GB/s (H100/H200 clusters, e.g. DGX H100) or
  HDR 200 Gb/s = 25 GB/s (A100 clusters, e.g. DGX A100).

The communication model multiplies these by ``LINK_EFFICIENCY`` (what NCCL reaches on large
messages, stated as an assumption, not measured here).
"""

from __future__ import annotations

from dataclasses import dataclass

from megagpt.training.metrics import peak_tflops

GIB = 2**30
# Fraction of the nominal link bandwidth that NCCL collectives reach on large messages.
LINK_EFFICIENCY = 0.8


@dataclass(frozen=True)
class GPUType:
    name: str
    memory_gib: float  # HBM capacity as the driver reports it (80 GB parts show ~79.6 GiB)
    device_name: str  # torch.cuda.get_device_name: the row of metrics.PEAK_TFLOPS
    nvlink_gbs: float  # intra-node GB/s per GPU per direction
    ib_gbs: float  # inter-node GB/s per GPU per direction
    note: str = ""

    def peak_tflops(self, precision: str, *, tf32: bool = True) -> float:
        """Dense peak TFLOP/s for ``precision`` (fp32: TF32 tensor cores when ``tf32``, as
        train.tf32 makes the trainer run them)."""
        value = peak_tflops(self.device_name, precision, tf32=tf32)
        if not value:
            raise ValueError(
                f"--gpu {self.name} has no {precision} tensor-core peak; "
                f"use another train.precision"
            )
        return value


GPU_TYPES: dict[str, GPUType] = {
    g.name: g
    for g in (
        GPUType(
            "h100-80gb",
            79.6,
            "NVIDIA H100 80GB HBM3",
            450.0,
            50.0,
            "H100 SXM5, NVLink 4, NDR 400G per GPU",
        ),
        GPUType(
            "h200-141gb", 139.8, "NVIDIA H200", 450.0, 50.0, "H200 SXM, NVLink 4, NDR 400G per GPU"
        ),
        GPUType(
            "a100-80gb",
            79.2,
            "NVIDIA A100-SXM4-80GB",
            300.0,
            25.0,
            "A100 SXM4, NVLink 3, HDR 200G per GPU",
        ),
        GPUType(
            "a100-40gb",
            39.4,
            "NVIDIA A100-SXM4-40GB",
            300.0,
            25.0,
            "A100 SXM4, NVLink 3, HDR 200G per GPU",
        ),
    )
}


def gpu_type(name: str) -> GPUType:
    """The GPU type ``name`` (e.g. "h100-80gb"); ValueError naming --gpu and the known types."""
    key = name.lower()
    if key not in GPU_TYPES:
        raise ValueError(f"--gpu {name!r} is not a known GPU type; known: {', '.join(GPU_TYPES)}")
    return GPU_TYPES[key]


@dataclass(frozen=True)
class ClusterShape:
    nodes: int
    gpus_per_node: int
    gpu: GPUType

    def __post_init__(self):
        if self.nodes < 1:
            raise ValueError(f"--nodes must be >= 1, got {self.nodes}")
        if self.gpus_per_node < 1:
            raise ValueError(f"--gpus-per-node must be >= 1, got {self.gpus_per_node}")

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def describe(self) -> str:
        return (
            f"{self.nodes} node(s) x {self.gpus_per_node} {self.gpu.name} = {self.world} "
            f"GPUs ({self.gpu.note})"
        )

    def group_bandwidth(self, span: int) -> float:
        """Bytes/s per GPU for a collective over ranks spread over ``span`` consecutive ranks:
        NVLink when they fit in one node, InfiniBand otherwise (the slowest link bounds a ring).
        """
        gbs = self.gpu.nvlink_gbs if span <= self.gpus_per_node else self.gpu.ib_gbs
        return gbs * 1e9 * LINK_EFFICIENCY
