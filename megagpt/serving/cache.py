"""The serving KV cache: one row per scheduler slot, each row at its own position.

``SelfAttention`` talks to a cache only through ``update(layer, k, v)``, ``mask()``,
``position`` and ``length`` (megagpt.model.KVCache). With ``position`` set it takes the static
path: one query per row against the buffers ``update`` returns, masked by ``mask()``. Here
``position`` is a [rows] tensor, so every row writes its new key/value at its own index and sees
its own filled prefix: requests that joined at different times decode in one forward.

Active requests always occupy rows ``0..rows-1`` (the scheduler moves the last row into a row
that frees up, ``move``), so a step runs on contiguous views of the buffers and attends only to
``span`` positions (the longest active row), not to the whole allocation.
"""

from __future__ import annotations

import torch

from megagpt.model import KVCache


class SlotCache(KVCache):
    """Buffers [slots, heads_local, max_length, head_dim] per layer, allocated on first use.

    Before a decode step the caller sets ``rows`` (active rows), ``position`` ([rows] long: the
    index each row's new token is written at) and ``span`` (``max(position) + 1``).
    """

    def __init__(self, num_layers: int, slots: int, max_length: int):
        super().__init__(num_layers, max_length, static=True)
        self.slots = slots
        self.rows = 0
        self.span = 0
        self._row_ids: torch.Tensor | None = None

    def _allocate(self, layer: int, k: torch.Tensor) -> None:
        _, nh, _, hd = k.shape
        # Zeroed: masked slots are multiplied by 0 attention weight and must not hold NaN.
        self.keys[layer] = torch.zeros(
            self.slots, nh, self.max_length, hd, dtype=k.dtype, device=k.device
        )
        self.values[layer] = torch.zeros_like(self.keys[layer])

    def begin_step(self, positions: torch.Tensor, span: int) -> None:
        """Prepare a decode step over the first ``len(positions)`` rows."""
        self.rows = int(positions.shape[0])
        self.position = positions
        self.span = span
        self._row_ids = torch.arange(self.rows, device=positions.device)
        self._slots = torch.arange(span, device=positions.device)

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [rows, nh, 1, hd] written at each row's own position; returns views
        [rows, nh, span, hd] of the buffers to attend to (masked by ``mask()``)."""
        if self.keys[layer] is None:
            self._allocate(layer, k)
        keys = self.keys[layer][: self.rows]
        values = self.values[layer][: self.rows]
        # keys[r, :, position[r]] = k[r, :, 0]: advanced indices on dims 0 and 2 -> [rows, nh, hd]
        keys[self._row_ids, :, self.position] = k[:, :, 0]
        values[self._row_ids, :, self.position] = v[:, :, 0]
        return keys[:, :, : self.span], values[:, :, : self.span]

    def mask(self) -> torch.Tensor:
        """[rows, 1, 1, span] bool: row r sees slots 0..position[r]."""
        return (self._slots.unsqueeze(0) <= self.position.unsqueeze(1))[:, None, None, :]

    def store(self, row: int, prefill: KVCache, length: int) -> None:
        """Copy the first ``length`` positions of a one-row ``prefill`` cache into ``row``."""
        for layer, (k, v) in enumerate(zip(prefill.keys, prefill.values)):
            if self.keys[layer] is None:
                self._allocate(layer, k)
            self.keys[layer][row, :, :length] = k[0, :, :length]
            self.values[layer][row, :, :length] = v[0, :, :length]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy row ``src``'s first ``length`` positions into row ``dst`` (compaction)."""
        for layer in range(len(self.keys)):
            if self.keys[layer] is None:
                continue
            self.keys[layer][dst, :, :length] = self.keys[layer][src, :, :length]
            self.values[layer][dst, :, :length] = self.values[layer][src, :, :length]
