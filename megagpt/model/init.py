"""Layout-independent initialisation.

Every parameter is drawn as its FULL (unsharded) tensor from a generator seeded by
(seed, canonical parameter name), then the local shard is cut out. So TP=1 and TP=4, PP=1 and
PP=8 start from bit-identical weights: parity tests compare layouts exactly and a checkpoint can
be resharded. The cost is a full-size temporary per parameter at init, as megatron-core's own CPU
initialisation has.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from megagpt.checkpoint.canonical import WORD
from megagpt.config.schema import ModelConfig
from megagpt.model.layers import output_init_std

_OUTPUT_PROJECTIONS = ("attention.dense.weight", "mlp.dense_4h_to_h.weight")


def canonical_parameters(model: nn.Module):
    """Yield (canonical name, parameter) of every parameter, e.g. "layers.3.mlp.dense_4h_to_h.bias".

    Names do not depend on TP/PP/DP; a tied weight that appears on two pipeline stages yields
    the same name on both.
    """
    seen: set[int] = set()
    for module in model.modules():
        prefix = getattr(module, "canonical_name", None)
        if not isinstance(prefix, str):
            continue
        for name, p in module.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            yield f"{prefix}.{name}", p


def full_shape(p: torch.Tensor, tp: int) -> tuple[list[int], int | None]:
    """Unsharded shape of a (possibly tensor-parallel) parameter and its partition dim."""
    shape = list(p.shape)
    if getattr(p, "tensor_model_parallel", False) and tp > 1:
        dim = p.partition_dim
        shape[dim] *= tp
        return shape, dim
    return shape, None


def _std_for(name: str, cfg: ModelConfig) -> float | None:
    """Normal std for a weight, or None for the constant-initialised ones."""
    if name.endswith(".bias"):
        return None
    if "layernorm" in name:
        return None
    if name.endswith(_OUTPUT_PROJECTIONS):
        return output_init_std(cfg)
    return cfg.init_std


@torch.no_grad()
def initialize_weights(
    model: nn.Module, cfg: ModelConfig, seed: int, tp_rank: int, tp_size: int
) -> None:
    """Initialise every parameter of ``model`` (one pipeline stage or the whole GPT) in place.

    Megatron init: N(0, init_std); the attention and MLP output projections N(0, std/sqrt(2L));
    biases 0; LayerNorm weight 1, bias 0; embedding rows past the true vocab 0.
    """
    for name, p in canonical_parameters(model):
        std = _std_for(name, cfg)
        if std is None:
            p.fill_(1.0 if ("layernorm" in name and name.endswith(".weight")) else 0.0)
            continue
        shape, dim = full_shape(p, tp_size)
        gen = torch.Generator(device="cpu").manual_seed(
            (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)
        )
        full = torch.randn(shape, generator=gen, dtype=torch.float32) * std
        if name == WORD:
            full[cfg.vocab_size :] = 0.0
        if dim is not None:
            full = full.chunk(tp_size, dim=dim)[tp_rank]
        p.copy_(full.to(dtype=p.dtype, device=p.device))
