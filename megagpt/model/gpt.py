"""The GPT: the whole model (pipeline size 1) or its per-stage layer list (pipeline > 1).

``gpt_blocks`` is the one block list both are built from, in order:
WordEmbedding -> PositionEmbedding -> DecoderLayer x L -> FinalNorm -> WordEmbedding.logits (tied).
``GPTModel`` builds all of it on one stage; the engine turns the same list into DeepSpeed's
pipeline layer specs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import ModelParallelConfig
from torch import nn

from megagpt.config.schema import ModelConfig
from megagpt.model.fused import TiedGradient
from megagpt.model.layers import (
    DecoderLayer,
    FinalNorm,
    KVCache,
    PositionEmbedding,
    WordEmbedding,
)
from megagpt.model.rng import TensorParallelRNG


@dataclass(frozen=True)
class Block:
    """One entry of the block list: ``cls(*args)``; ``tie`` names a weight shared with another
    entry (the word embedding and the output layer), whose forward is then ``method``."""

    cls: type
    args: tuple
    tie: str | None = None
    method: str = "forward"

    def build(self) -> nn.Module:
        return self.cls(*self.args)


def gpt_blocks(
    cfg: ModelConfig,
    mp: ModelParallelConfig,
    recompute: str = "none",
    rng: TensorParallelRNG | None = None,
) -> list[Block]:
    """The GPT's blocks in forward order; ``rng`` is the TP-region dropout stream they share."""
    padded = padded_vocab_size(cfg.vocab_size, mp.tensor_model_parallel_size)
    rng = rng if rng is not None else TensorParallelRNG()
    return [
        Block(WordEmbedding, (cfg, mp, padded), tie="embed"),
        Block(PositionEmbedding, (cfg, mp, rng)),
        *(Block(DecoderLayer, (cfg, mp, i, recompute, rng)) for i in range(cfg.num_layers)),
        Block(FinalNorm, (cfg, mp)),
        Block(WordEmbedding, (cfg, mp, padded), tie="embed", method="logits"),
    ]


def padded_vocab_size(vocab: int, tp: int, multiple: int = 128) -> int:
    """The embedding's row count: ``vocab`` rounded up to a multiple of ``multiple * tp``."""
    step = multiple * tp
    return ((vocab + step - 1) // step) * step


class GPTModel(nn.Module):
    """All blocks on one pipeline stage. ``forward(tokens)`` -> vocab-parallel logits
    [s, b, V/tp]; with ``labels`` it returns the mean masked cross entropy instead (computed
    without materialising the logits)."""

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig, recompute: str = "none"):
        super().__init__()
        self.cfg = cfg
        self.dropout_rng = TensorParallelRNG()
        blocks = gpt_blocks(cfg, mp, recompute, self.dropout_rng)
        word, position, *layers, final_norm, head = blocks
        assert head.tie == word.tie  # the output layer is the word embedding's logits
        self.word = word.build()
        self.position = position.build()
        self.layers = nn.ModuleList(b.build() for b in layers)
        self.final_norm = final_norm.build()

    def forward(
        self,
        tokens: torch.Tensor,
        labels: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        offset = kv_cache.length if kv_cache is not None else 0
        # Training with the fused loss: the tied weight's two gradients built as one.
        tied = TiedGradient() if labels is not None and torch.is_grad_enabled() else None
        h = self.position(self.word(tokens, tied), position_offset=offset)  # [b, s] -> [s, b, h]
        for layer in self.layers:
            h = layer(h, kv_cache)
        if kv_cache is not None:
            kv_cache.length += tokens.shape[1]
        h = self.final_norm(h)
        if labels is None:
            return self.word.logits(h)
        # The output layer and the loss as one (layers.WordEmbedding.loss): the same value as
        # lm_loss(self.word.logits(h), labels, loss_mask), without the full logits.
        return self.word.loss(h, labels, loss_mask, tied)


def blocks(model: nn.Module):
    """The top-level blocks (those with a ``canonical_name``) of a model or pipeline stage."""
    for m in model.modules():
        if isinstance(getattr(m, "canonical_name", None), str):
            yield m
