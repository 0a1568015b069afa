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

from tests.distributed.launcher import free_port
from tests.unit.inference.conftest import (  # noqa: F401  (fixtures shared with inference)
    process_group,
    shared_assets,
)

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
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                                    log_level="warning"))
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


def build_context_model_dir(root, tokenizer: str, seed: int = 7) -> str:
    """A gpt3-tiny model directory (dropout off) whose greedy choices depend on the context."""
    import torch

    from megagpt.checkpoint import model_dir
    from megagpt.config import ParallelConfig, from_name
    from megagpt.model import GPTModel, initialize_weights, megatron_config

    cfg = from_name("gpt3-tiny")
    cfg.dropout = cfg.attention_dropout = 0.0
    model = GPTModel(cfg, megatron_config(cfg, ParallelConfig()))
    initialize_weights(model, cfg, seed, 0, 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "word_embeddings" in name:
                p.mul_(3.0)
            elif "position_embeddings" in name or ("weight" in name and "norm" not in name):
                p.mul_(10.0)
    out = root / "serve_model"
    model_dir.save_tensors(str(out), model_dir.full_tensors(model, cfg))
    model_dir.write_config(str(out), cfg)
    model_dir.copy_tokenizer(str(out), tokenizer)
    return str(out)


_MODEL: dict = {}


def context_model_dir(tmp_path_factory) -> str:
    """The serving model directory, built once per session (also for the TP tests)."""
    if not _MODEL:
        from tests.unit.inference.conftest import _LocalGroup

        assets = shared_assets(tmp_path_factory)
        with _LocalGroup():
            _MODEL["dir"] = build_context_model_dir(assets["root"], assets["tokenizer"])
    return _MODEL["dir"]


@pytest.fixture(scope="session")
def serve_model_dir(tmp_path_factory, process_group) -> str:  # noqa: F811
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
