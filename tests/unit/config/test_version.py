"""One version number: megagpt.__version__, which pyproject.toml reads into the metadata."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

import megagpt

ROOT = Path(__file__).resolve().parents[3]


def test_the_installed_metadata_carries_megagpts_version():
    # An install older than the checkout (reinstall with `pip install -e .`) fails here too.
    assert importlib.metadata.version("megagpt") == megagpt.__version__


def test_pyproject_takes_the_version_from_the_package_not_a_second_literal():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "version" not in project["project"]
    assert "version" in project["project"]["dynamic"]
    dynamic = project["tool"]["setuptools"]["dynamic"]["version"]
    assert dynamic == {"attr": "megagpt.__version__"}
    assert not (ROOT / "setup.py").exists(), "metadata lives in pyproject.toml only"
