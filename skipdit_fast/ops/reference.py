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


class _Scores(torch.autograd.Function):
    """q @ k^T of 16-bit BHSD tensors with the products summed and kept in fp32, so that
    scores never overflow where the truth is finite; the backward rounds the score
    gradient to the input dtype before its two matmuls, as autograd through a 16-bit
    matmul would."""

    @staticmethod
    def forward(ctx, q, k):
        ctx.save_for_backward(q, k)
        return torch.matmul(q.float(), k.float().transpose(-1, -2))

    @staticmethod
    def backward(ctx, grad):
        q, k = ctx.saved_tensors
        g = grad.to(q.dtype)
        return torch.matmul(g, k), torch.matmul(g.transpose(-1, -2), q)


def _scores(q, k):
    """q @ k^T (BHSD) in the accumulation dtype."""
    if acc_dtype(q.dtype) == q.dtype:  # fp32 / fp64: plain, differentiable to any order
        return torch.matmul(q, k.transpose(-1, -2))
    return _Scores.apply(q, k)


def attention(q, k, v, scale: float | None = None):
    """Non-causal attention over BSHD tensors: scores and softmax in the
    accumulation dtype, probabilities rounded to the input dtype before @ v."""
    s = check_attention("attention[reference]", q, k, v, scale)
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # BHSD views
    scores = _scores(qh, kh) * s
    p = torch.softmax(scores, dim=-1).to(q.dtype)
    return torch.matmul(p, vh).transpose(1, 2).contiguous()


def attention_lse(q, k, v, scale: float | None = None):
    """Row log-sum-exp of the scaled scores, [B, H, Nq], in the accumulation dtype."""
    s = check_attention("attention[reference]", q, k, v, scale)
    scores = _scores(q.transpose(1, 2), k.transpose(1, 2)) * s
    return torch.logsumexp(scores, dim=-1)


def cache_delta(a, b):
    """sum|a - b| / sum|b|, a 0-d fp32 tensor (fp64 for fp64 inputs)."""
    check_cache_delta("cache_delta[reference]", a, b)
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    a, b = a.to(acc), b.to(acc)
    return (a - b).abs().sum() / b.abs().sum()
