"""Argument checks of the native ops (csrc/ops.cpp), called directly through
torch.ops.skipdit: every bad argument is a ValueError / TypeError that names the op and
the argument -- 0-d tensors, the backward ops' grad_out / out / lse, tensors on mixed
devices (a meta tensor among CPU tensors) -- and attention_backward serves out and
grad_out of any strides."""

from __future__ import annotations

import pytest
import torch

from skipdit_fast import reference

ops = torch.ops.skipdit
SCALAR = torch.tensor(1.0)


def _sf_args(D=8, D_out=12, dtype=torch.float32):
    return [torch.randn(4, D, dtype=dtype), torch.randn(4, D, dtype=dtype), torch.ones(2 * D),
            torch.zeros(2 * D), torch.randn(D_out, 2 * D, dtype=dtype), torch.zeros(D_out, dtype=dtype)]


SF_NAMES = ["x", "skip", "norm_weight", "norm_bias", "weight", "bias"]


@pytest.mark.parametrize("i", range(6), ids=SF_NAMES)
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_skip_fuse_zero_dim_argument(i, backward):
    args = _sf_args()
    args[i] = SCALAR
    name = SF_NAMES[i]
    if backward:
        with pytest.raises(ValueError, match=f"skipdit::skip_fuse_backward: {name} must"):
            ops.skip_fuse_backward(torch.randn(4, 12), *args, 1e-6)
    else:
        with pytest.raises(ValueError, match=f"skipdit::skip_fuse: {name} must"):
            ops.skip_fuse(*args, 1e-6)


def _attn_args(dtype=torch.float32):
    q, k, v = (torch.randn(2, 5, 3, 8, dtype=dtype) for _ in range(3))
    out, lse = ops.attention_forward(q, k, v, 0.3)
    return [torch.randn_like(out), q, k, v, out, lse]


ATTN_NAMES = ["grad_out", "q", "k", "v", "out", "lse"]


@pytest.mark.parametrize("i", range(3), ids=["q", "k", "v"])
def test_attention_forward_zero_dim_argument(i):
    args = _attn_args()[1:4]
    args[i] = SCALAR
    with pytest.raises(ValueError, match=f"skipdit::attention_forward: {'qkv'[i]} must be 4-D"):
        ops.attention_forward(*args, 0.3)
    with pytest.raises(ValueError, match=f"skipdit::attention_forward: {'qkv'[i]} must be 4-D"):
        ops.attention(*args)


@pytest.mark.parametrize("i", range(6), ids=ATTN_NAMES)
def test_attention_backward_zero_dim_argument(i):
    args = _attn_args()
    args[i] = SCALAR
    with pytest.raises(ValueError, match=f"skipdit::attention_backward: {ATTN_NAMES[i]} must"):
        ops.attention_backward(*args, 0.3)


@pytest.mark.parametrize("i", range(2), ids=["a", "b"])
def test_cache_delta_zero_dim_argument(i):
    args = [torch.randn(3, 4), torch.randn(3, 4)]
    args[i] = SCALAR
    with pytest.raises(ValueError, match=f"skipdit::cache_delta: {'ab'[i]} must have at least one"):
        ops.cache_delta(*args)


SF_BWD_BAD = {
    "shape": (lambda g: torch.randn(4, 13), ValueError, "grad_out must have the output's shape"),
    "leading shape": (lambda g: torch.randn(2, 2, 12), ValueError, "grad_out must have the output's shape"),
    "dtype": (lambda g: g.double(), TypeError, "grad_out dtype Double differs from x dtype Float"),
    "meta": (lambda g: g.to("meta"), ValueError, "all tensors must be on one device; grad_out is on meta but x is on cpu"),
}


@pytest.mark.parametrize("op", ["skip_fuse_backward", "skip_fuse_backward_triton"])
@pytest.mark.parametrize("case", sorted(SF_BWD_BAD))
def test_skip_fuse_backward_grad_out(op, case):
    change, exc, msg = SF_BWD_BAD[case]
    with pytest.raises(exc, match=f"skipdit::{op}: {msg}"):
        getattr(ops, op)(change(torch.randn(4, 12)), *_sf_args(), 1e-6)


def test_skip_fuse_backward_meta_input_among_cpu():
    """A meta tensor among CPU tensors: an error, not uninitialized CPU gradients (the
    call would otherwise go to the meta (fake) kernel, which does not see grad_out)."""
    args = _sf_args()
    args[4] = args[4].to("meta")
    with pytest.raises(ValueError, match="skipdit::skip_fuse_backward: all tensors must be on one device"):
        ops.skip_fuse_backward(torch.randn(4, 12), *args, 1e-6)


ATTN_BWD_BAD = {  # index of the argument -> (change, exception, message)
    "grad_out shape": (0, lambda t: t[:, :4], ValueError, "grad_out must have the shape of q"),
    "out shape": (4, lambda t: t[..., :2, :], ValueError, "out must have the shape of q"),
    "lse shape": (5, lambda t: t.transpose(1, 2), ValueError, r"lse must have shape \[B, H, Nq\]"),
    "grad_out dtype": (0, lambda t: t.half(), TypeError, "grad_out dtype Half differs from q dtype Float"),
    "out dtype": (4, lambda t: t.half(), TypeError, "out dtype Half differs from q dtype Float"),
    "lse dtype": (5, lambda t: t.half(), TypeError, "lse dtype Half must be Float"),
    "lse fp64": (5, lambda t: t.double(), TypeError, "lse dtype Double must be Float"),
    "grad_out meta": (0, lambda t: t.to("meta"), ValueError,
                      "all tensors must be on one device; grad_out is on meta but q is on cpu"),
    "out meta": (4, lambda t: t.to("meta"), ValueError,
                      "all tensors must be on one device; out is on meta but q is on cpu"),
    "lse meta": (5, lambda t: t.to("meta"), ValueError,
                      "all tensors must be on one device; lse is on meta but q is on cpu"),
    "v meta": (3, lambda t: t.to("meta"), ValueError, "all tensors must be on one device"),
}


@pytest.mark.parametrize("op", ["attention_backward", "attention_backward_triton"])
@pytest.mark.parametrize("case", sorted(ATTN_BWD_BAD))
def test_attention_backward_bad_argument(op, case):
    i, change, exc, msg = ATTN_BWD_BAD[case]
    args = _attn_args()
    args[i] = change(args[i])
    with pytest.raises(exc, match=f"skipdit::{op}: {msg}"):
        getattr(ops, op)(*args, 0.3)


def test_attention_backward_fp64_lse():
    args = _attn_args(torch.float64)
    assert args[5].dtype == torch.float64  # the accumulation dtype of fp64 inputs
    ops.attention_backward(*args, 0.3)
    args[5] = args[5].float()
    with pytest.raises(TypeError, match="lse dtype Float must be Double"):
        ops.attention_backward(*args, 0.3)


def test_all_meta_backward_checks_shapes():
    """On meta tensors only, the checks still run before the fake kernel."""
    args = [t.to("meta") for t in _attn_args()]
    args[0] = args[0][:, :4]
    with pytest.raises(ValueError, match="grad_out must have the shape of q"):
        ops.attention_backward(*args, 0.3)
    sf = [t.to("meta") for t in _sf_args()]
    with pytest.raises(ValueError, match="grad_out must have the output's shape"):
        ops.skip_fuse_backward(torch.empty(4, 5, device="meta"), *sf, 1e-6)


def _restrided(t: torch.Tensor, kind: str) -> torch.Tensor:
    """t's values in another memory layout."""
    if kind == "issue":  # the strides of issue 16 (shape [1, 5, 3, 8])
        out = torch.empty_strided(t.shape, (1, 6, 2, 30), dtype=t.dtype)
    elif kind == "head_dim_stride_2":
        out = torch.full((*t.shape[:-1], 2 * t.shape[-1]), float("nan"), dtype=t.dtype)[..., ::2]
    elif kind == "permuted":  # last dim contiguous, leading dims in another order
        out = torch.empty(t.shape[2], t.shape[0], t.shape[1], t.shape[3], dtype=t.dtype).permute(1, 2, 0, 3)
    elif kind == "reversed":
        out = torch.empty(tuple(reversed(t.shape)), dtype=t.dtype).permute(3, 2, 1, 0)
    else:
        raise ValueError(kind)
    return out.copy_(t)


@pytest.mark.parametrize("which", ["out", "grad_out", "both"])
@pytest.mark.parametrize("kind", ["issue", "head_dim_stride_2", "permuted", "reversed"])
def test_attention_backward_any_strides(kind, which):
    B, N, H, Dh = 1, 5, 3, 8
    q, k, v = (torch.randn(B, N, H, Dh, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out, lse = ops.attention_forward(q.detach(), k.detach(), v.detach(), 0.3)
    g = torch.randn_like(out)
    o2 = _restrided(out, kind) if which in ("out", "both") else out
    g2 = _restrided(g, kind) if which in ("grad_out", "both") else g
    assert o2.stride() != out.stride() or g2.stride() != g.stride()
    got = ops.attention_backward(g2, q.detach(), k.detach(), v.detach(), o2, lse, 0.3)
    want = torch.autograd.grad(reference.attention(q, k, v, 0.3), [q, k, v], g)
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=f"d{name}")
