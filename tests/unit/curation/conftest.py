"""Shared helpers of the curation tests: real wiki paragraphs, jsonl writing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import WIKI, read_jsonl

ROOT = Path(__file__).resolve().parents[3]


def write_jsonl(path: Path, texts: list[str], key: str = "text") -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({key: t}, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="session")
def wiki_docs() -> list[str]:
    """Distinct real Chinese Wikipedia paragraphs of 300-1500 characters."""
    out, seen = [], set()
    for text in read_jsonl(WIKI):
        if 300 <= len(text) <= 1500 and text[:50] not in seen:
            seen.add(text[:50])
            out.append(text)
            if len(out) >= 120:
                break
    return out
