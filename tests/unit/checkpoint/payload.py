"""A real pickle payload: unpickling it creates a marker file (no shell, no network).

``torch.load(weights_only=False)`` -- what DeepSpeed's loader does -- calls ``open(marker, "w")``;
``weights_only=True`` refuses it. Tests plant it where a loader could look and assert the marker
never appears.
"""

from __future__ import annotations

from pathlib import Path

import torch


class Payload:
    def __init__(self, marker: str | Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path: str | Path, marker: str | Path) -> Path:
    """Write a DeepSpeed-looking state dict whose unpickling creates ``marker``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"module": {"w": torch.zeros(2)}, "payload": Payload(marker)}, path)
    return path
