"""Argument checks and output allocation shared by the Python-side implementations
(reference, Triton launchers in kernels/, fake kernels): the bottom of the op layer,
importing nothing of skipdit_fast. The checks mirror csrc/ops.cpp so that every
backend rejects bad input with the same ValueError / TypeError."""

from __future__ import annotations

import math

import torch

# NaN-poisoning of kernel outputs (skipdit_fast.ops.testing.poison_outputs sets it)
_POISON = [False]


def new_output(shape, *, dtype, device) -> torch.Tensor:
    """torch.empty, filled with NaN while poison_outputs() is active: Python-side
    launchers (Triton) allocate their outputs through this."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if _POISON[0] and t.is_floating_point():
        t.fill_(float("nan"))
    return t

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """DESIGN.md: fp32 for 16-bit inputs, else the input dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _tensor(op, name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")


def _float(op, name, t):
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def _last_contig(op, name, t):
    if t.dim() < 1:
        raise ValueError(f"{op}: {name} must have at least one dimension")
    if t.stride(-1) != 1 and t.size(-1) != 1:
        raise ValueError(f"{op}: {name} must have a contiguous last dimension (stride 1), got stride {t.stride(-1)}")


def _nonempty(op, name, t):
    if t.numel() == 0:
        raise ValueError(f"{op}: {name} is empty (shape {list(t.shape)})")


def _same_device(op, ref, name, t):
    if t.device != ref.device:
        raise ValueError(f"{op}: all tensors must be on one device; {name} is on {t.device} "
                         f"but the first input is on {ref.device}")


def check_skip_fuse(op, x, skip, norm_weight, norm_bias, weight, bias, eps):
    """Returns (M, D, D_out)."""
    for name, t in (("x", x), ("skip", skip), ("norm_weight", norm_weight), ("norm_bias", norm_bias),
                    ("weight", weight)) + ((("bias", bias),) if bias is not None else ()):
        _tensor(op, name, t)
    if isinstance(eps, (str, bytes, bool)) or eps is None:
        raise TypeError(f"{op}: eps must be a float, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{op}: eps must be finite and >= 0, got {eps}")
    _float(op, "x", x)
    _last_contig(op, "x", x)
    _last_contig(op, "skip", skip)
    _nonempty(op, "x", x)
    if skip.shape != x.shape:
        raise ValueError(f"{op}: skip must have the shape of x {list(x.shape)}, got {list(skip.shape)}")
    if skip.dtype != x.dtype:
        raise TypeError(f"{op}: skip dtype {skip.dtype} differs from x dtype {x.dtype}")
    D = x.shape[-1]
    for name, p in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if p.dim() != 1 or p.shape[0] != 2 * D:
            raise ValueError(f"{op}: {name} must have shape [2*D] = [{2 * D}], got {list(p.shape)}")
        if p.dtype not in (x.dtype, torch.float32):
            raise TypeError(f"{op}: norm parameters must be float32 or the dtype of x ({x.dtype}), got {p.dtype}")
    if norm_weight.dtype != norm_bias.dtype:
        raise TypeError(f"{op}: norm_weight and norm_bias must share a dtype, got "
                        f"{norm_weight.dtype} and {norm_bias.dtype}")
    if weight.dim() != 2 or weight.shape[1] != 2 * D:
        raise ValueError(f"{op}: weight must have shape [D_out, 2*D] = [D_out, {2 * D}], got {list(weight.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"{op}: weight dtype {weight.dtype} differs from x dtype {x.dtype}")
    _nonempty(op, "weight", weight)
    _last_contig(op, "weight", weight)
    for name, t in (("skip", skip), ("norm_weight", norm_weight), ("norm_bias", norm_bias), ("weight", weight)):
        _same_device(op, x, name, t)
    D_out = weight.shape[0]
    if bias is not None:
        if bias.dim() != 1 or bias.shape[0] != D_out:
            raise ValueError(f"{op}: bias must have shape [D_out] = [{D_out}], got {list(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"{op}: bias dtype {bias.dtype} differs from weight dtype {weight.dtype}")
        _same_device(op, x, "bias", bias)
    return x.numel() // D, D, D_out


def _like(op, name, t, shape, dtype, ref):
    """t must have `shape` and `dtype` and live on ref's device."""
    _tensor(op, name, t)
    _same_device(op, ref, name, t)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {list(shape)}, got {list(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{op}: {name} must be {dtype}, got {t.dtype}")


def check_skip_fuse_backward(op, grad_out, x, skip, norm_weight, norm_bias, weight, bias, eps):
    """check_skip_fuse plus grad_out [..., D_out] in x's dtype (any strides: autograd
    may hand in an expanded gradient); returns (M, D, D_out)."""
    M, D, D_out = check_skip_fuse(op, x, skip, norm_weight, norm_bias, weight, bias, eps)
    _like(op, "grad_out", grad_out, (*x.shape[:-1], D_out), x.dtype, x)
    return M, D, D_out


def check_attention(op, q, k, v, scale):
    """Returns the softmax scale to use."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _tensor(op, name, t)
    _float(op, "q", q)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be 4-D [B, N, H, Dh] (BSHD), got shape {list(t.shape)}")
        _last_contig(op, name, t)
        _nonempty(op, name, t)
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: {name} dtype {t.dtype} differs from q dtype {q.dtype}")
        _same_device(op, q, name, t)
    if k.shape != v.shape:
        raise ValueError(f"{op}: k and v must have one shape, got {list(k.shape)} and {list(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"{op}: q {list(q.shape)} and k {list(k.shape)} must agree in batch, heads and head dim")
    dh = q.shape[3]
    if dh % 8 != 0 or dh > 256:
        raise ValueError(f"{op}: head dim must be a multiple of 8 up to 256, got {dh}")
    if scale is None:  # always finite; may be symbolic under torch.compile
        return dh ** -0.5
    if isinstance(scale, (str, bytes, bool)):   # float() would take "0.3" and True
        raise TypeError(f"{op}: scale must be a float or None, got {type(scale).__name__}")
    s = float(scale)
    if not math.isfinite(s):
        raise ValueError(f"{op}: scale must be finite, got {s}")
    return s


def check_attention_backward(op, grad_out, q, k, v, out, lse, scale):
    """check_attention plus grad_out and out shaped like q in q's dtype and lse
    [B, H, Nq] in the accumulation dtype (any strides); returns the softmax scale."""
    s = check_attention(op, q, k, v, scale)
    for name, t in (("grad_out", grad_out), ("out", out)):
        _like(op, name, t, q.shape, q.dtype, q)
    B, Nq, H, _ = q.shape
    _like(op, "lse", lse, (B, H, Nq), acc_dtype(q.dtype), q)
    return s


def check_cache_delta(op, a, b):
    # Reads like check_skip_fuse's x / skip checks on purpose: each check function
    # states its op's checks in the order and words of its C++ twin in csrc/ops.cpp
    # (the same bad input gets the same message from every backend).
    _tensor(op, "a", a)
    _tensor(op, "b", b)
    _float(op, "a", a)
    _last_contig(op, "a", a)
    _last_contig(op, "b", b)
    _nonempty(op, "a", a)
    if a.shape != b.shape:
        raise ValueError(f"{op}: a and b must have one shape, got {list(a.shape)} and {list(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"{op}: a dtype {a.dtype} differs from b dtype {b.dtype}")
    _same_device(op, a, "b", b)
