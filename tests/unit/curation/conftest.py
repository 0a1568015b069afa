"""Shared helpers of the curation tests: real wiki paragraphs, jsonl writing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
WIKI = ROOT.parent / "shared" / "data" / "corpus" / "wiki_cmrc2018.jsonl"


def write_jsonl(path: Path, texts: list[str], key: str = "text") -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({key: t}, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="session")
def wiki_docs() -> list[str]:
    """Distinct real Chinese Wikipedia paragraphs of 300-1500 characters."""
    out, seen = [], set()
    with open(WIKI, encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"]
            if 300 <= len(text) <= 1500 and text[:50] not in seen:
                seen.add(text[:50])
                out.append(text)
            if len(out) >= 120:
                break
    return out
