"""Pure-PyTorch definitions of the skipdit ops, DESIGN.md section 2 being the contract:

- the references every kernel is tested against (in fp64 as truth, and in the
  kernel's dtype for its error budget): the `reference` backend;
- the `torch` backend: what a model without this package runs, a candidate of `auto`
  on every device. For skip_fuse and cache_delta that is the reference itself (cat +
  fp32 LayerNorm + linear as the official code does it; the plain reduction), so
  the torch backend calls those functions; for attention it is PyTorch's SDPA on the
  BSHD views (`sdpa_attention`), with PyTorch's own choice of SDPA kernel;
- the sub-problems the autotuner checks candidates on (`*_subproblem`): the ops are
  independent per row (skip_fuse) and per batch entry, head and query (attention), so
  the reference of a slice of the inputs is that slice of the full output.
"""

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


def sdpa_bshd(q, k, v, scale: float | None):
    """F.scaled_dot_product_attention on BSHD tensors (transposed views, no copy),
    the output made contiguous BSHD. No argument checks: the benchmark's SDPA rows."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return o.transpose(1, 2).contiguous()


def sdpa_attention(q, k, v, scale: float | None = None):
    """The `torch` backend of attention: PyTorch's SDPA (its own kernel choice).

    NaN: a NaN in q does not always propagate here. PyTorch's CPU SDPA kernel (torch
    2.x, fp32) returns a finite output row for a query row holding a NaN, where the
    fp64 reference (`reference` backend) and our `cpu` kernel return a NaN row
    (tests/fuzz_cases.py probes it; a NaN in k or v propagates in all three). That is
    PyTorch's behaviour, which this backend exists to reproduce."""
    return sdpa_bshd(q, k, v, check_attention("attention[torch]", q, k, v, scale))


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


# ---------------------------------------------------------------------------------------
# sub-problems for checking a candidate: (inputs of a slice, the same slice of a full
# output). Bounded so that an fp64 reference of the slice stays small on any device.

_CHECK_ROWS = 1024               # skip_fuse rows checked: half from the start, half from the end
_CHECK_SCORES = 1 << 24          # attention: scores (B x H x Nq x Nk) of the checked slice


def _ends(n: int, keep: int) -> list[int] | None:
    """Indices of the first and last keep // 2 of n (None: all of them)."""
    return None if n <= keep else list(range(keep // 2)) + list(range(n - keep + keep // 2, n))


def skip_fuse_subproblem(args):
    x, skip, nw, nb, w, b, eps = args
    D, D_out = x.shape[-1], w.shape[0]
    idx = _ends(x.numel() // D, _CHECK_ROWS)
    if idx is None:
        return args, lambda out: out
    sel = torch.tensor(idx, device=x.device)

    def rows(t, d):
        return t.reshape(-1, d).index_select(0, sel)

    return (rows(x, D), rows(skip, D), nw, nb, w, b, eps), lambda out: rows(out, D_out)


def attention_subproblem(args):
    q, k, v, scale = args
    B, Nq, H, _ = q.shape
    Nk = k.shape[1]
    b = min(B, 2)
    h = max(1, min(H, _CHECK_SCORES // (b * Nq * Nk)))
    nq = max(1, min(Nq, _CHECK_SCORES // (b * h * Nk)))
    if (b, h, nq) == (B, H, Nq):
        return args, lambda out: out

    def cut(t, n):  # batch entries 0 and B-1, the first h heads, the first n positions
        t = t if B <= 2 else torch.cat([t[:1], t[-1:]])
        return t[:, :n, :h]

    return (cut(q, nq), cut(k, Nk), cut(v, Nk), scale), lambda out: cut(out, nq)


def cache_delta_subproblem(args):
    return args, lambda out: out  # one sum over every element: checked whole
