"""Shared test utilities: DESIGN.md section 4 input families and error budget."""

from __future__ import annotations

import torch

from skipdit_fast.ops import triton_ops

# DESIGN.md section 4: every op test draws fresh inputs from these families.
FAMILIES = ("normal", "offset10", "offset1000", "outlier")


def rows(shape, family: str, dtype=torch.float32, device="cpu", scale: float = 1.0) -> torch.Tensor:
    """Random activations of `shape` (last dim = channels) from one input family:
    normal: N(0, 1); offset10 / offset1000: each row shifted by 10 / 1000 std;
    outlier: one channel (fixed per tensor) at 500 std. Drawn in fp64, then cast."""
    t = torch.randn(shape, dtype=torch.float64) * scale
    if family == "offset10":
        t += 10 * scale * (1 + 0.1 * torch.randn(*shape[:-1], 1, dtype=torch.float64))
    elif family == "offset1000":
        t += 1000 * scale * (1 + 0.1 * torch.randn(*shape[:-1], 1, dtype=torch.float64))
    elif family == "outlier":
        c = int(torch.randint(0, shape[-1], ()).item())
        t[..., c] = 500 * scale * torch.sign(torch.randn(shape[:-1], dtype=torch.float64))
    elif family != "normal":
        raise ValueError(family)
    return t.to(dtype=dtype, device=device)


def strided_like(t: torch.Tensor, pad: int = 24) -> torch.Tensor:
    """The same values as t, as a view whose leading stride is padded (last dim
    contiguous, leading dims not), e.g. a slice of a fused projection output."""
    D = t.shape[-1]
    big = torch.full((*t.shape[:-1], D + pad), float("nan"), dtype=t.dtype, device=t.device)
    big[..., :D] = t
    return big[..., :D]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max abs difference relative to the largest magnitude of `want` (in fp64)."""
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


def assert_grads_match(model, ref, rtol=1e-4):
    """Parameter gradients of the patched model against the unpatched one's: relative
    to each gradient, with a floor at 1e-7 of the largest gradient (some are exactly
    zero in theory, e.g. the bias of a per-head k norm: softmax ignores it)."""
    grads = dict(ref.named_parameters())
    scale = max(p.grad.abs().max().item() for p in ref.parameters() if p.grad is not None)
    for name, p in model.named_parameters():
        g = grads[name].grad
        if g is None:
            assert p.grad is None, name
            continue
        err = (p.grad.double() - g.double()).abs().max().item()
        assert err <= rtol * g.abs().max().item() + 1e-7 * scale, (name, err)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_budget(out: torch.Tensor, ref_lowp: torch.Tensor, truth: torch.Tensor, *,
                  atol: float, factor: float = 2.0, what: str = "") -> None:
    """The flash-attn rule (DESIGN.md section 4): the kernel's error against fp64
    truth is at most `factor` x the error of the reference run in the same dtype,
    plus atol. NaN anywhere fails."""
    assert out.shape == truth.shape, f"{what}: shape {tuple(out.shape)} != {tuple(truth.shape)}"
    assert not torch.isnan(out).any(), f"{what}: NaN in output (unwritten elements?)"
    err = max_err(out, truth)
    ref_err = max_err(ref_lowp, truth)
    assert err <= factor * ref_err + atol, (
        f"{what}: max error {err:.3e} > {factor} x reference error {ref_err:.3e} + atol {atol:.1e}")


def interpreter_dot_ok(dtype: torch.dtype) -> bool:
    """Triton 3.8's interpreter computes tl.dot wrongly on bf16 (DESIGN.md 5.4)."""
    return not (triton_ops.interpreting() and dtype == torch.bfloat16)


def attention_pt(q, k, v, scale=None):
    """PyTorch's own low-precision attention, the error-budget baseline (flash-attn's
    reference with upcast=False): q @ k^T in the input dtype (rounded there), softmax
    in fp32, probabilities rounded, @ v. The `reference` backend keeps the scores in
    fp32 (its contract: no overflow), which is more accurate than what a user of the
    16-bit PyTorch ops gets, so it is the truth's neighbour, not the baseline."""
    s = q.shape[-1] ** -0.5 if scale is None else scale
    acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    scores = torch.matmul(qh, kh.transpose(-1, -2)).to(acc) * s
    p = torch.softmax(scores, dim=-1).to(q.dtype)
    return torch.matmul(p, vh).transpose(1, 2).contiguous()


def attention_lse_pt(q, k, v, scale=None):
    """The log-sum-exp of attention_pt's scores, [B, H, Nq]."""
    s = q.shape[-1] ** -0.5 if scale is None else scale
    acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    scores = torch.matmul(q.transpose(1, 2), k.transpose(1, 2).transpose(-1, -2)).to(acc) * s
    return torch.logsumexp(scores, dim=-1)
