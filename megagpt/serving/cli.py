"""`megagpt serve`: an OpenAI-compatible HTTP server for a model directory.

Single process: ``megagpt serve --model DIR``. Tensor parallel: ``torchrun --nproc-per-node N
-m megagpt.cli serve --model DIR``; rank 0 serves HTTP and schedules, the other ranks follow
its decoding steps.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
from pathlib import Path

from megagpt.errors import MegagptError
from megagpt.inference.cli import add_model_arguments


class ServeError(MegagptError, ValueError):
    """A bad `megagpt serve` argument (checked before the model loads)."""


def add_serve_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server (/v1/completions, "
        "continuous batching; tensor parallel under torchrun)",
    )
    add_model_arguments(p)
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)",
    )
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 = any)")
    p.add_argument(
        "--max-batch",
        type=int,
        default=16,
        help="requests decoded together (KV-cache rows; default 16); more wait for a free row",
    )
    p.add_argument(
        "--served-model-name", help="the model name clients send (default: the directory's name)"
    )
    p.add_argument(
        "--speculate",
        type=int,
        default=None,
        metavar="N",
        help="greedy requests check up to N guessed tokens per step (n-gram drafts from "
        "their text; same tokens; default 7, 0 = one token per step)",
    )
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument(
        "--log-level", default="info", choices=("critical", "error", "warning", "info", "debug")
    )
    p.set_defaults(func=cmd_serve)


def check_args(args: argparse.Namespace) -> None:
    """ServeError naming the argument, before anything loads."""
    from megagpt.checkpoint.canonical import CheckpointError
    from megagpt.checkpoint.convert import detect

    if not Path(args.model).is_dir():
        raise ServeError(f"--model {args.model}: no such directory")
    try:
        detect(args.model)
    except CheckpointError as e:
        raise ServeError(f"--model {e}") from None
    if args.tokenizer is not None and not Path(args.tokenizer).exists():
        raise ServeError(f"--tokenizer {args.tokenizer}: no such file or directory")
    if not 0 <= args.port <= 65535:
        raise ServeError(f"--port {args.port}: must be in 0..65535")
    if args.max_batch < 1:
        raise ServeError(f"--max-batch {args.max_batch}: must be >= 1")
    if args.speculate is not None and args.speculate < 0:
        raise ServeError(f"--speculate {args.speculate}: must be >= 0")
    if args.served_model_name is not None and not args.served_model_name.strip():
        raise ServeError("--served-model-name must not be empty")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ServeError(
            f"megagpt serve needs FastAPI and uvicorn ({e}); install them with "
            'pip install -e ".[serve]"'
        ) from None
    if os.environ.get("RANK", "0") == "0":  # only rank 0 listens (see cmd_serve)
        check_listen(args.host, args.port)


def check_listen(host: str, port: int) -> None:
    """ServeError naming --host/--port when the server could not listen there: an unknown
    host, an address of another machine, a port in use or reserved. Found now, not once the
    model has loaded; binds the way uvicorn does (SO_REUSEADDR) and lets go at once."""
    import socket

    # uvicorn's own choice of family (uvicorn.config.Config.bind_socket).
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except (socket.gaierror, UnicodeError) as e:
            raise ServeError(f"--host {host!r}: not a known host name or address ({e})") from None
        except OSError as e:
            hint = (
                "another process is listening there; choose another --port"
                if e.errno == errno.EADDRINUSE
                else "give an address of this machine (--host 0.0.0.0 for every interface)"
                if e.errno == errno.EADDRNOTAVAIL
                else "choose another --host/--port"
            )
            raise ServeError(
                f"--host {host} --port {port}: cannot listen there ({e.strerror}); {hint}"
            ) from None


def cmd_serve(args: argparse.Namespace) -> int:
    check_args(args)
    from megagpt.inference.pipeline import inference_context, load_generator
    from megagpt.serving.engine import Engine, Executor, follow

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s: %(message)s")
    try:
        ctx = inference_context(args.device)
        generator, tokenizer = load_generator(
            args.model, dtype=args.dtype, ctx=ctx, tokenizer=args.tokenizer, flag="--tokenizer"
        )
    except ValueError as e:
        message = str(e)  # the reader's errors start with the path already
        raise ServeError(
            f"--model {message}"
            if message.startswith(args.model)
            else f"--model {args.model}: {message}"
        ) from None
    if args.speculate is not None:
        generator.speculate = args.speculate
    if generator.tp_size > 1 and ctx.rank != 0:
        follow(Executor(generator, args.max_batch))
        return 0
    name = args.served_model_name or Path(os.path.abspath(args.model)).name
    engine = Engine(generator, args.max_batch)
    engine.start()
    try:
        run_server(engine, tokenizer, name, args.host, args.port, args.log_level)
    except (KeyboardInterrupt, SystemExit):
        pass  # uvicorn re-raises the signal that stopped it once it has shut down
    finally:
        engine.close()  # the followers leave their loop too
    return 0


def run_server(engine, tokenizer, name: str, host: str, port: int, log_level: str = "info") -> None:
    """Serve until interrupted (SIGINT/SIGTERM end uvicorn; the caller closes the engine)."""
    import signal

    import uvicorn

    from megagpt.serving.app import Service, create_app

    app = create_app(Service(engine, tokenizer, name))

    def _terminate(signum, frame):
        raise SystemExit(0)

    # uvicorn shuts down on SIGTERM, then raises it again with the handler it found: this one,
    # so that the caller still closes the engine (and the other ranks) instead of dying.
    signal.signal(signal.SIGTERM, _terminate)
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level)).run()
