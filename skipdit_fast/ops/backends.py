"""Backend registry and selection.

Every op has up to four implementations:

    reference  pure PyTorch (skipdit_fast.ops.reference), any device
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

from . import defs, native, triton_ops

BACKENDS = defs.BACKENDS
OPS = tuple(defs.OPS)
_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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
# availability of each backend on this machine, and the limits of its kernels

def _native(op: str, key: str) -> Callable[[], str | None]:
    def avail() -> str | None:
        if not native.available():
            return f"native library not loaded: {native.load_error()}"
        if not native.has_kernel(op, key):
            if key == "CUDA" and not native.build_info().get("cuda"):
                return "native library built without CUDA"
            return f"no {key} kernel for skipdit::{op} in the native library (not written yet)"
        return None

    return avail


def _native_check(d: defs.OpDef, key: str) -> Callable[[Query], str | None]:
    def check(q: Query) -> str | None:
        if q.needs_grad and d.backward and not native.has_kernel(d.backward, key):
            return f"no {key} kernel for skipdit::{d.backward} (backward not written yet)"
        if key == "CUDA":
            return native.cuda_limits(q.op, q.device, q.dtype, q.features)
        return None

    return check


def _triton_available() -> str | None:
    why = triton_ops.triton_missing_reason()
    if why:
        return why
    if not native.available():
        return f"native library (op schemas) not loaded: {native.load_error()}"
    return None


def _triton_devices() -> tuple[str, ...]:
    return ("cuda", "cpu") if triton_ops.interpreting() else ("cuda",)


def _triton_check(q: Query) -> str | None:
    if q.device.type == "cpu" and not triton_ops.interpreting():
        return "CPU tensors need TRITON_INTERPRET=1"
    from ..kernels import limits  # triton-free

    return getattr(limits, q.op)(q.device.type, q.dtype, *q.features)


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


def _build_registry() -> dict[str, dict[str, Impl]]:
    ops = torch.ops.skipdit if native.available() else None

    def entry(name):
        return (lambda *a: getattr(torch.ops.skipdit, name)(*a)) if ops is None else getattr(ops, name).default

    reg: dict[str, dict[str, Impl]] = {}
    for op, d in defs.OPS.items():
        reg[op] = {
            "reference": Impl(op, "reference", d.reference, ("cpu", "cuda"), _FLOAT),
            "cpu": Impl(op, "cpu", entry(op), ("cpu",), _FLOAT, available=_native(d.forward, "CPU"),
                        check=_native_check(d, "CPU")),
            "cuda": Impl(op, "cuda", entry(op), ("cuda",), _GPU_DTYPES,
                         available=_both(_cuda_device_available, _native(d.forward, "CUDA")),
                         check=_native_check(d, "CUDA")),
            "triton": Impl(op, "triton", entry(f"{op}_triton"), _triton_devices(), _GPU_DTYPES, min_cc=(8, 0),
                           available=_triton_available, check=_triton_check),
        }
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
    """SKIPDIT_FAST_BACKEND: a backend for every op, per-op entries op=backend, or both
    (`triton,attention=cuda`), comma-separated."""
    if not value:
        return "auto", {}
    default, per_op = None, {}
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        if "=" in part:
            op, name = (s.strip() for s in part.split("=", 1))
            if op in per_op:
                raise ValueError(f"SKIPDIT_FAST_BACKEND={value!r}: {op} is given twice")
            per_op[op] = name
        elif default is not None:
            raise ValueError(f"SKIPDIT_FAST_BACKEND={value!r}: two backends for all ops ({default!r} and "
                             f"{part!r}); give one, and per-op choices as op=backend")
        else:
            default = part
    default = default or "auto"
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


def pick(op: str, device: torch.device, dtype: torch.dtype, needs_grad: bool, features: tuple = (),
         backend: str | None = None) -> Impl:
    """select() without building a Query on the hot path: decisions are cached per
    (op, device, dtype, needs_grad, features); the cache is cleared whenever the
    backend choice changes. backend: a name (or 'auto') that overrides the current
    choice for this call (what skipdit_fast.patch(model, backend=...) asked for)."""
    requested = get_backend(op) if backend is None else backend
    if torch.compiler.is_compiling():
        # decided once at trace time, a constant of the graph (guarded by the inputs'
        # device, dtype and shapes like everything else the graph specializes on)
        # (the requested backend is read here, in traced code, so that a change of it
        # recompiles)
        name = _decide(op, device, dtype, needs_grad, features, requested)
        return registry()[op][name]
    key = (op, device, dtype, needs_grad, features, requested)
    impl = _CACHE.get(key)
    if impl is None:
        impl = _CACHE[key] = _select_uncached(Query(op, device, dtype, needs_grad, features), requested)
    return impl


@torch.compiler.assume_constant_result
def _decide(op: str, device: torch.device, dtype: torch.dtype, needs_grad: bool, features: tuple,
            requested: str) -> str:
    return _select_uncached(Query(op, device, dtype, needs_grad, features), requested).backend


def explain(q: Query) -> dict[str, list[str]]:
    """backend -> reasons it cannot run q (empty list: it can)."""
    return {name: impl.reasons(q) for name, impl in registry()[q.op].items()}


def _describe(q: Query) -> str:
    return (f"{q.op} on {q.device.type} {str(q.dtype).replace('torch.', '')}"
            f"{' with backward' if q.needs_grad else ''}{' ' + str(q.features) if q.features else ''}")


def _select_uncached(q: Query, requested: str) -> Impl:
    if q.dtype not in _FLOAT:  # bad input for every backend: the op's own error
        raise TypeError(f"{q.op}: inputs must be float16, bfloat16, float32 or float64, got {q.dtype}")
    reg = registry()[q.op]
    if requested != "auto":
        if requested not in reg:
            raise ValueError(f"unknown backend {requested!r}; choose from auto, {', '.join(BACKENDS)}")
        impl = reg[requested]
        why = impl.reasons(q)
        if why:
            raise BackendError(f"backend '{requested}' cannot run {_describe(q)}: {'; '.join(why)}")
        return impl
    order = defs.OPS[q.op].static_order.get(q.device.type, ("reference",))
    tried = []
    for name in order:
        why = reg[name].reasons(q)
        if not why:
            return reg[name]
        tried.append(f"  {name}: {'; '.join(why)}")
    raise BackendError(f"no backend can run {_describe(q)}:\n" + "\n".join(tried))
