"""The GPT: the whole model (pipeline size 1) or its per-stage layer list (pipeline > 1).

Both paths use the same blocks in the same order:
WordEmbedding -> PositionEmbedding -> DecoderLayer x L -> FinalNorm -> WordEmbedding.logits (tied).
"""

from __future__ import annotations

import torch
from megatron.core import ModelParallelConfig
from torch import nn

from megagpt.config.schema import ModelConfig
from megagpt.model.layers import (
    DecoderLayer,
    FinalNorm,
    KVCache,
    PositionEmbedding,
    WordEmbedding,
    lm_loss,
)


def padded_vocab_size(vocab: int, tp: int, multiple: int = 128) -> int:
    """The embedding's row count: ``vocab`` rounded up to a multiple of ``multiple * tp``."""
    step = multiple * tp
    return ((vocab + step - 1) // step) * step


class GPTModel(nn.Module):
    """All blocks on one pipeline stage. ``forward(tokens)`` -> vocab-parallel logits
    [s, b, V/tp]; with ``labels`` it returns the mean masked cross entropy instead."""

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig, recompute: str = "none"):
        super().__init__()
        self.cfg = cfg
        padded = padded_vocab_size(cfg.vocab_size, mp.tensor_model_parallel_size)
        self.word = WordEmbedding(cfg, mp, padded)
        self.position = PositionEmbedding(cfg, mp)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, mp, i, recompute) for i in range(cfg.num_layers))
        self.final_norm = FinalNorm(cfg, mp)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None,
                loss_mask: torch.Tensor | None = None, kv_cache: KVCache | None = None
                ) -> torch.Tensor:
        offset = kv_cache.length if kv_cache is not None else 0
        h = self.position(self.word(tokens), position_offset=offset)  # [b, s] -> [s, b, h]
        for layer in self.layers:
            h = layer(h, kv_cache)
        if kv_cache is not None:
            kv_cache.length += tokens.shape[1]
        logits = self.word.logits(self.final_norm(h))
        if labels is None:
            return logits
        return lm_loss(logits, labels, loss_mask)


def blocks(model: nn.Module):
    """The top-level blocks (those with a ``canonical_name``) of a model or pipeline stage."""
    for m in model.modules():
        if isinstance(getattr(m, "canonical_name", None), str):
            yield m
