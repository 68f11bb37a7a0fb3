"""The ops under torch.autocast: what the PyTorch composition each op replaces does
there, so that a model computes the same with and without skipdit_fast.patch()
inside an enabled autocast region (CPU or CUDA).

    skip_fuse    cat + LayerNorm + linear: the linear runs in the autocast dtype, the
                 LayerNorm in fp32 (autocast's fp32 list on CUDA; our kernels
                 normalize 16-bit inputs in fp32 on every device). x and skip (which
                 autocast leaves in mixed dtypes: a residual stream in fp32, a block
                 output in bf16) are cast to the autocast dtype, the weight and bias
                 too; the norm parameters stay fp32.
    attention    SDPA, which autocast runs in its dtype: q, k, v cast to it.
    cache_delta  a reduction autocast leaves in fp32: nothing to change.

Tensors autocast does not cast (fp64) keep their dtype, and the op runs as without
autocast. The op itself then runs with autocast disabled, so that the reference
backend's fp32 matmuls (attention scores) are not cast down again. The functions
here are plain Python on tensor attributes and autocast state, which torch.compile
traces (the casts become graph nodes)."""

from __future__ import annotations

import contextlib

import torch

_CASTABLE = (torch.float16, torch.bfloat16, torch.float32)
_ANY = getattr(torch._C, "_is_any_autocast_enabled", None)  # whether autocast is on for any device


def target(t) -> torch.dtype | None:
    """The dtype autocast runs a linear / SDPA on tensor t in, or None: autocast off
    for t's device type, or t of a dtype autocast leaves alone (fp64, integers)."""
    if _ANY is not None and not torch.compiler.is_compiling() and not _ANY():
        return None  # the per-call cost of the common case: ~0.2 us (the full check ~2 us)
    if not isinstance(t, torch.Tensor) or t.dtype not in _CASTABLE or t.device.type not in ("cpu", "cuda"):
        return None
    kind = t.device.type
    if not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


def disabled(t: torch.Tensor):
    """A context in which autocast is off for t's device type."""
    return torch.autocast(t.device.type, enabled=False) if t.device.type in ("cpu", "cuda") \
        else contextlib.nullcontext()


def _cast(t, dtype):
    return t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in _CASTABLE and t.dtype != dtype else t


def skip_fuse_args(dtype, x, skip, norm_weight, norm_bias, weight, bias, eps):
    def norm(p):  # fp32 stays fp32 (the op's LayerNorm parameters may be fp32 for any x)
        return p if not isinstance(p, torch.Tensor) or p.dtype == torch.float32 else _cast(p, torch.float32)

    return (_cast(x, dtype), _cast(skip, dtype), norm(norm_weight), norm(norm_bias), _cast(weight, dtype),
            _cast(bias, dtype), eps)


def attention_args(dtype, q, k, v, scale):
    return _cast(q, dtype), _cast(k, dtype), _cast(v, dtype), scale
