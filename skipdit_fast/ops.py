"""The public op functions: skipdit_fast.ops.skip_fuse / attention / cache_delta.

Each picks a backend for its inputs (skipdit_fast.backends) and calls it. The native
and Triton backends are torch.ops.skipdit.* custom ops (schema, fake kernel,
autograd), so the functions work under torch.compile(fullgraph=True) and autograd.
Contracts: DESIGN.md section 2.
"""

from __future__ import annotations

import torch

from .backends import pick


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def skip_fuse(x: torch.Tensor, skip: torch.Tensor, norm_weight: torch.Tensor,
              norm_bias: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
              eps: float = 1e-6) -> torch.Tensor:
    """Long-skip merge: linear(layer_norm(cat([x, skip], -1)), weight, bias).

    x is the deep (current) hidden state, skip the saved shallow one, both [..., D]
    with a contiguous last dim; norm_weight/norm_bias [2D] (fp32 or x's dtype);
    weight [D_out, 2D]; bias [D_out] or None. Returns [..., D_out].
    """
    impl = pick("skip_fuse", x.device, x.dtype, _needs_grad(x, skip, norm_weight, norm_bias, weight, bias),
                (x.shape[-1], weight.shape[0]))
    return impl.fn(x, skip, norm_weight, norm_bias, weight, bias, eps)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              scale: float | None = None) -> torch.Tensor:
    """Non-causal multi-head attention, BSHD layout: q [B, Nq, H, Dh], k and v
    [B, Nk, H, Dh] (strided views of a fused qkv tensor are fine). Returns a
    contiguous [B, Nq, H, Dh]. scale defaults to Dh**-0.5."""
    return pick("attention", q.device, q.dtype, _needs_grad(q, k, v), (q.shape[-1],)).fn(q, k, v, scale)


def cache_delta(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum|a - b| / sum|b| as a 0-d fp32 tensor on a's device (fp64 for fp64 inputs),
    computed in one pass with no host synchronization."""
    return pick("cache_delta", a.device, a.dtype, _needs_grad(a, b)).fn(a, b)
