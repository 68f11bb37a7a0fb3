"""Double backward through the native ops' C++ autograd (csrc/autograd.cpp): with
create_graph=True the backward differentiates the reference composition, so gradient
penalties and gradgradcheck are right; without it the backward is the native kernel."""

from __future__ import annotations

import pytest
import torch

import skipdit_fast as sf
from skipdit_fast import reference

ops = torch.ops.skipdit
F64 = dict(dtype=torch.float64, requires_grad=True)


def _skip_fuse_args(dtype=torch.float64, bias=True, strided=False, requires_grad=True):
    D, D_out = 4, 5
    x = torch.randn(2, 2, D + 3, dtype=dtype)[..., :D] if strided else torch.randn(2, 2, D, dtype=dtype)
    args = [x, torch.randn(2, 2, D, dtype=dtype), 1 + 0.3 * torch.randn(2 * D, dtype=dtype),
            0.3 * torch.randn(2 * D, dtype=dtype), torch.randn(D_out, 2 * D, dtype=dtype) / 3,
            torch.randn(D_out, dtype=dtype) if bias else None]
    return [a.requires_grad_(requires_grad) if a is not None else None for a in args]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("strided", [False, True])
def test_skip_fuse_gradgradcheck(bias, strided):
    args = _skip_fuse_args(bias=bias, strided=strided)
    with sf.use_backend("cpu"):
        fn = (lambda *a: sf.ops.skip_fuse(*a)) if bias else (lambda *a: sf.ops.skip_fuse(*a, None))
        assert torch.autograd.gradgradcheck(fn, [a for a in args if a is not None])


def test_attention_gradgradcheck():
    qkv = torch.randn(1, 3, 3, 2, 8, **F64)
    k, v = torch.randn(1, 4, 2, 8, **F64), torch.randn(1, 4, 2, 8, **F64)
    with sf.use_backend("cpu"):
        assert torch.autograd.gradgradcheck(lambda q, k, v: sf.ops.attention(q, k, v, 0.4),
                                            (qkv[:, :, 0], k, v))


def test_cache_delta_gradgradcheck():
    with sf.use_backend("cpu"):
        assert torch.autograd.gradgradcheck(sf.ops.cache_delta, (torch.randn(3, 4, **F64),
                                                                 torch.randn(3, 4, **F64)))


def _penalty_grads(fn, args):
    """Gradient-penalty loss: |d(y^2)/dx|^2 + y, differentiated w.r.t. every input."""
    y = fn(*args)
    gx, = torch.autograd.grad(y.square().sum(), args[0], create_graph=True)
    return torch.autograd.grad(gx.square().sum() + y.sum(), [a for a in args if a is not None])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_skip_fuse_gradient_penalty_matches_reference(dtype):
    args = _skip_fuse_args(dtype)
    with sf.use_backend("cpu"):
        got = _penalty_grads(sf.ops.skip_fuse, args)
    want = _penalty_grads(reference.skip_fuse, args)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for name, g, w in zip(["x", "skip", "norm_weight", "norm_bias", "weight", "bias"], got, want):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol, msg=name)


def test_attention_gradient_penalty_matches_reference():
    q, k, v = (torch.randn(2, 5, 2, 8, **F64) for _ in range(3))
    with sf.use_backend("cpu"):
        got = _penalty_grads(lambda *a: sf.ops.attention(*a, 0.3), [q, k, v])
    want = _penalty_grads(lambda *a: reference.attention(*a, 0.3), [q, k, v])
    for name, g, w in zip("qkv", got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, msg=name)


def test_first_order_backward_is_the_native_kernel():
    """Without create_graph the gradients are exactly skip_fuse_backward's / attention_backward's."""
    args = _skip_fuse_args(torch.float32)
    gy = torch.randn(2, 2, 5)
    with sf.use_backend("cpu"):
        got = torch.autograd.grad(sf.ops.skip_fuse(*args), args, gy)
    want = ops.skip_fuse_backward(gy, *[a.detach() for a in args], 1e-6)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    q, k, v = (torch.randn(2, 5, 2, 8, requires_grad=True) for _ in range(3))
    with sf.use_backend("cpu"):
        out = sf.ops.attention(q, k, v, 0.3)
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, [q, k, v], g)
    o, lse = ops.attention_forward(q.detach(), k.detach(), v.detach(), 0.3)
    for a, b in zip(got, ops.attention_backward(g, q.detach(), k.detach(), v.detach(), o, lse, 0.3)):
        assert torch.equal(a, b)
