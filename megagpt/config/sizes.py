"""The model-size registry: one explicit entry per size.

The production rows cite the size table of the ModelScope GPT-3 model cards
(`shared/reference/modelscope-gpt3.md` §1.1): layers, heads, d_model, peak LR and batch in tokens.
Tiny sizes for tests and the CPU quickstart live here too.
"""

from __future__ import annotations

from dataclasses import dataclass

from megagpt.config.schema import ModelConfig


@dataclass(frozen=True)
class ModelSize:
    name: str
    num_layers: int
    num_heads: int
    hidden_size: int
    lr: float
    batch_tokens: int
    activation: str = "gelu_tanh"
    seq_length: int = 2048
    max_position_embeddings: int = 2048
    vocab_size: int = 25600
    source: str = ""

    def model_config(self) -> ModelConfig:
        """A ModelConfig holding this size's values."""
        return ModelConfig(
            name=self.name,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            hidden_size=self.hidden_size,
            ffn_hidden_size=4 * self.hidden_size,
            max_position_embeddings=self.max_position_embeddings,
            seq_length=self.seq_length,
            vocab_size=self.vocab_size,
            activation=self.activation,
        )

    @property
    def global_batch_sequences(self) -> int:
        """The batch in sequences of seq_length tokens (0.5M tokens / 2048 -> 256)."""
        return max(1, round(self.batch_tokens / self.seq_length))


_REGISTRY: dict[str, ModelSize] = {}
_TABLE = "ModelScope GPT-3 card, size table row"
# The cards give batches as 0.5M / 2M / 6M tokens. We read M as 2**20 so that batches are whole
# sequences of 2048: 256, 1024 and 3072 sequences (GPT-3's own "0.5M" batch is 256 x 2048 too).
_M = 2**20
_HALF_M = _M // 2


def register(size: ModelSize) -> ModelSize:
    if size.name in _REGISTRY:
        raise ValueError(f"model size {size.name!r} registered twice")
    _REGISTRY[size.name] = size
    return size


# base/large use the exact erf GELU of ModelScope's backbone.py; 1.3B+ the tanh form of the fused
# Megatron bias-GELU (reference §1.2).
register(ModelSize("gpt3-base", 12, 12, 768, 6.0e-4, _HALF_M, "gelu", source=f"{_TABLE} 'base'"))
register(ModelSize("gpt3-large", 24, 16, 1024, 3.0e-4, _HALF_M, "gelu", source=f"{_TABLE} 'large'"))
register(ModelSize("gpt3-1.3b", 24, 32, 2048, 2.0e-4, 2 * _M, source=f"{_TABLE} '1.3B'"))
register(ModelSize("gpt3-2.7b", 32, 32, 2560, 1.6e-4, 2 * _M, source=f"{_TABLE} '2.7B'"))
register(ModelSize("gpt3-13b", 40, 40, 5120, 1.0e-4, 6 * _M, source=f"{_TABLE} '13B'"))
register(ModelSize("gpt3-30b", 48, 56, 7168, 1.0e-4, 6 * _M, source=f"{_TABLE} '30B'"))
register(ModelSize("gpt3-175b", 96, 96, 12288, 1.2e-4, 6 * _M, source=f"{_TABLE} '175B'"))
# Tiny sizes: not from the table. 'tiny' is for unit and distributed tests (4 layers so PP=2 and
# PP=4 split evenly, 4 heads so TP=2 and TP=4 do); 'mini' is the CPU quickstart.
register(
    ModelSize(
        "gpt3-tiny",
        4,
        4,
        64,
        1.0e-3,
        8 * 32,
        seq_length=32,
        max_position_embeddings=64,
        vocab_size=1024,
        source="test size",
    )
)
register(
    ModelSize(
        "gpt3-mini",
        4,
        4,
        128,
        1.0e-3,
        16 * 128,
        seq_length=128,
        max_position_embeddings=256,
        vocab_size=4096,
        source="CPU quickstart size",
    )
)


def names() -> list[str]:
    return list(_REGISTRY)


def get_size(name: str) -> ModelSize:
    """The registered size ``name`` (e.g. "gpt3-1.3b"); raises KeyError listing the known names."""
    key = name.lower()
    if key not in _REGISTRY and f"gpt3-{key}" in _REGISTRY:
        key = f"gpt3-{key}"
    if key not in _REGISTRY:
        raise KeyError(f"unknown model size {name!r}; known sizes: {', '.join(_REGISTRY)}")
    return _REGISTRY[key]


def from_name(name: str) -> ModelConfig:
    """ModelConfig of the registered size ``name``: ``from_name("gpt3-1.3b")``."""
    return get_size(name).model_config()


def parameter_count(m: ModelConfig, *, tied: bool = True) -> int:
    """Exact parameter count of the GPT defined by ``m`` (true vocab, tied embeddings)."""
    h, f, L = m.hidden_size, m.ffn, m.num_layers
    per_layer = (
        2 * 2 * h  # two LayerNorms (weight + bias)
        + 3 * h * h
        + 3 * h  # fused QKV
        + h * h
        + h  # attention output projection
        + h * f
        + f  # MLP up
        + f * h
        + h  # MLP down
    )
    embed = m.vocab_size * h + m.max_position_embeddings * h
    head = 0 if tied else m.vocab_size * h
    return embed + L * per_layer + 2 * h + head
