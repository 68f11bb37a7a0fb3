"""Pure-PyTorch references of the skipdit ops: the definitions every kernel is
tested against (in fp64 as truth, and in the kernel's dtype for its error budget),
and the `reference` backend. DESIGN.md section 2 is the contract."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import acc_dtype, check_attention, check_cache_delta, check_skip_fuse


def skip_fuse(x, skip, norm_weight, norm_bias, weight, bias=None, eps: float = 1e-6):
    """y = linear(layer_norm(cat([x, skip], -1)), weight, bias), the normalization in
    the accumulation dtype, its result rounded to x.dtype before the linear."""
    check_skip_fuse("skip_fuse[reference]", x, skip, norm_weight, norm_bias, weight, bias, eps)
    acc = acc_dtype(x.dtype)
    z = torch.cat([x, skip], dim=-1).to(acc)
    h = F.layer_norm(z, (z.shape[-1],), norm_weight.to(acc), norm_bias.to(acc), eps).to(x.dtype)
    return F.linear(h, weight, bias)


def attention(q, k, v, scale: float | None = None):
    """Non-causal attention over BSHD tensors: scores and softmax in the
    accumulation dtype, probabilities rounded to the input dtype before @ v."""
    s = check_attention("attention[reference]", q, k, v, scale)
    acc = acc_dtype(q.dtype)
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # BHSD views
    scores = torch.matmul(qh, kh.transpose(-1, -2)).to(acc) * s
    p = torch.softmax(scores, dim=-1).to(q.dtype)
    return torch.matmul(p, vh).transpose(1, 2).contiguous()


def attention_lse(q, k, v, scale: float | None = None):
    """Row log-sum-exp of the scaled scores, [B, H, Nq], in the accumulation dtype."""
    s = check_attention("attention[reference]", q, k, v, scale)
    acc = acc_dtype(q.dtype)
    scores = torch.matmul(q.transpose(1, 2), k.transpose(1, 2).transpose(-1, -2)).to(acc) * s
    return torch.logsumexp(scores, dim=-1)


def cache_delta(a, b):
    """sum|a - b| / sum|b|, a 0-d fp32 tensor (fp64 for fp64 inputs)."""
    check_cache_delta("cache_delta[reference]", a, b)
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    a, b = a.to(acc), b.to(acc)
    return (a - b).abs().sum() / b.abs().sum()
