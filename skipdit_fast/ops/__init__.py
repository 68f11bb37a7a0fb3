"""The op layer: skipdit_fast.ops.skip_fuse / attention / cache_delta, the bottom of
the package. It imports nothing of skipdit_fast above it (models, cache, ...); the
Triton kernels (skipdit_fast.kernels) import only its checks.

    checks       argument checks and output allocation (imports nothing of ours)
    reference    the pure-PyTorch definition of every op (fp64 truth in tests)
    fakes        fake kernels for torch.compile / torch.export
    native       loading of the native library skipdit_fast/_C.so (schemas, C++/CUDA kernels)
    triton_ops   registration of the Triton kernels and their autograd
    defs         one declaration per op, read by the registrations and the registry
    decisions    the decisions of `auto` and their cache file
    autotune     `auto` measured: candidates checked against the reference and timed
    backends     the backend registry and choice (use_backend, set_backend, auto)
    tuning       skipdit_fast.tune(model, example_inputs): measure a model's shapes up front
    testing      NaN-poisoning of outputs, the gpu test marker

Importing this package loads the native library and registers the torch.ops.skipdit.*
fakes and Triton kernels. Each function picks a backend for its inputs and calls it;
the native and Triton backends are custom ops with fake kernels and autograd, so the
functions work under torch.compile(fullgraph=True) and autograd. Contracts: DESIGN.md
section 2.
"""

from __future__ import annotations

import torch

from . import autocast as _autocast
from . import defs, fakes, native, triton_ops
from .backends import BackendError, get_backend, pick, set_backend, use_backend

native._load()
if native.available():
    fakes.register(defs.OPS.values())
    triton_ops.register(defs.OPS.values())

__all__ = ["BackendError", "attention", "cache_delta", "get_backend", "set_backend", "skip_fuse", "use_backend"]


def _needs_grad(*tensors) -> bool:
    # a non-tensor argument is no gradient here: the chosen backend's checks name it
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _check_tensors(op: str, names: tuple[str, ...], *tensors) -> None:
    """TypeError naming the argument that is not a tensor (None included: these are
    required), before autocast or backend selection reads it; the dispatcher's own
    message for a native op is a RuntimeError."""
    for name, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")


def _size(op: str, name: str, t, dim: int) -> int:
    """t.shape[dim] for backend selection, or the error a user should see (the checks
    of the chosen backend see everything else)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() == 0:
        raise ValueError(f"{op}: {name} must have at least one dimension, got a 0-d tensor")
    return t.shape[dim]


def skip_fuse(x: torch.Tensor, skip: torch.Tensor, norm_weight: torch.Tensor,
              norm_bias: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
              eps: float = 1e-6) -> torch.Tensor:
    """Long-skip merge: linear(layer_norm(cat([x, skip], -1)), weight, bias).

    x is the deep (current) hidden state, skip the saved shallow one, both [..., D]
    with a contiguous last dim; norm_weight/norm_bias [2D] (fp32 or x's dtype);
    weight [D_out, 2D]; bias [D_out] or None. Returns [..., D_out]. Under an enabled
    torch.autocast it runs as the composition does there (ops/autocast.py).
    """
    _check_tensors("skip_fuse", ("x", "skip", "norm_weight", "norm_bias", "weight"), x, skip, norm_weight, norm_bias,
                   weight)
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"skip_fuse: bias must be a torch.Tensor or None, got {type(bias).__name__}")
    dtype = _autocast.target(x)
    if dtype is not None:
        with _autocast.disabled(x):
            return skip_fuse(*_autocast.skip_fuse_args(dtype, x, skip, norm_weight, norm_bias, weight, bias, eps))
    D = _size("skip_fuse", "x", x, -1)
    args = (x, skip, norm_weight, norm_bias, weight, bias, eps)
    impl = pick("skip_fuse", x.device, x.dtype, _needs_grad(x, skip, norm_weight, norm_bias, weight, bias),
                (D, _size("skip_fuse", "weight", weight, 0)), sizes=(x.numel() // D if D else 0,), args=args)
    return impl.fn(*args)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              scale: float | None = None) -> torch.Tensor:
    """Non-causal multi-head attention, BSHD layout: q [B, Nq, H, Dh], k and v
    [B, Nk, H, Dh] (strided views of a fused qkv tensor are fine). Returns a
    contiguous [B, Nq, H, Dh]. scale defaults to Dh**-0.5. Under an enabled
    torch.autocast it runs in the autocast dtype, as SDPA does there."""
    _check_tensors("attention", ("q", "k", "v"), q, k, v)
    dtype = _autocast.target(q)
    if dtype is not None:
        with _autocast.disabled(q):
            return attention(*_autocast.attention_args(dtype, q, k, v, scale))
    features = (_size("attention", "q", q, -1),)
    _size("attention", "k", k, 0)
    sizes = (q.shape[0] * q.shape[2], q.shape[1], k.shape[1]) if q.dim() == 4 and k.dim() == 4 else ()
    return pick("attention", q.device, q.dtype, _needs_grad(q, k, v), features, sizes=sizes,
                args=(q, k, v, scale)).fn(q, k, v, scale)


def cache_delta(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum|a - b| / sum|b| as a 0-d fp32 tensor on a's device (fp64 for fp64 inputs),
    computed in one pass with no host synchronization."""
    _check_tensors("cache_delta", ("a", "b"), a, b)
    _size("cache_delta", "a", a, -1)
    return pick("cache_delta", a.device, a.dtype, _needs_grad(a, b), sizes=(a.numel(),), args=(a, b)).fn(a, b)
