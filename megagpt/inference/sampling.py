"""Next-token selection with the original models' sampler semantics (reference §4.1).

``top_k == 1`` is greedy. Otherwise the logits are divided by ``temperature`` and one filter is
applied: top-k (``top_k > 1``) or nucleus (``0 < top_p < 1``), never both; then one token is drawn
from the softmax. The nucleus filter keeps the smallest prefix of the sorted distribution whose
mass reaches ``top_p`` (the token that crosses ``p`` is kept, and so is the top token).

Everything runs on the logits' device with static shapes, batched over rows: no host round trip,
no per-row loop. Seeded draws use counter-based noise (``exponential_noise``): a row's draw is a
pure function of its key, the step and the distribution, so it does not depend on the other rows
of the batch, on the device's random state, or on how many draws came before.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
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
            raise ValueError(
                f"top_k ({self.top_k}) must be smaller than the vocabulary ({vocab_size})"
            )
        # Written so that NaN fails them: every comparison with NaN is False, so `x <= 0` would
        # let it through (a NaN temperature or penalty turns every logit into NaN, and decoding
        # then yields no text). Infinity is refused too: it is no temperature or penalty either.
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if self.top_k > 1 and 0.0 < self.top_p < 1.0:
            raise ValueError(
                f"top_k={self.top_k} and top_p={self.top_p} cannot be combined (as in "
                "the original sampler): pass top_p=0 with top_k, or top_k=0"
            )
        if not (math.isfinite(self.temperature) and self.temperature > 0.0):
            raise ValueError(
                f"temperature must be a finite number > 0, got {self.temperature}; use top_k=1 "
                "for greedy decoding"
            )
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0.0):
            raise ValueError(
                f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}"
            )


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


# (config.json key, GenerationDefaults field, type) of the decoding settings a checkpoint holds
_SETTINGS = (
    ("top_k", "top_k", int),
    ("top_p", "top_p", float),
    ("temperature", "temperature", float),
    ("tokens_to_generate", "new_tokens", int),
)


@dataclass(frozen=True)
class GenerationDefaults:
    """A model's decoding defaults where a call gives none: the original's (nucleus p=0.9,
    T=1, 100 new tokens) unless its checkpoint says otherwise (ModelScope's config.json
    ``top_k`` / ``top_p`` / ``temperature`` / ``tokens_to_generate``, kept in a converted
    megagpt model directory's ``generation``)."""

    top_k: int = 0
    top_p: float = DEFAULT_TOP_P
    temperature: float = DEFAULT_TEMPERATURE
    new_tokens: int = DEFAULT_NEW_TOKENS

    @classmethod
    def from_config(cls, config: object, source: str, vocab_size: int) -> GenerationDefaults:
        """The settings ``config`` holds (ModelScope's names). They only guide decoding, so a
        value no sampler takes does not stop the model from loading: a warning names
        ``source`` and the key, and the original's defaults are used instead."""
        base = cls()
        if not isinstance(config, dict):
            _warn(f"{source}: decoding settings are not an object; using the defaults")
            return base
        values: dict = {}
        for key, field_name, kind in _SETTINGS:
            value = config.get(key)
            if value is None:
                continue
            try:
                if isinstance(value, bool) or kind(value) != float(value):
                    raise ValueError
                values[field_name] = kind(value)
            except (TypeError, ValueError):
                what = "an integer" if kind is int else "a number"
                _warn(f"{source}: {key}={value!r} is not {what}; ignored")
        out = dataclasses.replace(base, **values)
        try:
            SamplingParams(out.top_k, out.top_p, out.temperature).check(vocab_size)
            if out.new_tokens < 1:
                raise ValueError(f"tokens_to_generate must be >= 1, got {out.new_tokens}")
        except ValueError as e:
            _warn(f"{source}: {e}; decoding with the original's defaults instead")
            return base
        return out

    def as_config(self) -> dict:
        """ModelScope's config.json names of these settings."""
        return {
            "top_k": self.top_k,
            "top_p": self.top_p,
            "temperature": self.temperature,
            "tokens_to_generate": self.new_tokens,
        }

    def params(
        self,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float | None = None,
        repetition_penalty: float | None = None,
    ) -> SamplingParams:
        """SamplingParams of a call: what it gives, these defaults for the rest. A call that
        gives ``top_k`` or ``top_p`` chooses the filter itself (``make_params``); ``top_k=0``
        alone (no top-k) keeps the model's nucleus mass where it has one."""
        if top_k is None and top_p is None:
            top_k, top_p = self.top_k, self.top_p
        elif top_p is None and not top_k and self.top_p > 0:
            top_p = self.top_p
        if temperature is None:
            temperature = self.temperature
        return make_params(top_k, top_p, temperature, repetition_penalty)


def make_params(
    top_k: int | None = None,
    top_p: float | None = None,
    temperature: float | None = None,
    repetition_penalty: float | None = None,
) -> SamplingParams:
    """SamplingParams from per-call keyword arguments, where None means "the default".

    Asking for top-k (``top_k >= 1``) without a ``top_p`` switches the default nucleus filter off,
    so ``top_k=1`` alone is greedy and ``top_k=10`` alone is top-10 sampling.
    """
    k = int(top_k or 0)
    if top_p is None:
        top_p = 0.0 if k >= 1 else DEFAULT_TOP_P
    return SamplingParams(
        top_k=k,
        top_p=float(top_p),
        temperature=DEFAULT_TEMPERATURE if temperature is None else float(temperature),
        repetition_penalty=1.0 if repetition_penalty is None else float(repetition_penalty),
    )


def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, penalty: float
) -> torch.Tensor:
    """CTRL-style penalty: logits [b, V] of tokens in ``seen`` [b, n] (ids) are divided by
    ``penalty`` when positive and multiplied by it when negative. ``seen`` may contain -1 for
    "no token" (ignored)."""
    if penalty == 1.0:
        return logits
    valid = (seen >= 0).to(logits.dtype)
    counts = torch.zeros_like(logits).scatter_add_(1, seen.clamp(min=0), valid)  # [b, V]
    return penalise_seen(logits, counts > 0, penalty)


def penalise_seen(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """``apply_repetition_penalty`` on a presence mask ``seen`` [b, V] (bool): the decoding loop
    keeps one up to date instead of rescanning the sequence every step."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


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


_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (two xorshift-multiply rounds) on int64 tensors holding values in
    [0, 2^32). Both multipliers are below 2^31, so no product overflows int64: the same bits on
    every device."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _MASK32
    return x ^ (x >> 15)


def row_key(seed: int) -> int:
    """A 32-bit sampling key from any non-negative integer seed."""
    return (seed ^ (seed >> 32)) & _MASK32


def exponential_noise(keys: torch.Tensor, step: int | torch.Tensor, vocab: int) -> torch.Tensor:
    """Exp(1) noise [b, vocab] (float32), a pure function of each row's 32-bit key [b] (int64),
    the ``step`` (int or 0-d tensor) and the token index."""
    ids = torch.arange(vocab, device=keys.device)
    token_hash = _mix32((ids * 0x9E3779B1) & _MASK32)  # [V]
    row = _mix32(keys ^ _mix32(torch.as_tensor(step, device=keys.device) & _MASK32))  # [b]
    bits = _mix32(_mix32(row.unsqueeze(1) ^ token_hash.unsqueeze(0)))  # [b, V]
    u = ((bits >> 8).float() + 0.5) * 2.0**-24  # 24 random bits -> uniform in (0, 1)
    return -torch.log(u)


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    keys: torch.Tensor | None = None,
    step: int | torch.Tensor = 0,
) -> torch.Tensor:
    """Next token ids [b] from last-position logits [b, V] (float32), on their device.

    A draw is the exponential race argmax(p / E), E ~ Exp(1) i.i.d. per token, which picks token
    i with probability p_i. With ``keys`` (one 32-bit key per row, int64 [b]) the noise is
    ``exponential_noise(keys, step)``: seeded sampling is reproducible, and a row's draw depends
    only on its own key and step, not on the other rows of the batch. Without keys the noise
    comes from the device's default generator.
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
    if keys is None:
        noise = torch.empty_like(probs).exponential_().clamp_(min=torch.finfo(probs.dtype).tiny)
    else:
        noise = exponential_noise(keys, step, probs.shape[-1])
    return (probs / noise).argmax(dim=-1)
