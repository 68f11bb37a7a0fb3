"""The pure-PyTorch reference (skipdit_fast.ops.reference) keeps its contract in 16-bit
dtypes: attention scores and softmax in fp32, so scores that overflow fp16 stay finite."""

from __future__ import annotations

import pytest
import torch

from skipdit_fast import ops
from skipdit_fast.ops import reference


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_scores_do_not_overflow(dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, 2, 64, generator=g) for _ in range(3))
    q, k = 30 * q + 300, 30 * k + 300  # q . k ~ 6e6: inf in fp16
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    truth = reference.attention(q.double(), k.double(), v.double())
    out = reference.attention(q, k, v)
    assert torch.isfinite(out).all() and torch.isfinite(reference.attention_lse(q, k, v)).all()
    assert (out.double() - truth).abs().max() < 0.05
    with ops.use_backend("reference"):
        q.requires_grad_(True)
        ops.attention(q, k, v).sum().backward()
    assert torch.isfinite(q.grad).all()
