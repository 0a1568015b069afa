"""Model tests run inside one local single-process gloo group (megatron-core's parallel layers
need their size-1 tensor-parallel group even at TP=1): the generation tests' helper."""

from __future__ import annotations

import pytest

from tests.unit.inference.conftest import _LocalGroup


@pytest.fixture(scope="module")
def process_group():
    with _LocalGroup():
        yield
