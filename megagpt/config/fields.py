"""`doc(...)`: a dataclass field carrying its one-line description (and optional choices).

The config reference (`megagpt config-docs`) is generated from these descriptions.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any


def doc(default: Any, text: str, *, choices: tuple[Any, ...] | None = None) -> Any:
    """A dataclass field with a default and a one-line description (and optional choices).

    Returns a ``dataclasses.field``; typed ``Any`` so that ``x: int = doc(0, "...")`` checks, as
    ``field()`` itself is typed.
    """
    meta: dict[str, Any] = {"doc": text}
    if choices is not None:
        meta["choices"] = choices
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)
