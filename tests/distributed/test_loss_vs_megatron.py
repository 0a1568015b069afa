"""The chunked loss against megatron-core's ``vocab_parallel_cross_entropy`` (a distributed test
although it runs in this process: megatron-core's loss reads its parallel state, so it holds a
single-process gloo group)."""

from __future__ import annotations

import pytest
import torch

from megagpt.model.fused import vocab_cross_entropy
from tests.distributed.local_group import _LocalGroup


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_equals_megatron(dtype):
    """Several chunks (600 rows x 4096 vocab > 2^20 elements): loss and logits grad equal
    megatron-core's ``vocab_parallel_cross_entropy(logits.float())``."""
    from megatron.core import tensor_parallel

    torch.manual_seed(0)
    s, b, v = 150, 4, 4096
    logits = (torch.randn(s, b, v) * 3).to(dtype).requires_grad_()
    target = torch.randint(0, v, (s, b))
    weight = torch.rand(s, b)  # a loss mask-like upstream gradient
    with _LocalGroup():
        ours = vocab_cross_entropy(logits, target)
        ref_in = logits.detach().float().requires_grad_()
        ref = tensor_parallel.vocab_parallel_cross_entropy(ref_in.clone(), target)
        (g,) = torch.autograd.grad((ours * weight).sum(), logits)
        (gr,) = torch.autograd.grad((ref * weight).sum(), ref_in)
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, ref, **tol)
    torch.testing.assert_close(
        g.float(), gr, **(tol if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-4))
    )
