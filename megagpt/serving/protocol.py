"""Request validation of the HTTP endpoints: JSON bodies -> checked options, or an
OpenAI-style error naming the field.

Every error is ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status, as the
OpenAI API answers; the message says what was wrong and what is accepted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megagpt.inference.sampling import (
    DEFAULT_NEW_TOKENS,
    GenerationDefaults,
    SamplingParams,
)

MAX_N = 128  # copies per prompt (each one occupies a decoding row)
MAX_PROMPTS = 256


class RequestError(Exception):
    """A request the server refuses: HTTP ``status``, the offending field ``param``."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        status: int = 400,
        type: str = "invalid_request_error",
        code: str | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.type = type
        self.code = code

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def _int(body: dict, name: str, default, minimum: int | None = None):
    value = body.get(name)
    if value is None:
        return default
    # JSON has one number type; 5.0 is accepted as 5, True is not a number.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"'{name}' must be an integer, got {_type_name(value)} {value!r}", name)
    if minimum is not None and value < minimum:
        raise RequestError(f"'{name}' must be >= {minimum}, got {value}", name)
    return value


def _float(body: dict, name: str, default):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"'{name}' must be a number, got {_type_name(value)} {value!r}", name)
    # Python's JSON reader accepts NaN and Infinity (and integers of any size); a NaN passes
    # every `x < 0`-style range check below (all its comparisons are False) and decodes to
    # empty text.
    try:
        number, shown = float(value), str(value)
    except OverflowError:
        number, shown = math.inf, f"an integer of {len(str(value))} digits"
    if not math.isfinite(number):
        raise RequestError(f"'{name}' must be a finite number, got {shown}", name)
    return number


def _bool(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(
            f"'{name}' must be true or false, got {_type_name(value)} {value!r}", name
        )
    return value


def _is_ids(value) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


def parse_prompts(value, vocab_size: int, name: str = "prompt") -> list[str | list[int]]:
    """A prompt field -> a list of prompts (text, or token ids): a string, a list of strings,
    a list of token ids, or a list of lists of token ids (the OpenAI forms)."""
    if value is None:
        raise RequestError(f"'{name}' is required", name)
    if isinstance(value, str) or _is_ids(value):
        prompts = [value]
    elif isinstance(value, list) and value and all(isinstance(p, str) or _is_ids(p) for p in value):
        prompts = list(value)
    else:
        raise RequestError(
            f"'{name}' must be a string, a non-empty list of strings, a list of "
            f"token ids or a list of such lists; got {_type_name(value)}",
            name,
        )
    if len(prompts) > MAX_PROMPTS:
        raise RequestError(
            f"'{name}' has {len(prompts)} prompts; at most {MAX_PROMPTS} per request", name
        )
    for p in prompts:
        if isinstance(p, list) and any(not 0 <= t < vocab_size for t in p):
            bad = next(t for t in p if not 0 <= t < vocab_size)
            raise RequestError(
                f"'{name}' holds token id {bad}, outside the vocabulary [0, {vocab_size})", name
            )
    return prompts


def check_params(params: SamplingParams, vocab_size: int) -> SamplingParams:
    """``SamplingParams.check`` as a RequestError naming the option its message names."""
    try:
        params.check(vocab_size)
    except ValueError as e:
        message = str(e)
        param = next(
            (
                n
                for n in ("top_k", "top_p", "temperature", "repetition_penalty")
                if message.startswith(n)
            ),
            None,
        )
        raise RequestError(message, param) from None
    return params


@dataclass
class CompletionRequest:
    """A checked ``POST /v1/completions`` body."""

    prompts: list[str | list[int]]
    params: SamplingParams
    max_tokens: int
    n: int
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    include_usage: bool
    echo: bool


_COMPLETION_FIELDS = {
    "model",
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "stop",
    "n",
    "seed",
    "stream",
    "stream_options",
    "echo",
    "repetition_penalty",
    "logprobs",
    "presence_penalty",
    "frequency_penalty",
    "best_of",
    "user",
    "suffix",
    "logit_bias",
}


def _check_object(body, accepted: frozenset | set) -> None:
    """A request body is a JSON object of known fields; RequestError names the first other."""
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {_type_name(body)}")
    unknown = sorted(set(body) - accepted)
    if unknown:
        raise RequestError(
            f"unknown field '{unknown[0]}'; accepted: {', '.join(sorted(accepted))}", unknown[0]
        )


def parse_completion(body, model_name: str, vocab_size: int) -> CompletionRequest:
    """Check a completions body; RequestError names the first bad field.

    OpenAI's defaults apply (max_tokens 16, temperature 1, top_p 1); ``temperature: 0`` or
    ``top_k: 1`` is greedy decoding.
    """
    _check_object(body, _COMPLETION_FIELDS)
    model = body.get("model")
    if model is not None and model != model_name:
        raise RequestError(
            f"the model '{model}' does not exist; this server serves "
            f"'{model_name}' (GET /v1/models)",
            "model",
            status=404,
            code="model_not_found",
        )
    prompts = parse_prompts(body.get("prompt"), vocab_size)
    max_tokens = _int(body, "max_tokens", 16, minimum=1)
    n = _int(body, "n", 1, minimum=1)
    if n > MAX_N:
        raise RequestError(f"'n' must be <= {MAX_N}, got {n}", "n")
    temperature = _float(body, "temperature", 1.0)
    if temperature < 0:
        raise RequestError(
            f"'temperature' must be >= 0 (0 = greedy), got {temperature}", "temperature"
        )
    top_p = _float(body, "top_p", 1.0)
    if not 0.0 < top_p <= 1.0:
        raise RequestError(f"'top_p' must be in (0, 1], got {top_p}", "top_p")
    top_k = _int(body, "top_k", 0, minimum=-1)
    penalty = _float(body, "repetition_penalty", 1.0)
    if temperature == 0.0 or top_k == 1:
        params = SamplingParams(top_k=1, top_p=0.0, repetition_penalty=penalty)
    else:
        params = SamplingParams(
            top_k=max(top_k, 0), top_p=top_p, temperature=temperature, repetition_penalty=penalty
        )
    check_params(params, vocab_size)
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 16:
        stops = tuple(stop)
    else:
        raise RequestError(
            f"'stop' must be a string or a list of at most 16 strings, got {_type_name(stop)}",
            "stop",
        )
    if any(s == "" for s in stops):
        raise RequestError("'stop' strings must not be empty", "stop")
    seed = _int(body, "seed", None)
    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and not (
        isinstance(options, dict) and set(options) <= {"include_usage"}
    ):
        raise RequestError(
            "'stream_options' must be an object with 'include_usage'", "stream_options"
        )
    include_usage = _bool(options or {}, "include_usage", False)
    echo = _bool(body, "echo", False)
    # Accepted at their "off" values only (clients send them by default); anything else is
    # a feature this server does not have, said plainly rather than ignored.
    for name in ("presence_penalty", "frequency_penalty"):
        _float(body, name, 0.0)  # NaN/Infinity: the same 'finite number' error as above
    for name, off in (
        ("logprobs", None),
        ("presence_penalty", 0),
        ("frequency_penalty", 0),
        ("best_of", 1),
        ("suffix", None),
        ("logit_bias", None),
    ):
        value = body.get(name)
        if value is not None and value != off and not (name == "logit_bias" and value == {}):
            raise RequestError(f"'{name}' is not supported by megagpt serve (got {value!r})", name)
    return CompletionRequest(
        prompts, params, max_tokens, n, stops, seed, stream, include_usage, echo
    )


@dataclass
class GenerateRequest:
    """A checked ``POST /generate`` body (the original pipeline's call)."""

    texts: list[str]
    single: bool
    params: SamplingParams
    max_length: int | None
    max_new_tokens: int | None
    seed: int | None


_GENERATE_FIELDS = {
    "text",
    "max_length",
    "max_new_tokens",
    "top_k",
    "top_p",
    "temperature",
    "repetition_penalty",
    "seed",
}


def parse_generate(
    body, vocab_size: int, defaults: GenerationDefaults | None = None
) -> GenerateRequest:
    """Check a ``/generate`` body: ``{"text": str or [str], ...}`` with the pipeline's options
    and defaults (the model's ``defaults``; the original's: nucleus p=0.9, T=1)."""
    _check_object(body, _GENERATE_FIELDS)
    text = body.get("text")
    if text is None:
        raise RequestError("'text' is required", "text")
    single = isinstance(text, str)
    if not single and not (
        isinstance(text, list) and text and all(isinstance(t, str) for t in text)
    ):
        raise RequestError(
            f"'text' must be a string or a non-empty list of strings, got {_type_name(text)}",
            "text",
        )
    max_length = _int(body, "max_length", None, minimum=1)
    max_new_tokens = _int(body, "max_new_tokens", None, minimum=1)
    if max_length is not None and max_new_tokens is not None:
        raise RequestError(
            "give 'max_length' (total, prompt included) or 'max_new_tokens', not both", "max_length"
        )
    top_k = _int(body, "top_k", None, minimum=0)
    params = (defaults or GenerationDefaults()).params(
        top_k,
        _float(body, "top_p", None),
        _float(body, "temperature", None),
        _float(body, "repetition_penalty", None),
    )
    check_params(params, vocab_size)
    texts = [text] if single else list(text)
    if len(texts) > MAX_PROMPTS:
        raise RequestError(f"'text' has {len(texts)} prompts; at most {MAX_PROMPTS}", "text")
    return GenerateRequest(
        texts, single, params, max_length, max_new_tokens, _int(body, "seed", None)
    )


def limit_for(
    prompt_tokens: int,
    max_positions: int,
    *,
    max_new_tokens: int | None = None,
    max_length: int | None = None,
    name: str = "prompt",
    default_new: int = DEFAULT_NEW_TOKENS,
) -> int:
    """Total length a row may reach (prompt included), capped at the model's positions;
    ``default_new`` tokens when the request gives no length."""
    if prompt_tokens >= max_positions:
        raise RequestError(
            f"the prompt has {prompt_tokens} tokens but the model has only "
            f"{max_positions} positions (no room to generate); shorten "
            f"'{name}'",
            name,
        )
    if max_length is not None:
        if max_length <= prompt_tokens:
            raise RequestError(
                f"'max_length'={max_length} leaves no room to generate: the "
                f"prompt has {prompt_tokens} tokens (max_length counts the "
                "prompt)",
                "max_length",
            )
        return min(max_length, max_positions)
    new = default_new if max_new_tokens is None else max_new_tokens
    return min(prompt_tokens + new, max_positions)
