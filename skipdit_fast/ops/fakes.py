"""Fake (meta) kernels of the skipdit ops, for torch.compile and torch.export.

They run the same argument checks as the real kernels and describe each output's
shape, dtype and layout exactly (outputs are contiguous). The native ops and their
*_triton twins share one schema each, so one fake serves both names."""

from __future__ import annotations

import torch

from .checks import (acc_dtype, check_attention, check_attention_backward, check_cache_delta, check_skip_fuse,
                     check_skip_fuse_backward)


def skip_fuse_fake(x, skip, norm_weight, norm_bias, weight, bias=None, eps=1e-6):
    check_skip_fuse("skipdit::skip_fuse", x, skip, norm_weight, norm_bias, weight, bias, eps)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def skip_fuse_backward_fake(grad_out, x, skip, norm_weight, norm_bias, weight, bias, eps):
    check_skip_fuse_backward("skipdit::skip_fuse_backward", grad_out, x, skip, norm_weight, norm_bias, weight, bias,
                             eps)
    grad_bias = torch.empty_like(bias, memory_format=torch.contiguous_format) if bias is not None \
        else weight.new_empty((0,))
    return (x.new_empty(x.shape), x.new_empty(x.shape),
            torch.empty_like(norm_weight, memory_format=torch.contiguous_format),
            torch.empty_like(norm_bias, memory_format=torch.contiguous_format),
            torch.empty_like(weight, memory_format=torch.contiguous_format), grad_bias)


def attention_forward_fake(q, k, v, scale):
    check_attention("skipdit::attention_forward", q, k, v, scale)
    B, Nq, H, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, Nq), dtype=acc_dtype(q.dtype))


def attention_backward_fake(grad_out, q, k, v, out, lse, scale):
    check_attention_backward("skipdit::attention_backward", grad_out, q, k, v, out, lse, scale)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def cache_delta_fake(a, b):
    check_cache_delta("skipdit::cache_delta", a, b)
    return a.new_empty((), dtype=torch.float64 if a.dtype == torch.float64 else torch.float32)


def register(opdefs) -> None:
    """Registers each op's fakes for it and its *_triton twin (idempotent)."""
    global _registered
    if _registered:
        return
    for d in opdefs:
        for name, fn in d.fakes.items():
            for op in (name, f"{name}_triton"):
                torch.library.register_fake(f"skipdit::{op}", fn)
    _registered = True


_registered = False
