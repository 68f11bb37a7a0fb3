"""Backend registry and selection.

Every op has up to four implementations:

    reference  pure PyTorch (skipdit_fast.reference), any device
    cpu        C++ kernels of the native library, CPU tensors
    cuda       CUDA C++ kernels of the native library, CUDA tensors
    triton     Triton kernels (skipdit_fast.kernels), CUDA tensors (CPU tensors only in
               Triton's interpreter, TRITON_INTERPRET=1, when asked for explicitly)

A backend is chosen per op with `use_backend(...)` (context manager), `set_backend(...)`
or the environment variable SKIPDIT_FAST_BACKEND (read at import), e.g.
`SKIPDIT_FAST_BACKEND=triton` or `SKIPDIT_FAST_BACKEND=attention=cuda,skip_fuse=triton`.
The default, `auto`, takes the first backend in the device's priority list that can
serve the inputs. A backend that was asked for explicitly and cannot serve the inputs
raises BackendError with the reason; it never falls back silently.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from . import _lib, _triton_ops, reference

BACKENDS = ("reference", "cpu", "cuda", "triton")
OPS = ("skip_fuse", "attention", "cache_delta")
_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# auto: the order in which backends are tried, per op and device type.
AUTO_PRIORITY: dict[tuple[str, str], tuple[str, ...]] = {
    ("skip_fuse", "cpu"): ("cpu", "reference"),
    ("skip_fuse", "cuda"): ("cuda", "triton", "reference"),
    ("attention", "cpu"): ("cpu", "reference"),
    ("attention", "cuda"): ("cuda", "triton", "reference"),
    ("cache_delta", "cpu"): ("cpu", "reference"),
    ("cache_delta", "cuda"): ("cuda", "triton", "reference"),
}


# public op -> the torch.ops.skipdit op called by the native backends, the op whose
# device kernel does the forward work, and the backward op (None: ATen formula).
PUBLIC_OP = {"skip_fuse": "skip_fuse", "attention": "attention", "cache_delta": "cache_delta"}
FORWARD_OP = {"skip_fuse": "skip_fuse", "attention": "attention_forward", "cache_delta": "cache_delta"}
BACKWARD_OP = {"skip_fuse": "skip_fuse_backward", "attention": "attention_backward", "cache_delta": None}


class BackendError(RuntimeError):
    """No backend (or not the requested one) can run an op on the given inputs."""


@dataclass(frozen=True)
class Query:
    """What backend selection looks at; hashable, so decisions are cached."""

    op: str
    device: torch.device
    dtype: torch.dtype
    needs_grad: bool
    features: tuple = ()  # per-op shape facts, see FEATURES


@dataclass
class Impl:
    op: str
    backend: str
    fn: Callable  # forward entry point; differentiable when `backward` is True
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    backward: bool = True
    min_cc: tuple[int, int] | None = None
    # extra per-input check: Query -> reason or None
    check: Callable[[Query], str | None] | None = None
    # machine-level availability: () -> reason or None
    available: Callable[[], str | None] = field(default=lambda: None)

    def reasons(self, q: Query) -> list[str]:
        why = self.available()
        if why:
            return [why]
        out = []
        dev = q.device.type
        if dev not in self.devices:
            out.append(f"device {dev} not supported (supports {', '.join(self.devices)})")
        if q.dtype not in self.dtypes:
            out.append(f"dtype {q.dtype} not supported")
        if q.needs_grad and not self.backward:
            out.append("backward not implemented")
        if self.min_cc and dev == "cuda":
            cc = torch.cuda.get_device_capability(q.device)
            if cc < self.min_cc:
                out.append(f"needs compute capability >= {self.min_cc[0]}.{self.min_cc[1]}, device has {cc[0]}.{cc[1]}")
        if not out and self.check is not None:
            why = self.check(q)
            if why:
                out.append(why)
        return out


# ---------------------------------------------------------------------------
# availability of each backend on this machine

def _native(op: str, key: str) -> Callable[[], str | None]:
    def avail() -> str | None:
        if not _lib.available():
            return f"native library not loaded: {_lib.load_error()}"
        if not _lib.has_kernel(op, key):
            if key == "CUDA" and not _lib.build_info().get("cuda"):
                return "native library built without CUDA"
            return f"no {key} kernel for skipdit::{op} in the native library (not written yet)"
        return None

    return avail


def _native_backward_check(op: str, key: str) -> Callable[[Query], str | None]:
    def check(q: Query) -> str | None:
        if q.needs_grad and not _lib.has_kernel(op, key):
            return f"no {key} kernel for skipdit::{op} (backward not written yet)"
        return None

    return check


def _triton_available(op: str) -> Callable[[], str | None]:
    def avail() -> str | None:
        why = _triton_ops.triton_missing_reason()
        if why:
            return why
        if not _triton_ops.implemented(op):
            return f"no Triton kernel for {op} (not written yet)"
        if not _lib.available():
            return f"native library (op schemas) not loaded: {_lib.load_error()}"
        _triton_ops.register()
        return None

    return avail


def _triton_devices() -> tuple[str, ...]:
    return ("cuda", "cpu") if _triton_ops.interpreting() else ("cuda",)


def _triton_check(q: Query) -> str | None:
    if q.device.type == "cpu" and not _triton_ops.interpreting():
        return "CPU tensors need TRITON_INTERPRET=1"
    if q.needs_grad and not _triton_ops.backward_implemented(q.op):
        return f"no Triton backward kernel for {q.op} (not written yet)"
    return None


def _cuda_device_available() -> str | None:
    return None if torch.cuda.is_available() else "no CUDA device"


def _both(*fs):
    def avail():
        for f in fs:
            why = f()
            if why:
                return why
        return None

    return avail


# Per-(op, backend) input limits beyond device/dtype/backward: Query -> reason or
# None. Kernel authors add their shape limits here (e.g. head dims a kernel serves).
LIMITS: dict[tuple[str, str], Callable[[Query], str | None]] = {}


def _skip_fuse_triton_limits(q: Query) -> str | None:
    # features = (D, D_out); mirrors kernels/skip_fuse.py limits_reason (not imported
    # here: that module imports triton).
    D, D_out = q.features
    if D % 8 != 0 or not (64 <= D <= 4096):
        return f"triton skip_fuse needs D a multiple of 8 in [64, 4096], got D = {D}"
    if D_out % 8 != 0:
        return f"triton skip_fuse needs D_out a multiple of 8, got D_out = {D_out}"
    return None


LIMITS[("skip_fuse", "triton")] = _skip_fuse_triton_limits


# csrc/cuda/skip_fuse.cu: rows move in 16-byte chunks (x / skip and weight rows), the
# epilogue stores column pairs, the backward keeps 2*D fp32 column sums per CTA in shared
# memory, and the forward GEMM needs sm_80+ (cp.async, bf16 mma.sync) and 108 KiB of
# shared memory per block (3 stages of 2 x 128 x 144-byte tiles).
_SKIP_FUSE_CUDA_SMEM = 3 * 2 * 128 * 144


def _skip_fuse_cuda_limits(q: Query) -> str | None:
    D, D_out = q.features[:2]
    if D % 8 != 0 or D > 8192:
        return f"D={D}: the CUDA kernel needs D to be a multiple of 8 and at most 8192"
    if D_out % 8 != 0:
        return f"D_out={D_out}: the CUDA kernel needs D_out to be a multiple of 8"
    if q.device.type == "cuda":
        cc = torch.cuda.get_device_capability(q.device)
        if cc < (8, 0):
            return f"the CUDA kernel needs compute capability >= 8.0, device has {cc[0]}.{cc[1]}"
        optin = getattr(torch.cuda.get_device_properties(q.device), "shared_memory_per_block_optin", None)
        if optin is not None and optin < _SKIP_FUSE_CUDA_SMEM:
            return (f"the CUDA kernel needs {_SKIP_FUSE_CUDA_SMEM} bytes of shared memory per block, "
                    f"the device allows {optin}")
    return None


LIMITS[("skip_fuse", "cuda")] = _skip_fuse_cuda_limits


def _cuda_attention_limits(q: Query) -> str | None:
    # csrc/cuda/attention.cu: mma.sync / cp.async kernels for fp16 and bf16; every head
    # dim the op accepts (multiples of 8 up to 256) is served.
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"the CUDA attention kernel runs float16 and bfloat16 only, got {q.dtype}"
    if q.device.type == "cuda" and torch.cuda.get_device_capability(q.device) < (8, 0):
        return "the CUDA attention kernel needs compute capability >= 8.0"
    return None


LIMITS[("attention", "cuda")] = _cuda_attention_limits


def _attention_triton_limits(q: Query) -> str | None:
    # kernels/attention.py serves every head dim the op accepts (multiples of 8 up to
    # 256). Gaps: Triton's CPU interpreter computes bf16 tl.dot wrongly (DESIGN.md
    # 5.4); on the GPU, fp32 (IEEE) tl.dot lowers to FMA loops that spill registers
    # at every tile size (ptxas: 300-20000 bytes), so fp32 is served elsewhere.
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        return "Triton's interpreter computes bf16 tl.dot wrongly (CPU tensors run interpreted)"
    if q.device.type == "cuda" and q.dtype == torch.float32:
        return "fp32 attention in Triton runs IEEE fp32 dots on FMA units and spills registers; use fp16/bf16"
    return None


LIMITS[("attention", "triton")] = _attention_triton_limits


def _with_limits(op: str, backend: str, check: Callable[[Query], str | None] | None):
    def combined(q: Query) -> str | None:
        why = check(q) if check is not None else None
        if why:
            return why
        lim = LIMITS.get((op, backend))
        return lim(q) if lim is not None else None

    return combined


def _build_registry() -> dict[str, dict[str, Impl]]:
    ops = torch.ops.skipdit if _lib.available() else None

    def native(name):
        return (lambda *a: getattr(torch.ops.skipdit, name)(*a)) if ops is None else getattr(ops, name).default

    reg: dict[str, dict[str, Impl]] = {op: {} for op in OPS}
    for op in OPS:
        fwd, bwd = PUBLIC_OP[op], BACKWARD_OP[op]
        reg[op]["reference"] = Impl(op, "reference", getattr(reference, op), ("cpu", "cuda"), _FLOAT)
        for backend, key in (("cpu", "CPU"), ("cuda", "CUDA")):
            reg[op][backend] = Impl(
                op, backend, native(fwd), (backend,), _FLOAT if backend == "cpu" else _GPU_DTYPES,
                available=_native(FORWARD_OP[op], key) if backend == "cpu"
                else _both(_cuda_device_available, _native(FORWARD_OP[op], key)),
                check=_with_limits(op, backend, _native_backward_check(bwd, key) if bwd else None))
        reg[op]["triton"] = Impl(
            op, "triton", native(f"{fwd}_triton"), _triton_devices(), _GPU_DTYPES,
            min_cc=(8, 0), available=_triton_available(op), check=_with_limits(op, "triton", _triton_check))
    return reg


_REGISTRY: dict[str, dict[str, Impl]] | None = None


def registry() -> dict[str, dict[str, Impl]]:
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = _build_registry()
    return _REGISTRY


# ---------------------------------------------------------------------------
# user-facing choice

def _parse_env(value: str | None) -> tuple[str, dict[str, str]]:
    if not value:
        return "auto", {}
    default, per_op = "auto", {}
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        if "=" in part:
            op, name = (s.strip() for s in part.split("=", 1))
            per_op[op] = name
        else:
            default = part
    _validate(default, per_op)
    return default, per_op


def _validate(default: str | None, per_op: dict[str, str]) -> None:
    if default is not None and default not in BACKENDS + ("auto",):
        raise ValueError(f"unknown backend {default!r}; choose from auto, {', '.join(BACKENDS)}")
    for op, name in per_op.items():
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}; ops are {', '.join(OPS)}")
        if name not in BACKENDS + ("auto",):
            raise ValueError(f"unknown backend {name!r} for {op}; choose from auto, {', '.join(BACKENDS)}")


class _State:
    default: str = "auto"
    per_op: dict[str, str] = {}


_STATE = _State()
_STATE.default, _STATE.per_op = _parse_env(os.environ.get("SKIPDIT_FAST_BACKEND"))
_CACHE: dict[tuple, Impl] = {}


def set_backend(name: str | None = None, **per_op: str) -> None:
    """Sets the backend for all ops (name) and/or for single ops (skip_fuse=..., ...)."""
    _validate(name, per_op)
    if name is not None:
        _STATE.default = name
        _STATE.per_op = {}
    _STATE.per_op = {**_STATE.per_op, **per_op}
    _CACHE.clear()


def get_backend(op: str | None = None) -> str:
    """The requested backend ('auto' or a name) for op, or the global default."""
    if op is None:
        return _STATE.default
    return _STATE.per_op.get(op, _STATE.default)


@contextlib.contextmanager
def use_backend(name: str | None = None, **per_op: str) -> Iterator[None]:
    """with use_backend("triton"): ... / with use_backend(attention="cuda"): ..."""
    saved = (_STATE.default, dict(_STATE.per_op))
    set_backend(name, **per_op)
    try:
        yield
    finally:
        _STATE.default, _STATE.per_op = saved
        _CACHE.clear()


def select(q: Query) -> Impl:
    """The implementation that runs q under the current choice, or BackendError."""
    return pick(q.op, q.device, q.dtype, q.needs_grad, q.features)


def pick(op: str, device: torch.device, dtype: torch.dtype, needs_grad: bool, features: tuple = ()) -> Impl:
    """select() without building a Query on the hot path: decisions are cached per
    (op, device, dtype, needs_grad, features); the cache is cleared whenever the
    backend choice changes."""
    if torch.compiler.is_compiling():
        # decided once at trace time, a constant of the graph (guarded by the inputs'
        # device, dtype and shapes like everything else the graph specializes on)
        # (the requested backend is read here, in traced code, so that a change of it
        # recompiles)
        name = _decide(op, device, dtype, needs_grad, features, get_backend(op))
        return registry()[op][name]
    key = (op, device, dtype, needs_grad, features)
    impl = _CACHE.get(key)
    if impl is None:
        impl = _CACHE[key] = _select_uncached(Query(*key))
    return impl


@torch.compiler.assume_constant_result
def _decide(op: str, device: torch.device, dtype: torch.dtype, needs_grad: bool, features: tuple,
            requested: str) -> str:
    return _select_uncached(Query(op, device, dtype, needs_grad, features)).backend


def explain(q: Query) -> dict[str, list[str]]:
    """backend -> reasons it cannot run q (empty list: it can)."""
    return {name: impl.reasons(q) for name, impl in registry()[q.op].items()}


def _describe(q: Query) -> str:
    return (f"{q.op} on {q.device.type} {str(q.dtype).replace('torch.', '')}"
            f"{' with backward' if q.needs_grad else ''}{' ' + str(q.features) if q.features else ''}")


def _select_uncached(q: Query) -> Impl:
    if q.dtype not in _FLOAT:  # bad input for every backend: the op's own error
        raise TypeError(f"{q.op}: inputs must be float16, bfloat16, float32 or float64, got {q.dtype}")
    reg = registry()[q.op]
    requested = get_backend(q.op)
    if requested != "auto":
        impl = reg[requested]
        why = impl.reasons(q)
        if why:
            raise BackendError(f"backend '{requested}' cannot run {_describe(q)}: {'; '.join(why)}")
        return impl
    order = AUTO_PRIORITY.get((q.op, q.device.type), ("reference",))
    tried = []
    for name in order:
        why = reg[name].reasons(q)
        if not why:
            return reg[name]
        tried.append(f"  {name}: {'; '.join(why)}")
    raise BackendError(f"no backend can run {_describe(q)}:\n" + "\n".join(tried))
