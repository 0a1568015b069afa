"""Fixtures of the serving tests: the real server (uvicorn on a free loopback port, in a
thread of the test process) over a gpt3-tiny model directory whose choices depend on context.

The generation tests' tiny model (word embeddings sharpened 8x) picks its next token from the
last token alone, so a decode step that attended to the wrong keys would go unnoticed. Here the
position, attention and MLP weights are scaled up as well: a greedy continuation then changes
with the earlier tokens (checked by ``test_the_model_uses_its_context``), and a slot cache that
mixed rows or positions would change the text."""

from __future__ import annotations

import threading
import time

import pytest

from tests.conftest import build_model_dir
from tests.distributed.launcher import free_port
from tests.unit.inference.conftest import shared_assets

MODEL_NAME = "tiny"


class RunningServer:
    """uvicorn serving ``create_app`` in a thread; ``url`` is its base address."""

    def __init__(self, generator, tokenizer, max_batch: int):
        import uvicorn

        from megagpt.serving.app import Service, create_app
        from megagpt.serving.engine import Engine

        self.engine = Engine(generator, max_batch)
        self.engine.start()
        app = create_app(Service(self.engine, tokenizer, MODEL_NAME))
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.engine.close()


def context_scale(name: str) -> float:
    """Word embeddings 3x; positions and every non-norm weight 10x: greedy choices then depend on
    the context (see the module docstring)."""
    if "word_embeddings" in name:
        return 3.0
    if "position_embeddings" in name or ("weight" in name and "norm" not in name):
        return 10.0
    return 1.0


_MODEL: dict = {}


def context_model_dir(tmp_path_factory) -> str:
    """The serving model directory, built once per session (also for the TP tests)."""
    if not _MODEL:
        assets = shared_assets(tmp_path_factory)
        _MODEL["dir"] = build_model_dir(
            assets["root"] / "serve_model", assets["tokenizer"], scale=context_scale
        )
    return _MODEL["dir"]


@pytest.fixture(scope="session")
def serve_model_dir(tmp_path_factory) -> str:
    return context_model_dir(tmp_path_factory)


@pytest.fixture(scope="session")
def pipe(serve_model_dir):
    from megagpt import pipeline

    return pipeline("text-generation", model=serve_model_dir, device="cpu")


@pytest.fixture(scope="session")
def server(pipe):
    # max_batch 4 < the 16 concurrent clients of the tests: requests wait, join and leave.
    s = RunningServer(pipe.generator, pipe.tokenizer, max_batch=4)
    yield s
    s.close()
