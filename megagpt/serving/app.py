"""The HTTP application (FastAPI): OpenAI-style completions, models, health, and the original
pipeline's ``{"text": ...}`` endpoint, all over one ``Engine``.

Handlers run on uvicorn's event loop; they validate the body (``protocol``), tokenize, hand
sequences to the engine and wait on an asyncio queue that the scheduler thread fills through
``loop.call_soon_threadsafe``. A client that goes away cancels its sequences: their rows are
freed at the next step.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

# This module is the server itself: it is imported only when one starts (megagpt.serving.cli
# checks that FastAPI is installed first), so the imports can sit at the top, where FastAPI
# resolves the handlers' postponed annotations.
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from megagpt.inference.generate import TextGenerator
from megagpt.serving.engine import Engine, Event, Sequence
from megagpt.serving.protocol import (
    RequestError,
    limit_for,
    parse_completion,
    parse_generate,
)
from megagpt.serving.text import CompletionText


class Service:
    """What the handlers need: the engine, the tokenizer and the served model's name."""

    def __init__(self, engine: Engine, tokenizer, model_name: str):
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.generator: TextGenerator = engine.generator
        self.created = int(time.time())

    @property
    def vocab_size(self) -> int:
        return self.generator.vocab_size

    @property
    def max_positions(self) -> int:
        return self.generator.max_positions

    def encode(self, prompt: str | list[int], name: str = "prompt") -> list[int]:
        """Token ids of a prompt, as the pipeline's (``Tokenizer.encode_prompt``); a list of
        ids is taken as it is."""
        if isinstance(prompt, list):
            return list(prompt)
        ids = self.tokenizer.encode_prompt(prompt)
        if not ids:
            raise RequestError(
                f"empty '{name}' and the tokenizer has no end-of-document token to start from",
                name,
            )
        return ids

    def sequences(
        self,
        prompts: list[list[int]],
        limits: list[int],
        params,
        n: int,
        seed: int | None,
        stops: tuple[str, ...],
        sink,
    ) -> list[Sequence]:
        """n sequences per prompt (prompt-major: choice index = prompt * n + copy), each with
        the sampling key ``TextGenerator.keys_for`` gives that row."""
        keys = (
            self.generator.keys_for(prompts, n, seed)
            if not params.greedy
            else [None] * (len(prompts) * n)
        )
        out = []
        for i, (ids, limit) in enumerate(zip(prompts, limits)):
            for c in range(n):
                index = i * n + c
                out.append(
                    Sequence(
                        ids,
                        params,
                        limit,
                        CompletionText(self.tokenizer, ids, stops),
                        sink,
                        index=index,
                        key=keys[index],
                    )
                )
        return out


def _events(loop: asyncio.AbstractEventLoop) -> tuple[asyncio.Queue, callable]:
    q: asyncio.Queue = asyncio.Queue()

    def sink(event: Event) -> None:  # called on the scheduler thread
        try:
            loop.call_soon_threadsafe(q.put_nowait, event)
        except RuntimeError:  # the event loop has closed (shutdown): nobody is waiting
            pass

    return q, sink


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(service: Service):
    """The FastAPI application over ``service``."""
    app = FastAPI(title="megagpt serve", version="1")
    app.state.service = service

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        err = RequestError(
            f"{request.method} {request.url.path}: {exc.detail}",
            status=exc.status_code,
            type="not_found_error" if exc.status_code == 404 else "invalid_request_error",
        )
        return JSONResponse(err.body(), status_code=exc.status_code)

    async def _json(request: Request):
        try:
            return json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError(f"the request body is not valid JSON: {e}") from None

    @app.get("/health")
    async def health():
        engine = service.engine
        body = {
            "status": "ok" if engine.alive else "stopped",
            "model": service.model_name,
            "active": len(engine.active),
            "waiting": engine.waiting.qsize(),
            "max_batch": engine.max_batch,
            # Greedy speculation so far: checking steps, guesses fed and guesses kept.
            "speculation": dict(engine.spec_stats),
        }
        return JSONResponse(body, status_code=200 if engine.alive else 503)

    def _model_card() -> dict:
        return {
            "id": service.model_name,
            "object": "model",
            "created": service.created,
            "owned_by": "megagpt",
            "max_model_len": service.max_positions,
        }

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card()]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        if name != service.model_name:
            raise RequestError(
                f"the model '{name}' does not exist; this server serves '{service.model_name}'",
                "model",
                status=404,
                code="model_not_found",
            )
        return _model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse_completion(await _json(request), service.model_name, service.vocab_size)
        prompts = [service.encode(p) for p in req.prompts]
        limits = [
            limit_for(len(p), service.max_positions, max_new_tokens=req.max_tokens) for p in prompts
        ]
        q, sink = _events(asyncio.get_running_loop())
        seqs = service.sequences(prompts, limits, req.params, req.n, req.seed, req.stop, sink)
        echoes = [service.tokenizer.decode(p) if req.echo else "" for p in prompts]
        rid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        usage = {"prompt_tokens": sum(len(p) for p in prompts), "completion_tokens": 0}
        service.engine.submit(seqs)
        if req.stream:
            return StreamingResponse(
                _stream(rid, created, seqs, q, echoes, req, usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        texts = [echoes[s.index // req.n] for s in seqs]
        reasons: list[str | None] = [None] * len(seqs)
        try:
            await _drain(q, len(seqs), texts, reasons, usage)
        finally:
            for s in seqs:
                s.cancel()  # no-op for finished ones; frees the rows if the client left
        choices = [
            {"text": t, "index": i, "logprobs": None, "finish_reason": r}
            for i, (t, r) in enumerate(zip(texts, reasons))
        ]
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": service.model_name,
            "choices": choices,
            "usage": usage,
        }

    async def _stream(rid, created, seqs, q, echoes, req, usage):
        def chunk(choices):
            return _sse(
                {
                    "id": rid,
                    "object": "text_completion",
                    "created": created,
                    "model": service.model_name,
                    "choices": choices,
                }
            )

        try:
            for s in seqs:
                if echoes[s.index // req.n]:
                    yield chunk(
                        [
                            {
                                "text": echoes[s.index // req.n],
                                "index": s.index,
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ]
                    )
            left = len(seqs)
            while left:
                ev: Event = await q.get()
                if ev.finish_reason == "error":
                    yield _sse(
                        RequestError(
                            f"generation failed: {ev.error}", status=500, type="server_error"
                        ).body()
                    )
                    break
                if ev.finish_reason is not None:
                    left -= 1
                    usage["completion_tokens"] += ev.tokens
                elif not ev.text:
                    continue
                yield chunk(
                    [
                        {
                            "text": ev.text,
                            "index": ev.index,
                            "logprobs": None,
                            "finish_reason": ev.finish_reason,
                        }
                    ]
                )
            if req.include_usage:
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                yield _sse(
                    {
                        "id": rid,
                        "object": "text_completion",
                        "created": created,
                        "model": service.model_name,
                        "choices": [],
                        "usage": usage,
                    }
                )
            yield "data: [DONE]\n\n"
        finally:
            for s in seqs:
                s.cancel()

    @app.post("/generate")
    async def generate(request: Request):
        defaults = service.generator.defaults
        req = parse_generate(await _json(request), service.vocab_size, defaults)
        prompts = [service.encode(t, "text") for t in req.texts]
        limits = [
            limit_for(
                len(p),
                service.max_positions,
                max_new_tokens=req.max_new_tokens,
                max_length=req.max_length,
                name="text",
                default_new=defaults.new_tokens,
            )
            for p in prompts
        ]
        q, sink = _events(asyncio.get_running_loop())
        seqs = service.sequences(prompts, limits, req.params, 1, req.seed, (), sink)
        service.engine.submit(seqs)
        texts = [service.tokenizer.decode(p) for p in prompts]  # the pipeline shows the prompt
        try:
            await _drain(q, len(seqs), texts, [None] * len(seqs), {"completion_tokens": 0})
        finally:
            for s in seqs:
                s.cancel()
        out = [{"text": t} for t in texts]
        return out[0] if req.single else out

    return app


async def _drain(
    q: asyncio.Queue, count: int, texts: list[str], reasons: list, usage: dict
) -> None:
    """Collect ``count`` choices' events into ``texts``/``reasons``; a failed step -> 500."""
    left = count
    while left:
        ev: Event = await q.get()
        if ev.finish_reason == "error":
            raise RequestError(f"generation failed: {ev.error}", status=500, type="server_error")
        texts[ev.index] += ev.text
        if ev.finish_reason is not None:
            reasons[ev.index] = ev.finish_reason
            usage["completion_tokens"] += ev.tokens
            left -= 1
