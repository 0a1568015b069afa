"""Fixtures of the tests of the scripts in tools/: load a script as a module (tools/ is not a
package: users run ``python tools/NAME.py``), a small jieba-BPE tokenizer, the shared data."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from tests.conftest import WIKI, read_jsonl

ROOT = Path(__file__).resolve().parents[3]
TOOLS = ROOT / "tools"


def load_tool(name: str):
    """``tools/NAME.py`` imported as module ``tools_NAME`` (once per session)."""
    mod_name = f"tools_{name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    spec.loader.exec_module(module)
    return module


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    """``python tools/NAME.py ARGS`` as a user runs it (from another directory)."""
    return subprocess.run(
        [sys.executable, str(TOOLS / f"{name}.py"), *args],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="session")
def wiki_texts() -> list[str]:
    return read_jsonl(WIKI, 120)


@pytest.fixture(scope="session")
def jieba_tokenizer(tmp_path_factory, wiki_texts) -> Path:
    """A jieba-BPE tokenizer folder (vocab 800) trained on 120 wiki articles."""
    from megagpt.data.tokenizer_train import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_tokenizer(wiki_texts, str(out), vocab_size=800)
    return out
