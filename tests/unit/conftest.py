"""The unit tier's contract: no test starts a process group (those live in tests/distributed,
which also holds the in-process tests that need one). Checked after every unit test."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_process_group():
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()  # do not let the next tests run inside it
        pytest.fail(
            "a unit test left a torch.distributed process group initialised: it belongs "
            "in tests/distributed (see CONTRIBUTING.md)"
        )
