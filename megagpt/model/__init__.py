"""The GPT: embedding, decoder layers and tied head on megatron-core parallel layers."""

from megagpt.model.gpt import GPTModel, padded_vocab_size
from megagpt.model.init import canonical_parameters, initialize_weights
from megagpt.model.layers import KVCache, lm_loss
from megagpt.model.mcore import DTYPES, megatron_config

__all__ = [
    "DTYPES",
    "GPTModel",
    "KVCache",
    "canonical_parameters",
    "initialize_weights",
    "lm_loss",
    "megatron_config",
    "padded_vocab_size",
]
