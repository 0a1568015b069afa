"""Fixtures of the generation tests: a small real tokenizer and a tiny model directory (both
built by tests/conftest.py's factories). No process group: at tensor-parallel size 1 the model
runs without one, and one-process inference (``inference_context``) starts none."""

from __future__ import annotations

import pytest

from tests.conftest import build_model_dir, build_tokenizer_dir


_ASSETS: dict = {}


def shared_assets(tmp_path_factory) -> dict:
    """Tokenizer and tiny model directory, built once per test session (for the distributed
    tests, which would otherwise each start a process to build them)."""
    if not _ASSETS:
        root = tmp_path_factory.mktemp("gen_assets")
        tok = build_tokenizer_dir(root)
        model = build_model_dir(root / "model", tok)  # building needs no process group
        _ASSETS.update(root=root, tokenizer=tok, model=model)
    return _ASSETS


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    return shared_assets(tmp_path_factory)["tokenizer"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    return shared_assets(tmp_path_factory)["model"]


@pytest.fixture(scope="session")
def pipe(tiny_model_dir):
    from megagpt import pipeline

    return pipeline("text-generation", model=tiny_model_dir, device="cpu")
