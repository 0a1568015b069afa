"""`megagpt serve`: OpenAI-compatible HTTP serving with continuous batching.

FastAPI and uvicorn (``pip install -e ".[serve]"``) are imported by ``app`` and ``cli`` only
when a server starts; the engine and cache need torch alone. Names are imported on first use,
so building the ``megagpt`` parser (which registers ``serve``) does not import torch.
"""

from megagpt.lazy import lazy_getattr

_EXPORTS = {
    "SlotCache": "megagpt.serving.cache",
    "Engine": "megagpt.serving.engine",
    "Event": "megagpt.serving.engine",
    "Executor": "megagpt.serving.engine",
    "Sequence": "megagpt.serving.engine",
    "follow": "megagpt.serving.engine",
}

__all__ = list(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)
