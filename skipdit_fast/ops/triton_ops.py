"""Registers the Triton kernels (skipdit_fast.kernels) as the implementations of the
torch.ops.skipdit.*_triton ops, whose schemas csrc/ops.cpp defines, and their autograd.

What is registered comes from the op declarations (defs.OPS): each forward/backward op
`<op>_triton` gets the launcher `<op>` of the op's Triton module. Registration is
cheap: triton and the kernel modules are imported on the first call. The ops get a
CUDA kernel; when TRITON_INTERPRET=1 (tests without a GPU) they also get a CPU kernel
that runs the same Triton code in Triton's interpreter.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import re

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_version() -> str | None:
    """The installed triton's version, read without importing it; None without triton."""
    if importlib.util.find_spec("triton") is None:
        return None
    for dist in ("triton", "pytorch-triton"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    import triton

    return triton.__version__


def triton_missing_reason() -> str | None:
    """Why the Triton kernels cannot run with this installation, or None."""
    from ..kernels.limits import MIN_TRITON, MIN_TRITON_INTERPRETER

    v = triton_version()
    if v is None:
        return "triton is not installed"
    have = tuple(int(p) for p in re.findall(r"\d+", v)[:2])
    floor, what = (MIN_TRITON_INTERPRETER, "the kernels in Triton's interpreter (TRITON_INTERPRET=1)") \
        if interpreting() else (MIN_TRITON, "the kernels")
    if have < floor:
        return (f"triton {v} is older than {'.'.join(map(str, floor))}, the oldest {what} support "
                "(a newer torch brings a newer triton)")
    return None


def _lazy(module: str, name: str):
    cache = {}

    def impl(*args):
        f = cache.get("f")
        if f is None:
            f = cache["f"] = getattr(importlib.import_module(module), name)
        return f(*args)

    impl.__name__ = f"{name}_triton"
    return impl


# --- autograd of the Triton ops (defs.OpDef.triton_autograd) -----------------------

def skip_fuse_setup(ctx, inputs, output):
    x, skip, nw, nb, w, bias, eps = inputs
    ctx.save_for_backward(x, skip, nw, nb, w, bias)
    ctx.eps = eps


def skip_fuse_backward(ctx, grad):
    x, skip, nw, nb, w, bias = ctx.saved_tensors
    dx, dskip, dnw, dnb, dw, db = torch.ops.skipdit.skip_fuse_backward_triton(
        grad, x, skip, nw, nb, w, bias, ctx.eps)
    return dx, dskip, dnw, dnb, dw, (db if bias is not None else None), None


def attention_setup(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def attention_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.skipdit.attention_backward_triton(grad_out, q, k, v, out, lse, ctx.scale)
    return dq, dk, dv, None


def cache_delta_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def cache_delta_backward(ctx, grad):
    # r = A / S: dr/da = sign(a - b) / S; dr/db = -sign(a - b) / S - A / S^2 sign(b)
    a, b = ctx.saved_tensors
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    af, bf = a.to(acc), b.to(acc)
    S = bf.abs().sum()
    A = (af - bf).abs().sum()
    g = grad.to(acc)
    da = (af - bf).sign() * (g / S)
    db = -da - bf.sign() * (g * A / (S * S))
    return da.to(a.dtype), db.to(b.dtype)


def _attention_composite(q, k, v, scale=None):
    s = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.ops.skipdit.attention_forward_triton(q, k, v, s)[0]


_lib: torch.library.Library | None = None
# native ops whose CUDA kernel is a Triton kernel registered here
ROUTED_TO_TRITON: set[str] = set()


def register(opdefs) -> None:
    """Attach each declared op's Triton launchers to its *_triton ops (idempotent)."""
    global _lib
    if _lib is not None or triton_missing_reason() is not None:
        return
    _lib = torch.library.Library("skipdit", "IMPL")
    keys = ["CUDA"] + (["CPU"] if interpreting() else [])
    for d in opdefs:
        for name in d.kernel_ops():
            for key in keys:
                _lib.impl(f"{name}_triton", _lazy(d.triton_module, name), key)
        backward, setup = d.triton_autograd
        torch.library.register_autograd(f"skipdit::{d.forward}_triton", backward, setup_context=setup)
    _lib.impl("attention_triton", _attention_composite, "CompositeImplicitAutograd")
    # The CUDA backend's attention backward is the Triton kernel (issue 4 allows it):
    # it becomes the CUDA kernel of the native attention_backward op, which the C++
    # autograd of attention_forward calls, unless the native library brings its own.
    if not torch._C._dispatch_has_kernel_for_dispatch_key("skipdit::attention_backward", "CUDA"):
        _lib.impl("attention_backward", _lazy("skipdit_fast.kernels.attention", "attention_backward"), "CUDA")
        ROUTED_TO_TRITON.add("attention_backward")
