"""``pipeline("text-generation", model=DIR)``: text in, ``{"text": prompt + continuation}`` out.

``DIR`` is a megagpt model directory (``<run.dir>/model`` of any training or fine-tuning run).
Under ``torchrun --nproc-per-node N`` the model is split N-way by tensor parallelism; every rank
runs the same calls and returns the same text.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from megagpt.data.tokenizer import complete_text  # also imported from here by callers
from megagpt.inference.beam import beam_search, check_beam_args
from megagpt.inference.generate import TextGenerator
from megagpt.inference.sampling import GenerationDefaults

if TYPE_CHECKING:
    from megagpt.parallel import ParallelContext

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def inference_context(device: str = "auto", tensor: int | None = None) -> ParallelContext:
    """This process's ``ParallelContext`` for inference: under torchrun the world as TP x DP
    (``tensor`` defaults to the world size: one tensor-parallel group; the remaining factor is
    data parallel; ValueError when it does not divide the world size), its process groups
    started (or joined when already there); one local process starts none.
    """
    from megagpt import parallel
    from megagpt.config import ParallelConfig
    from megagpt.parallel import ParallelContext, ParallelDims

    world = parallel.world_size_from_env()
    tp = tensor or world
    if tp < 1 or world % tp:
        raise ValueError(f"tensor-parallel size {tp} must divide the world size {world}")
    if world == 1 and not parallel.is_initialized():
        # One process: the model runs without process groups at TP = 1, so start none (no
        # port, no gloo store; a notebook or a test can generate alongside anything).
        return ParallelContext.at(ParallelDims(1, 1, 1), 0, parallel.resolve_device(device))
    return parallel.initialize(ParallelConfig(tensor=tp), parallel.resolve_device(device))


def read_model(path: str, tokenizer: str | None = None, flag: str = "tokenizer="):
    """(config, a function returning the full canonical tensors, tokenizer, decoding
    defaults) of what ``path`` holds: a megagpt model directory, or any checkpoint ``megagpt
    convert`` reads (a training run, its ``checkpoints/`` or a ``step_*`` folder, a ModelScope
    or Hugging Face GPT-2 directory), read as it is, without converting it. ``tokenizer`` (a
    file or folder) replaces the one the checkpoint names (``flag``: how the caller's user
    gives it, for the error when none is found). A model directory's weights are read when the
    function is called; another checkpoint's are read here. Every error names the path."""
    from megagpt.checkpoint import is_model_dir, load_tensors, read_config, tokenizer_path
    from megagpt.checkpoint.canonical import CheckpointError
    from megagpt.checkpoint.model_dir import read_generation
    from megagpt.checkpoint.convert import read
    from megagpt.data import build_tokenizer

    if is_model_dir(path):
        cfg = read_config(path)
        tok_path = tokenizer or tokenizer_path(path)
        weights = functools.partial(load_tensors, path)
        defaults = read_generation(path)
        if tok_path is None:
            raise CheckpointError(f"{path}/tokenizer: the model directory has no tokenizer")
    else:
        src = read(path)
        cfg, tok_path = src.cfg, tokenizer or src.tokenizer
        weights = functools.partial(dict, src.tensors)
        defaults = src.generation or GenerationDefaults()
        if tok_path is None:
            raise CheckpointError(
                f"{path}: a {src.kind} checkpoint that names no tokenizer that exists here; "
                f"give {flag} (a tokenizer.json or its folder, a vocab.txt or a .model file)"
            )
    return cfg, weights, build_tokenizer(tok_path), defaults


def load_generator(
    directory: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    tensor: int | None = None,
    ctx: ParallelContext | None = None,
    tokenizer: str | None = None,
    flag: str = "tokenizer=",
):
    """(TextGenerator, tokenizer) for a model directory or any checkpoint ``read_model``
    reads (``tokenizer`` replaces the one it names; ``flag`` is how the user gives it).

    ``ctx`` is the process's ``ParallelContext`` when the caller started the groups
    (``inference_context``); its device and tensor-parallel group are used and ``device`` /
    ``tensor`` ignored. Without it, ``inference_context(device, tensor)``: one local process
    runs without process groups; a torchrun world starts its groups, one tensor-parallel group
    by default (``tensor`` defaults to the world size).
    ``dtype`` "auto" is bf16 on CUDA and fp32 on CPU.
    """
    from megagpt import parallel

    warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
    warnings.filterwarnings("ignore", message=".*[Aa]pex.*")
    cfg, weights, tokenizer, defaults = read_model(directory, tokenizer, flag)
    if dtype != "auto" and dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}")
    tp = ctx.dims.tp if ctx is not None else tensor or parallel.world_size_from_env()
    if cfg.num_heads % tp:
        raise ValueError(
            f"{directory}: {cfg.num_heads} heads cannot be split over tensor-parallel size {tp}"
        )
    if ctx is None:  # checked above first: a bad model fails before any rendezvous
        ctx = inference_context(device, tp)
    gen = generator_for(cfg, weights(), tokenizer, ctx, dtype, source=directory, defaults=defaults)
    return gen, tokenizer


def generator_for(
    cfg,
    tensors: dict,
    tokenizer,
    ctx: ParallelContext,
    dtype: str = "auto",
    *,
    source: str = "",
    defaults: GenerationDefaults | None = None,
) -> TextGenerator:
    """A ``TextGenerator`` over a model of ``cfg`` holding ``tensors`` (full canonical tensors;
    this TP rank's shard is cut from them), on ``ctx``'s device and tensor-parallel group.
    ``dtype`` "auto" is bf16 on CUDA and fp32 on CPU; stop ids are the tokenizer's end of
    document and separator, padding its pad (else end of document). ``source`` names the
    tensors' origin in errors."""
    from megagpt.checkpoint import load_into
    from megagpt.config import ParallelConfig
    from megagpt.model import GPTModel, megatron_config

    tp = ctx.dims.tp
    if dtype == "auto":
        dtype = "bf16" if ctx.device.type == "cuda" else "fp32"
    model = GPTModel(cfg, megatron_config(cfg, ParallelConfig(tensor=tp), _DTYPES[dtype]))
    load_into(model, tensors, cfg, ctx.tp_rank, tp, source=source)
    model.to(ctx.device).eval()
    stops = [t for t in (tokenizer.eod, tokenizer.sep) if t is not None]
    pad = next((t for t in (tokenizer.pad, tokenizer.eod) if t is not None), 0)
    return TextGenerator(
        model,
        vocab_size=cfg.vocab_size,
        max_positions=cfg.max_position_embeddings,
        stop_ids=stops,
        pad_id=pad,
        tp_group=ctx.tp_group,
        tp_size=tp,
        defaults=defaults,
    )


def check_beam_search(
    num_beams: int, num_return_sequences: int, length_penalty: float, **sampling
) -> None:
    """ValueError naming the option for a beam search that cannot run: bad counts, or a
    sampling option given with ``num_beams > 1`` (beam search is deterministic; ``top_k=1``
    is accepted, as it asks for no sampling either)."""
    check_beam_args(num_beams, num_return_sequences if num_beams > 1 else 1, length_penalty)
    if num_beams == 1:
        if length_penalty != 1.0:
            raise ValueError("length_penalty applies to beam search: give num_beams > 1")
        return
    given = [
        name
        for name, value in sampling.items()
        if value is not None and not (name == "top_k" and value == 1)
    ]
    if given:
        raise ValueError(
            f"num_beams={num_beams} searches the most likely continuations and samples "
            f"nothing: leave {', '.join(given)} unset"
        )


class TextGenerationPipeline:
    """Callable text generation over a loaded model.

    ``pipe(text, **kw)`` -> ``{"text": ...}``; ``pipe([t1, t2])`` -> a list of those; with
    ``num_return_sequences=n > 1`` each input gives a list of n dicts. Keyword options:
    ``max_length`` (total tokens, prompt included; default prompt + 100, capped at the model's
    positions) or ``max_new_tokens``, ``top_k`` (0 = off, 1 = greedy), ``top_p`` (default 0.9),
    ``temperature`` (1.0), ``repetition_penalty`` (1.0 = off), ``seed``, where the defaults are
    the model's own when its checkpoint records them (``TextGenerator.defaults``),
    ``num_return_sequences``, ``batch_size`` (prompts per forward, default 8), ``use_cache``.
    ``num_beams=n > 1`` searches the n most likely continuations instead of sampling
    (``megagpt.inference.beam``; ``length_penalty``, default 1.0, divides a hypothesis's
    log-probability by its length to that power): each dict then also holds its ``score``.

    A byte-level tokenizer can stop between the bytes of one character (the decoder shows the
    unfinished bytes as U+FFFD): the text never ends on such bytes (``complete_text``), and
    ``stream`` holds them back until the character completes.
    """

    def __init__(self, generator: TextGenerator, tokenizer):
        self.generator = generator
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        """The ids generation starts from for prompt ``text`` (``Tokenizer.encode_prompt``:
        ``[CLS] text`` for the BERT family; an empty prompt starts a new document); ValueError
        when an empty prompt has no token to start from."""
        ids = self.tokenizer.encode_prompt(text)
        if not ids:
            raise ValueError(
                "empty prompt and the tokenizer has no end-of-document token to start from"
            )
        return ids

    def __call__(
        self,
        inputs: str | list[str],
        *,
        max_length: int | None = None,
        max_new_tokens: int | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        num_return_sequences: int = 1,
        batch_size: int = 8,
        use_cache: bool = True,
        num_beams: int = 1,
        length_penalty: float = 1.0,
    ):
        single = isinstance(inputs, str)
        texts = [inputs] if single else list(inputs)
        params = self.generator.defaults.params(top_k, top_p, temperature, repetition_penalty)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        sampling = {"top_k": top_k, "top_p": top_p, "temperature": temperature}
        sampling["repetition_penalty"] = repetition_penalty
        check_beam_search(num_beams, num_return_sequences, length_penalty, **sampling)
        if num_beams > 1:
            lengths = {"max_length": max_length, "max_new_tokens": max_new_tokens}
            beams = [
                self._beams(t, num_beams, num_return_sequences, length_penalty, **lengths)
                for t in texts
            ]
            return beams[0] if single else beams
        out: list = []
        for start in range(0, len(texts), batch_size):
            chunk = [self.encode(t) for t in texts[start : start + batch_size]]
            ids = self.generator.generate(
                chunk,
                params,
                max_length=max_length,
                max_new_tokens=max_new_tokens,
                seed=seed,
                num_return_sequences=num_return_sequences,
                use_cache=use_cache,
            )
            for prompt, copies in zip(chunk, ids):
                dicts = [{"text": self._text(c, prompt)} for c in copies]
                out.append(dicts[0] if num_return_sequences == 1 else dicts)
        return out[0] if single else out

    def _beams(
        self,
        text: str,
        num_beams: int,
        n: int,
        length_penalty: float,
        *,
        max_length: int | None,
        max_new_tokens: int | None,
    ) -> dict | list[dict]:
        """The ``n`` best of a beam search over ``text`` as ``{"text", "score"}`` dicts."""
        ids = self.encode(text)
        (limit,) = self.generator.limits([len(ids)], max_length, max_new_tokens)
        hyps = beam_search(
            self.generator, ids, num_beams=num_beams, limit=limit, length_penalty=length_penalty
        )
        dicts = [{"text": self._text(h.ids, ids), "score": h.score} for h in hyps[:n]]
        return dicts[0] if n == 1 else dicts

    def _text(self, ids: list[int], prompt: list[int]) -> str:
        """The text of ``ids`` (prompt + continuation), cut before unfinished character bytes
        at its end (``complete_text``); the prompt's own text is never cut."""
        return complete_text(self.tokenizer.decode(ids), keep=len(self.tokenizer.decode(prompt)))

    def stream(
        self,
        text: str,
        *,
        max_length: int | None = None,
        max_new_tokens: int | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        use_cache: bool = True,
    ) -> Iterator[dict]:
        """Yield a growing ``{"text": prompt + continuation so far}`` whenever a new token adds
        text. Each part extends the one before (print ``text[len(previous):]``); bytes of an
        unfinished character are held back until it completes, so no part shows half a
        character. The last part equals ``pipe(text, ...)``."""
        params = self.generator.defaults.params(top_k, top_p, temperature, repetition_penalty)
        gen = self.generator
        ids = self.encode(text)
        limits = gen.limits([len(ids)], max_length, max_new_tokens)
        keys = None if params.greedy else gen.keys_for([ids], 1, seed)
        keep = len(self.tokenizer.decode(ids))
        tok = self.tokenizer
        # What later tokens cannot change (Tokenizer.decode_stable): each part extends the last.
        shown, row, parts = tok.decode_stable(ids, keep), ids, 0
        for state in gen.steps([ids], params, limits, keys, use_cache):
            end = int(state.ends[0])
            if end > len(row):
                row = state.row(0)
                now = tok.decode_stable(row, keep)
                if len(now) > len(shown):
                    shown, parts = now, parts + 1
                    yield {"text": now}
        final = self._text(row, ids)
        if final != shown or parts == 0:  # the held-back tail; or nothing shown at all
            yield {"text": final}


def pipeline(
    task: str,
    model: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    tensor: int | None = None,
    ctx: ParallelContext | None = None,
    tokenizer: str | None = None,
    flag: str = "tokenizer=",
) -> TextGenerationPipeline:
    """``pipeline("text-generation", model=DIR)``; DIR is a megagpt model directory or any
    checkpoint ``megagpt convert`` reads (a training run or step folder, a ModelScope or
    Hugging Face GPT-2 directory: ``read_model``), ``tokenizer`` one to use instead of the one
    it names. ``ctx``: the process's ``ParallelContext`` when the caller started the groups
    (``load_generator``)."""
    if task != "text-generation":
        raise ValueError(f"unknown task {task!r}; megagpt offers 'text-generation'")
    gen, tok = load_generator(
        model, device=device, dtype=dtype, tensor=tensor, ctx=ctx, tokenizer=tokenizer, flag=flag
    )
    return TextGenerationPipeline(gen, tok)
