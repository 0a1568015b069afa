"""Shared test setup: no network loggers, GPU tests skipped without CUDA.

DeepSpeed's accelerator is not set here: megagpt chooses it from each run's resolved device
(megagpt/engine/accelerator.py), for CPU and CUDA workers alike.
"""

import os

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
