"""Next-token selection with the original models' sampler semantics (reference §4.1).

``top_k == 1`` is greedy. Otherwise the logits are divided by ``temperature`` and one filter is
applied: top-k (``top_k > 1``) or nucleus (``0 < top_p < 1``), never both; then one token is drawn
from the softmax. The nucleus filter keeps the smallest prefix of the sorted distribution whose
mass reaches ``top_p`` (the token that crosses ``p`` is kept, and so is the top token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_TOP_P = 0.9
DEFAULT_TEMPERATURE = 1.0
DEFAULT_NEW_TOKENS = 100


@dataclass(frozen=True)
class SamplingParams:
    """Decoding options of one generate call (the original's defaults: nucleus p=0.9, T=1)."""

    top_k: int = 0
    top_p: float = DEFAULT_TOP_P
    temperature: float = DEFAULT_TEMPERATURE
    repetition_penalty: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.top_k == 1

    def check(self, vocab_size: int) -> None:
        """ValueError naming the option when the combination is invalid."""
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off, 1 = greedy), got {self.top_k}")
        if self.top_k >= vocab_size:
            raise ValueError(f"top_k ({self.top_k}) must be smaller than the vocabulary "
                             f"({vocab_size})")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if self.top_k > 1 and 0.0 < self.top_p < 1.0:
            raise ValueError(f"top_k={self.top_k} and top_p={self.top_p} cannot be combined (as in "
                             "the original sampler): pass top_p=0 with top_k, or top_k=0")
        if self.temperature <= 0.0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}; use top_k=1 "
                             "for greedy decoding")
        if self.repetition_penalty <= 0.0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def make_params(top_k: int | None = None, top_p: float | None = None,
                temperature: float | None = None, repetition_penalty: float | None = None
                ) -> SamplingParams:
    """SamplingParams from per-call keyword arguments, where None means "the default".

    Asking for top-k (``top_k >= 1``) without a ``top_p`` switches the default nucleus filter off,
    so ``top_k=1`` alone is greedy and ``top_k=10`` alone is top-10 sampling.
    """
    k = int(top_k or 0)
    if top_p is None:
        top_p = 0.0 if k >= 1 else DEFAULT_TOP_P
    return SamplingParams(
        top_k=k, top_p=float(top_p),
        temperature=DEFAULT_TEMPERATURE if temperature is None else float(temperature),
        repetition_penalty=1.0 if repetition_penalty is None else float(repetition_penalty))


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float
                             ) -> torch.Tensor:
    """CTRL-style penalty: logits [b, V] of tokens in ``seen`` [b, n] (ids) are divided by
    ``penalty`` when positive and multiplied by it when negative. ``seen`` may contain -1 for
    "no token" (ignored)."""
    if penalty == 1.0:
        return logits
    valid = (seen >= 0).to(logits.dtype)
    counts = torch.zeros_like(logits).scatter_add_(1, seen.clamp(min=0), valid)  # [b, V]
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(counts > 0, penalised, logits)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Holtzman nucleus filter on [b, V]: entries outside the nucleus set to -inf."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative > p
    # Shift right: the token whose cumulative mass crosses p stays; the top token always stays.
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = False
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits of each row of [b, V]."""
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def sample(logits: torch.Tensor, params: SamplingParams,
           generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """Next token ids [b] from last-position logits [b, V] (float32).

    ``generators`` gives one torch.Generator per row: a row's draw then depends only on its own
    generator, not on the other rows of the batch (so seeded sampling is reproducible and does
    not change when prompts are batched differently).
    """
    logits = logits.float()
    if params.greedy:
        return logits.argmax(dim=-1)
    if params.temperature != 1.0:
        logits = logits / params.temperature
    if params.top_k > 1:
        logits = top_k_filter(logits, params.top_k)
    elif 0.0 < params.top_p < 1.0:
        logits = top_p_filter(logits, params.top_p)
    probs = logits.softmax(dim=-1)
    if generators is None:
        out = torch.multinomial(probs, 1).squeeze(1)
    else:
        out = torch.stack([torch.multinomial(probs[i].cpu(), 1, generator=g)[0]
                           for i, g in enumerate(generators)]).to(logits.device)
    return out.clamp(0, logits.shape[-1] - 1)
