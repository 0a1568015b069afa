"""`doc(...)`: a dataclass field carrying its one-line description (and optional choices).

The config reference (`megagpt config-docs`) is generated from these descriptions.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any


def doc(default: Any, text: str, *, choices: tuple | None = None) -> Any:
    """A dataclass field with a default and a one-line description (and optional choices)."""
    meta = {"doc": text}
    if choices is not None:
        meta["choices"] = choices
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)
