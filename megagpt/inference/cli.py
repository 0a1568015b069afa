"""`megagpt generate`: prompts from --prompt, a file or stdin (one per line) -> continuations.

Under ``torchrun --nproc-per-node N`` the model is split N-way (tensor parallel); rank 0 prints.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Iterable

from megagpt.errors import MegagptError


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """``--model`` and ``--tokenizer`` of the commands that load a model to decode with
    (``generate``, ``serve``): anything ``pipeline.read_model`` reads."""
    p.add_argument(
        "--model",
        required=True,
        help="megagpt model directory (<run.dir>/model), or any checkpoint `megagpt convert` "
        "reads: a training run or step folder, a ModelScope or Hugging Face GPT-2 directory",
    )
    p.add_argument(
        "--tokenizer", help="tokenizer to use instead of the one the checkpoint names (a path)"
    )


def add_generate_parser(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="continue text with a model directory (KV-cache "
        "decoding; tensor parallel under torchrun)",
    )
    add_model_arguments(p)
    p.add_argument(
        "--prompt",
        action="append",
        default=[],
        help="a prompt (repeatable); without --prompt/--input, stdin is read",
    )
    p.add_argument("--input", help="file with one prompt per line ('-' = stdin)")
    p.add_argument(
        "--max-length",
        type=int,
        help="total tokens, prompt included "
        "(default prompt + the model's new tokens, else 100; capped at the model's positions)",
    )
    p.add_argument("--max-new-tokens", type=int, help="tokens to add (instead of --max-length)")
    p.add_argument("--top-k", type=int, help="0 = off, 1 = greedy (default: the model's, else 0)")
    p.add_argument(
        "--top-p", type=float, help="nucleus mass (default: the model's, else 0.9; 0 with --top-k)"
    )
    p.add_argument("--temperature", type=float, help="default: the model's, else 1.0")
    p.add_argument("--repetition-penalty", type=float, help="default 1.0 (off)")
    p.add_argument("--seed", type=int, help="makes sampling reproducible")
    p.add_argument("--num-return-sequences", type=int, default=1)
    p.add_argument(
        "--num-beams",
        type=int,
        default=1,
        help="beam search: the N most likely continuations instead of sampling (no --top-k "
        "/ --top-p / --temperature / --repetition-penalty; --num-return-sequences up to N)",
    )
    p.add_argument(
        "--length-penalty",
        type=float,
        default=1.0,
        help="beam search: a hypothesis's log-probability is divided by its length to this "
        "power (default 1.0; > 1 favours longer, < 1 shorter continuations)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    p.add_argument(
        "--speculate",
        type=int,
        default=None,
        metavar="N",
        help="greedy decoding checks up to N guessed tokens per pass (n-gram drafts "
        "from the text; same tokens; default 7, 0 = one token per pass)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="decode with a static step under torch.compile: CUDA graphs on a GPU (an H200 "
        "decoded 1.5x faster at batch 1, 2.5x at batch 8), one compile of ~10 s per batch "
        "size, no n-gram speculation; tensor-parallel size 1. On a CPU the default is faster",
    )
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument(
        "--stream",
        action="store_true",
        help="print text as it arrives (one prompt at a time; whole characters only)",
    )
    p.add_argument(
        "--jsonl", action="store_true", help='print one {"prompt", "text"} JSON object per output'
    )
    p.set_defaults(func=cmd_generate)


class GenerateError(MegagptError, ValueError):
    """A bad `megagpt generate` flag or prompt, named (flag, FILE:LINE or which --prompt)."""


# The Python API's option names, as `megagpt generate` spells them.
_FLAGS = {
    "top_k": "--top-k",
    "top_p": "--top-p",
    "temperature": "--temperature",
    "repetition_penalty": "--repetition-penalty",
    "max_length": "--max-length",
    "max_new_tokens": "--max-new-tokens",
    "num_return_sequences": "--num-return-sequences",
    "num_beams": "--num-beams",
    "length_penalty": "--length-penalty",
}
_OPTION = re.compile(r"\b(" + "|".join(_FLAGS) + r")\b(?:=([^\s,;)]+))?")


def _as_flags(message: str) -> str:
    """A message of the Python API (``top_p must be ...``, ``top_k=1``) in the words of the
    command line (``--top-p must be ...``, ``--top-k 1``). Only for messages that hold no path."""
    return _OPTION.sub(lambda m: _FLAGS[m[1]] + (f" {m[2]}" if m[2] else ""), message)


def check_args(args: argparse.Namespace) -> None:
    """GenerateError naming the flag, before any model loads or process group starts (the
    model directory's config.json is read for its vocabulary size, and checked on the way)."""
    from megagpt.checkpoint.canonical import CheckpointError
    from megagpt.checkpoint.convert import read_generation, read_model_config
    from megagpt.inference.pipeline import check_beam_search

    for flag, value, least in (
        ("--batch-size", args.batch_size, 1),
        ("--max-new-tokens", args.max_new_tokens, 1),
        ("--max-length", args.max_length, 1),
        ("--num-return-sequences", args.num_return_sequences, 1),
        ("--speculate", args.speculate, 0),
    ):
        if value is not None and value < least:
            raise GenerateError(f"{flag} must be >= {least}, got {value}")
    if args.max_length is not None and args.max_new_tokens is not None:
        raise GenerateError(
            "give --max-length (total, prompt included) or --max-new-tokens, not both"
        )
    sampling = {"top_k": args.top_k, "top_p": args.top_p, "temperature": args.temperature}
    sampling["repetition_penalty"] = args.repetition_penalty
    try:
        check_beam_search(
            args.num_beams, args.num_return_sequences, args.length_penalty, **sampling
        )
    except ValueError as e:
        raise GenerateError(_as_flags(str(e))) from None
    if args.num_beams > 1 and args.stream:
        raise GenerateError("--stream with --num-beams: beam search knows its text at the end")
    if not os.path.exists(args.model):
        raise GenerateError(f"--model {args.model}: no such model directory or checkpoint")
    if args.tokenizer is not None and not os.path.exists(args.tokenizer):
        raise GenerateError(f"--tokenizer {args.tokenizer}: no such file or directory")
    try:  # the errors name the file
        vocab_size = read_model_config(args.model).vocab_size
        defaults = read_generation(args.model)  # the model's own decoding defaults
    except CheckpointError as e:
        raise GenerateError(f"--model {e}") from None
    params = defaults.params(args.top_k, args.top_p, args.temperature, args.repetition_penalty)
    try:
        params.check(vocab_size)
    except ValueError as e:
        raise GenerateError(_as_flags(str(e))) from None
    if args.num_return_sequences > 1 and params.greedy and args.num_beams == 1:
        raise GenerateError(
            f"--num-return-sequences {args.num_return_sequences} with greedy decoding "
            "(--top-k 1) would print identical copies; sample instead"
        )


def _lines(lines: Iterable[bytes], where: str) -> list[tuple[str, str]]:
    """(``where:LINE``, text) of each non-blank line; GenerateError at the first line that is
    not UTF-8, naming it."""
    out = []
    for number, raw in enumerate(lines, 1):
        try:
            text = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as e:
            raise GenerateError(
                f"{where}:{number}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte "
                f"{e.start + 1} of the line); prompts are read as UTF-8, one per line"
            ) from None
        if text.strip():
            out.append((f"{where}:{number}", text))
    return out


def _stdin_lines() -> list[tuple[str, str]]:
    stream = getattr(sys.stdin, "buffer", None)  # bytes: a bad byte is named by its line
    if stream is None:  # a text stream standing in for stdin (tests, notebooks)
        return [(f"<stdin>:{n}", t.rstrip("\r\n")) for n, t in enumerate(sys.stdin, 1) if t.strip()]
    return _lines(stream, "<stdin>")


def _prompts(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(place, prompt) pairs: the place is ``--prompt #N``, ``--input FILE:LINE`` or
    ``<stdin>:LINE``, for errors about that prompt."""
    prompts = [(f"--prompt #{n}", p) for n, p in enumerate(args.prompt, 1)]
    if args.input == "-" or (not args.input and not prompts):
        prompts += _stdin_lines()
    elif args.input:
        try:
            with open(args.input, "rb") as f:
                prompts += _lines(f, f"--input {args.input}")
        except FileNotFoundError:
            raise GenerateError(f"--input {args.input}: does not exist") from None
        except IsADirectoryError:
            raise GenerateError(
                f"--input {args.input}: is a directory; give a file with one prompt per line"
            ) from None
        except OSError as e:
            raise GenerateError(f"--input {args.input}: cannot be read ({e.strerror})") from None
    if not prompts:
        held = f" (--input {args.input} has only blank lines)" if args.input else ""
        raise GenerateError(f"no prompt: give --prompt TEXT, --input FILE or lines on stdin{held}")
    return prompts


def _check_room(pipe, prompts: list[tuple[str, str]], args: argparse.Namespace) -> None:
    """GenerateError naming the prompt (FILE:LINE, --prompt #N) that leaves no room to
    generate; needs the tokenizer, so it runs once the pipeline is built, before decoding."""
    for where, prompt in prompts:
        try:
            ids = pipe.encode(prompt)
            pipe.generator.limits([len(ids)], args.max_length, args.max_new_tokens)
        except ValueError as e:
            raise GenerateError(f"{where}: {_as_flags(str(e))}") from None


def cmd_generate(args: argparse.Namespace) -> int:
    """``megagpt generate``; user errors raise GenerateError (any MegagptError), which
    ``megagpt.cli.main`` prints as one line tagged with the rank."""
    # Everything that can be checked without the model first: before it loads, and before a
    # torchrun world starts its process groups.
    check_args(args)
    placed = _prompts(args)
    prompts = [p for _, p in placed]
    from megagpt.inference.pipeline import inference_context, pipeline

    try:
        ctx = inference_context(args.device)
        pipe = pipeline(
            "text-generation",
            model=args.model,
            dtype=args.dtype,
            ctx=ctx,
            tokenizer=args.tokenizer,
            flag="--tokenizer",
        )
    except MegagptError:
        raise
    except ValueError as e:  # the loader's own checks (heads vs the torchrun world): named
        raise GenerateError(str(e)) from None
    if args.speculate is not None:
        pipe.generator.speculate = args.speculate
    if args.compile:
        try:
            pipe.generator.use_compiled_step()
        except ValueError as e:
            raise GenerateError(f"--compile: {e}") from None
    _check_room(pipe, placed, args)
    # Every option and prompt is checked by now: a ValueError from decoding is a bug, and
    # shows as one (a traceback), not as a user error without its place.
    rank0 = ctx.rank == 0
    kw = {
        "max_length": args.max_length,
        "max_new_tokens": args.max_new_tokens,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "temperature": args.temperature,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
    }
    for prompt in prompts if args.stream else []:
        shown = ""
        # Each part extends the last and never ends inside a character (the stream holds
        # unfinished UTF-8 bytes back), so printing the new suffix is all it takes.
        for part in pipe.stream(prompt, **kw):
            if rank0:
                print(part["text"][len(shown) :], end="", flush=True)
            shown = part["text"]
        if rank0:
            print(flush=True)
    if args.stream:
        return 0
    if args.num_beams > 1:
        kw = {"max_length": args.max_length, "max_new_tokens": args.max_new_tokens}
        kw.update(num_beams=args.num_beams, length_penalty=args.length_penalty)
    outputs = pipe(
        prompts,
        num_return_sequences=args.num_return_sequences,
        batch_size=args.batch_size,
        **kw,
    )
    if rank0:
        for prompt, out in zip(prompts, outputs):
            for o in out if isinstance(out, list) else [out]:
                if args.jsonl:
                    print(json.dumps({"prompt": prompt, **o}, ensure_ascii=False))
                else:
                    print(o["text"])
    return 0
