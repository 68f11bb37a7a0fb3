"""Backend registry and selection.

Every op has up to five implementations:

    reference  pure PyTorch (skipdit_fast.ops.reference), the definition the tests hold
               the kernels to; any device
    torch      what a model without this package runs (cat + fp32 LayerNorm + linear,
               SDPA on the BSHD views, the plain reduction; reference.py says where it is
               the reference itself); any device, a candidate of `auto` everywhere
    cpu        C++ kernels of the native library, CPU tensors
    cuda       CUDA C++ kernels of the native library, CUDA tensors
    triton     Triton kernels (skipdit_fast.kernels), CUDA tensors (CPU tensors only in
               Triton's interpreter, TRITON_INTERPRET=1, when asked for explicitly)

A backend is chosen per op with `use_backend(...)` (context manager), `set_backend(...)`
or the environment variable SKIPDIT_FAST_BACKEND (the default of every thread), e.g.
`SKIPDIT_FAST_BACKEND=triton` or `SKIPDIT_FAST_BACKEND=attention=cuda,skip_fuse=triton`.
The choice is per context (contextvars): a `with use_backend(...)` or `set_backend(...)`
in one thread or asyncio task does not change what another one runs; a new thread
starts from SKIPDIT_FAST_BACKEND. A backend that was asked for explicitly and cannot
serve the inputs raises BackendError with the reason; it never falls back silently.

The default, `auto`, is measured (skipdit_fast.ops.autotune): on the first call for a
shape bucket the candidates that serve the inputs (defs.OpDef.static_order: torch and
our kernels for the device) are checked against the reference and timed, and the
fastest correct one runs from then on (never slower than torch, as measured). Decisions
persist in a cache file. Where nothing can be measured the static order decides:
SKIPDIT_FAST_AUTOTUNE=0, inside a CUDA-graph capture, and inside torch.compile, whose
trace reads the decision measured before it (run the model eagerly once, or
skipdit_fast.tune, before compiling) or else takes the static order, as a constant of
the graph. A graph whose sizes are symbolic (dynamic=True, automatic dynamic shapes,
mark_dynamic) takes the backend that won most measured buckets of that op, dtype and
width; a symbolic width leaves only the backends without width limits (torch, cpu).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from . import autotune, defs, native, triton_ops

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
    features: tuple = ()  # the widths the limits look at (defs.OpDef.feature_names)
    sizes: tuple = ()     # the sizes `auto` measures per bucket of (defs.OpDef.size_names), bucketed


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


_DYNAMIC_WIDTH = ("a width (D, D_out or head dim) is symbolic in this torch.compile graph: the kernel's "
                  "limits cannot be checked for every value it may take")


def _native_check(d: defs.OpDef, key: str) -> Callable[[Query], str | None]:
    def check(q: Query) -> str | None:
        if q.needs_grad and d.backward and not native.has_kernel(d.backward, key):
            return f"no {key} kernel for skipdit::{d.backward} (backward not written yet)"
        if key == "CUDA":
            if None in q.features:
                return _DYNAMIC_WIDTH
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
    if None in q.features:
        return _DYNAMIC_WIDTH
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
            "torch": Impl(op, "torch", d.torch, ("cpu", "cuda"), _FLOAT),
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


def _choice(default: str, per_op: dict[str, str]) -> tuple[str, tuple[tuple[str, str], ...]]:
    return default, tuple(sorted(per_op.items()))


# (default backend, ((op, backend), ...)) of the current context; new threads start from the env
_CHOICE = contextvars.ContextVar("skipdit_fast_backend",
                                 default=_choice(*_parse_env(os.environ.get("SKIPDIT_FAST_BACKEND"))))
# decisions of pick(): (op, device, dtype, needs_grad, features, sizes, requested, CPU threads) -> Impl
_CACHE: dict[tuple, Impl] = {}
_CACHE_MAX = 4096


def set_backend(name: str | None = None, **per_op: str) -> None:
    """Sets the backend for all ops (name) and/or for single ops (skip_fuse=..., ...), in
    the current context (thread / asyncio task)."""
    _CHOICE.set(_changed(name, per_op))


def _changed(name: str | None, per_op: dict[str, str]):
    _validate(name, per_op)
    default, current = _CHOICE.get()
    if name is not None:
        default, current = name, ()
    return _choice(default, {**dict(current), **per_op})


def get_backend(op: str | None = None) -> str:
    """The requested backend ('auto' or a name) for op, or the default of all ops."""
    default, per_op = _CHOICE.get()
    if op is not None:
        for name, value in per_op:
            if name == op:
                return value
    return default


@contextlib.contextmanager
def use_backend(name: str | None = None, **per_op: str) -> Iterator[None]:
    """with use_backend("triton"): ... / with use_backend(attention="cuda"): ...
    (in the current context only)."""
    token = _CHOICE.set(_changed(name, per_op))
    try:
        yield
    finally:
        _CHOICE.reset(token)


def bucket(n: int) -> int:
    """The shape bucket of a size: the next power of two (1 for 0 and 1)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def forget() -> None:
    """Drops the remembered choices (each is made again on its next call)."""
    _CACHE.clear()


def select(q: Query) -> Impl:
    """The implementation that runs q under the current choice, or BackendError (no
    measuring: q carries no inputs)."""
    return pick(q.op, q.device, q.dtype, q.needs_grad, q.features, sizes=q.sizes)


def pick(op: str, device: torch.device, dtype: torch.dtype, needs_grad: bool, features: tuple = (),
         backend: str | None = None, sizes: tuple = (), args: tuple | None = None) -> Impl:
    """The implementation for a call: remembered per (op, device, dtype, needs_grad,
    features, sizes, requested backend, CPU threads); `auto` measures on `args`, the
    call's inputs, the first time a bucket of `sizes` is seen. backend: a name (or
    'auto') that overrides the current choice for this call (what
    skipdit_fast.patch(model, backend=...) asked for)."""
    requested = get_backend(op) if backend is None else backend
    if torch.compiler.is_compiling():
        # read at trace time, a constant of the graph (the requested backend is read
        # here, in traced code, so that a change of it recompiles)
        name = _decide(op, device, dtype, needs_grad, tuple(_known(f) for f in features),
                       tuple(_known(n) for n in sizes), requested)
        return registry()[op][name]
    key = (op, device, dtype, needs_grad, features, sizes, requested,
           torch.get_num_threads() if device.type == "cpu" else 0)
    impl = _CACHE.get(key)
    if impl is None:
        q = Query(op, device, dtype, needs_grad, features, tuple(bucket(n) for n in sizes))
        impl, final = _select_uncached(q, requested, args)
        if final:
            if len(_CACHE) >= _CACHE_MAX:
                _CACHE.clear()
            _CACHE[key] = impl
    return impl


def _known(n):
    """(traced code) n as a plain int when torch.compile's trace knows its value, None
    when it is symbolic. Reads only what the trace knows: installs no guard, so a
    dynamic size stays dynamic (mark_dynamic included)."""
    if not statically_known_true(n >= 0):
        return None
    lo, hi = 0, 1
    while statically_known_true(n >= hi):
        if hi > 1 << 62:
            return None
        lo, hi = hi, 2 * hi
    while hi - lo > 1:  # lo <= n < hi
        mid = (lo + hi) // 2
        if statically_known_true(n >= mid):
            lo = mid
        else:
            hi = mid
    return lo if statically_known_true(n == lo) else None


@torch.compiler.assume_constant_result
def _decide(op: str, device: torch.device, dtype: torch.dtype, needs_grad: bool, features: tuple,
            sizes: tuple, requested: str) -> str:
    q = Query(op, device, dtype, needs_grad, features, tuple(None if n is None else bucket(n) for n in sizes))
    return _select_traced(q, requested).backend


def explain(q: Query) -> dict[str, list[str]]:
    """backend -> reasons it cannot run q (empty list: it can)."""
    return {name: impl.reasons(q) for name, impl in registry()[q.op].items()}


def _describe(q: Query) -> str:
    return (f"{q.op} on {q.device.type} {str(q.dtype).replace('torch.', '')}"
            f"{' with backward' if q.needs_grad else ''}{' ' + str(q.features) if q.features else ''}")


def _explicit(q: Query, requested: str) -> Impl:
    _check_dtype(q)
    reg = registry()[q.op]
    if requested not in reg:
        raise ValueError(f"unknown backend {requested!r}; choose from auto, {', '.join(BACKENDS)}")
    impl = reg[requested]
    why = impl.reasons(q)
    if why:
        raise BackendError(f"backend '{requested}' cannot run {_describe(q)}: {'; '.join(why)}")
    return impl


def _check_dtype(q: Query) -> None:
    if q.dtype not in _FLOAT:  # bad input for every backend: the op's own error
        raise TypeError(f"{q.op}: {defs.OPS[q.op].dtype_arg} must be float16, bfloat16, float32 or float64, "
                        f"got {q.dtype}")


def candidates(q: Query) -> list[Impl]:
    """The backends `auto` chooses among for q, in the static order; BackendError with
    every reason when none serves q."""
    _check_dtype(q)
    reg = registry()[q.op]
    order = defs.OPS[q.op].static_order.get(q.device.type, ("torch",))
    out, tried = [], []
    for name in order:
        why = reg[name].reasons(q)
        if why:
            tried.append(f"  {name}: {'; '.join(why)}")
        else:
            out.append(reg[name])
    if not out:
        raise BackendError(f"no backend can run {_describe(q)}:\n" + "\n".join(tried))
    return out


def _select_uncached(q: Query, requested: str, args: tuple | None = None) -> tuple[Impl, bool]:
    """(implementation, whether the choice is final and may be remembered)."""
    if requested != "auto":
        return _explicit(q, requested), True
    cands = candidates(q)
    if len(cands) == 1 or not q.sizes or not autotune.enabled():
        if len(cands) == 1:
            autotune.TUNER.note_only(q, cands[0].backend)
        return cands[0], True
    reg = registry()[q.op]
    d = autotune.TUNER.lookup(q, cands)
    if d is None and autotune.unmeasurable(q.device, args) is None:
        d = autotune.TUNER.decide(q, cands, args)
    if d is None:  # nothing measured: the static order, decided again next time
        return cands[0], False
    return reg[d.backend], True


def _select_traced(q: Query, requested: str) -> Impl:
    """_select_uncached inside a torch.compile trace: no measuring; unknown sizes are None."""
    if requested != "auto":
        return _explicit(q, requested)
    cands = candidates(q)
    if len(cands) == 1 or not autotune.enabled():
        return cands[0]
    if None in q.sizes:
        name = autotune.TUNER.lookup_dynamic(q, cands)
    else:
        d = autotune.TUNER.lookup(q, cands) if q.sizes else None
        name = d.backend if d else None
    return registry()[q.op][name] if name else cands[0]
