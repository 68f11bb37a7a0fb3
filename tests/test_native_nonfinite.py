"""Non-finite inputs through the native CPU kernels: where the reference gives NaN (or
inf) the kernel gives NaN (or inf) at the same places, and elsewhere the reference's
values. ATen's CPU flash attention alone returned 0 for query rows whose scores are
all NaN or -inf (csrc/cpu/attention.cpp restores the reference's values there)."""

from __future__ import annotations

import math

import pytest
import torch

import skipdit_fast as sf
from skipdit_fast import reference

ops = torch.ops.skipdit
VALUES = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def assert_same_nonfinite(got: torch.Tensor, want: torch.Tensor, what: str, atol: float):
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{what}: NaN at other places"
    assert torch.equal(torch.isposinf(got), torch.isposinf(want)), f"{what}: +inf at other places"
    assert torch.equal(torch.isneginf(got), torch.isneginf(want)), f"{what}: -inf at other places"
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-4, atol=atol, msg=what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("value", sorted(VALUES))
@pytest.mark.parametrize("where", ["q", "k", "v", "q row of -inf scores"])
def test_attention_forward(where, value, dtype):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 6, 3, 8, dtype=dtype) for _ in range(3))
    if where == "q row of -inf scores":
        # q[0, 2, 1, 3] = +-inf with column 3 of k of one sign: every score of that query
        # is +inf or every one is -inf (ATen's kernel returned 0 for the latter)
        k[..., 3] = k[..., 3].abs() + 0.5
        q[0, 2, 1, 3] = VALUES[value]
    else:
        {"q": q, "k": k, "v": v}[where][0, 2, 1, 3] = VALUES[value]
    out, lse = ops.attention_forward(q, k, v, 0.3)
    with sf.use_backend("cpu"):
        public = sf.ops.attention(q, k, v, 0.3)
    atol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_same_nonfinite(out, reference.attention(q, k, v, 0.3), "out", atol)
    assert torch.equal(public.isnan(), out.isnan())
    assert_same_nonfinite(lse, reference.attention_lse(q, k, v, 0.3), "lse", atol)


def test_attention_nan_query_row_backward():
    q, k, v = (torch.randn(1, 6, 2, 8, dtype=torch.float64) for _ in range(3))
    q[0, 2, 1, 3] = math.nan
    g = torch.randn(1, 6, 2, 8, dtype=torch.float64)

    def grads(fn):
        ts = [t.clone().requires_grad_() for t in (q, k, v)]
        fn(*ts).backward(g)
        return [t.grad for t in ts]

    with sf.use_backend("cpu"):
        got = grads(lambda *a: sf.ops.attention(*a, 0.3))
    for name, a, b in zip("qkv", got, grads(lambda *a: reference.attention(*a, 0.3))):
        assert_same_nonfinite(a, b, f"d{name}", 1e-10)


def test_attention_finite_row_with_zero_lse_untouched():
    """lse == 0 with finite scores (one key, q . k = 0): a real value, not a fix-up."""
    q = torch.zeros(1, 3, 1, 8)
    k, v = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    out, lse = ops.attention_forward(q, k, v, 0.3)
    assert torch.equal(lse, torch.zeros(1, 1, 3))
    torch.testing.assert_close(out, v.expand(1, 3, 1, 8))


SF_ARGS = ["x", "skip", "norm_weight", "norm_bias", "weight", "bias"]


@pytest.mark.parametrize("value", sorted(VALUES))
@pytest.mark.parametrize("where", SF_ARGS)
def test_skip_fuse(where, value):
    torch.manual_seed(0)
    D, D_out = 8, 6
    args = [torch.randn(5, D), torch.randn(5, D), 1 + 0.1 * torch.randn(2 * D), 0.1 * torch.randn(2 * D),
            torch.randn(D_out, 2 * D) / 4, torch.randn(D_out)]
    t = args[SF_ARGS.index(where)]
    t.view(-1)[min(3, t.numel() - 1)] = VALUES[value]
    with sf.use_backend("cpu"):
        got = sf.ops.skip_fuse(*args)
    assert_same_nonfinite(got, reference.skip_fuse(*args), "y", 1e-5)


@pytest.mark.parametrize("value", sorted(VALUES))
@pytest.mark.parametrize("where", ["a", "b", "both"])
def test_cache_delta(where, value):
    a, b = torch.randn(4, 9), torch.randn(4, 9)
    for name, t in (("a", a), ("b", b)):
        if where in (name, "both"):
            t[1, 2] = VALUES[value]
    with sf.use_backend("cpu"):
        got = sf.ops.cache_delta(a, b)
    assert_same_nonfinite(got, reference.cache_delta(a, b), "cache_delta", 1e-6)
