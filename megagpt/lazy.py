"""Package attributes imported on first use: the packages whose modules pull in torch, lm-eval
or FastAPI export their names this way, so `import megagpt.X` and `megagpt --help` stay light."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable


def lazy_getattr(package: str, exports: dict[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``package`` that imports ``exports[name]`` (a module path)
    the first time ``name`` is read and returns its attribute ``name``."""

    def __getattr__(name: str):
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
            # Kept on the package: importing a submodule of the same name (evaluation's
            # ``perplexity``) set the package attribute to the module, which must not win.
            setattr(sys.modules[package], name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
