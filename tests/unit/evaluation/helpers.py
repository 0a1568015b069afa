"""Direct computations the evaluation tests compare against (plain torch, no megagpt scoring)."""

from __future__ import annotations

import torch


@torch.no_grad()
def token_nll(model, context: list[int], targets: list[int]) -> list[float]:
    """-log p(targets[i] | context + targets[:i]) with one full forward (TP=1 model)."""
    seq = context + targets
    logits = model(torch.tensor([seq[:-1]]))[:, 0].double()  # [s, 1, V] -> [s, V]
    logp = torch.log_softmax(logits, dim=-1)
    start = len(context) - 1
    return [-float(logp[start + i, t]) for i, t in enumerate(targets)]
