"""`megagpt serve`: OpenAI-compatible HTTP serving with continuous batching.

FastAPI and uvicorn (``pip install -e ".[serve]"``) are imported by ``app`` and ``cli`` only
when a server starts; the engine and cache need torch alone. Names are imported on first use,
so building the ``megagpt`` parser (which registers ``serve``) does not import torch.
"""

_EXPORTS = {
    "SlotCache": "megagpt.serving.cache",
    "Engine": "megagpt.serving.engine",
    "Event": "megagpt.serving.engine",
    "Executor": "megagpt.serving.engine",
    "Sequence": "megagpt.serving.engine",
    "follow": "megagpt.serving.engine",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'megagpt.serving' has no attribute {name!r}")
