"""The fuzz table (issue 16.7): bad and unusual inputs for every public op function
(skipdit_fast.ops.skip_fuse / attention / cache_delta, forward and backward through
autograd, on each CPU backend: reference, torch, cpu; triton in Triton's interpreter
with SKIPDIT_FAST_FUZZ_TRITON=1) and every torch.ops.skipdit op (forward and backward
ops, the native CPU kernels).

Each probe has an expectation:

    error    the call must raise the expected exception type with a message that
             names the argument (`must be 4-D`, `skip dtype ... differs`, ...)
    either   a strided / odd-layout / meta input: computing the right result or
             refusing with a clear error are both fine; a wrong result never is
    compute  the call must compute what the reference computes on the same values
             (fp64, contiguous); NaN where the reference has NaN, and nowhere else

and its outcome is one of

    error    raised a clear error (the expected type, the argument named)
    correct  computed, and matches the reference (meta inputs: the right shapes)
    fail     a wrong result, no error where one is due, an unclear error (another
             type, or a message that does not name the argument), a crash or a hang

Probes run in worker subprocesses (run_isolated): a crash in native code fails its
probe instead of killing the caller, and the worker goes on from the next probe.
`python tests/fuzz_cases.py --worker` is the worker; tools/fuzz_report.py and
tests/test_fuzz.py are the callers. Other tables: any tests/fuzz_cases_*.py module
with a `probes()` function is collected too (all_probes).
"""

from __future__ import annotations

import glob
import importlib.util
import json
import math
import os
import queue
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

BACKENDS = ("reference", "torch", "cpu")
NATIVE = "native-cpu"   # the backend name of a direct torch.ops.skipdit call on CPU tensors


@dataclass
class Probe:
    id: str                 # "<target>[<backend>]: <case>"
    target: str             # "ops.skip_fuse", "ops.skip_fuse.backward", "skipdit::skip_fuse", ...
    backend: str
    case: str
    make: Callable[[], dict] = field(repr=False)   # -> named arguments, in signature order
    expect: str = "error"   # error | either | compute
    names: tuple = ()       # error: the message must name one of these
    exc: tuple = (ValueError,)
    xfail: str | None = None   # a known bug: why
    want: Callable | None = field(default=None, repr=False)   # the expected result, where the reference cannot run
    good: Callable | None = field(default=None, repr=False)   # the target's good arguments for this backend
    check: Callable | None = field(default=None, repr=False)  # got -> problem or None, instead of a reference


# ----------------------------------------------------------------------------------
# good arguments

def _r(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


def sf_good(wide: bool = False):
    D, Do = (64, 24) if wide else (8, 12)   # triton serves D in 64..4096
    return dict(x=_r(2, 3, D), skip=_r(2, 3, D), norm_weight=1 + 0.1 * _r(2 * D), norm_bias=0.1 * _r(2 * D),
                weight=_r(Do, 2 * D) / 4, bias=_r(Do), eps=1e-6)


def attn_good(scale=None, wide: bool = False):
    return dict(q=_r(2, 5, 2, 8), k=_r(2, 7, 2, 8), v=_r(2, 7, 2, 8), scale=scale)


def cd_good(wide: bool = False):
    return dict(a=_r(3, 8), b=_r(3, 8))


def sf_bwd_good(wide: bool = False):
    g = sf_good(wide)
    return dict(grad_out=_r(2, 3, g["weight"].shape[0]), **g)


def attn_bwd_good():
    from skipdit_fast.ops import reference

    g = attn_good(0.3)
    out = reference.attention(g["q"], g["k"], g["v"], 0.3)
    lse = reference.attention_lse(g["q"], g["k"], g["v"], 0.3).float()
    return dict(grad_out=_r(2, 5, 2, 8), q=g["q"], k=g["k"], v=g["v"], out=out, lse=lse, scale=0.3)


# ----------------------------------------------------------------------------------
# mutations of one tensor argument: (case, change(t) -> new value, expect, exc, names)

def _padded(t):
    """The values of t in a view with padded leading strides (last dim contiguous)."""
    if t.dim() < 2:
        return t
    D = t.shape[-1]
    big = torch.full((*t.shape[:-1], D + 5), float("nan"), dtype=t.dtype)
    big[..., :D] = t
    return big[..., :D]


def _offset(t):
    """t's values at a storage offset of 3 elements."""
    buf = torch.full((t.numel() + 3,), float("nan"), dtype=t.dtype)
    buf[3:] = t.reshape(-1)
    return buf[3:].view(t.shape)


def _lead_transposed(t):
    """t's values, its leading dims stored transposed (a non-contiguous view)."""
    if t.dim() < 3:
        return t
    return t.transpose(0, 1).contiguous().transpose(0, 1)


def _last_strided(t):
    """t's values with last-dim stride 2."""
    big = torch.full((*t.shape[:-1], 2 * t.shape[-1]), float("nan"), dtype=t.dtype)
    big[..., ::2] = t
    return big[..., ::2]


def _expanded_row(t):
    """A tensor of t's shape whose first dim is a stride-0 expansion of its first row."""
    if t.dim() < 2:
        return t
    return t[:1].expand(t.shape)


def _nan_at(t, value=float("nan")):
    t = t.clone()
    t.view(-1)[t.numel() // 2] = value
    return t


def tensor_mutations(name, t, first: bool, names_all: tuple):
    """The mutations of tensor argument `name` (good value t)."""
    dev_names = names_all if first else (name,)
    m = [
        ("dtype int32", lambda t: t.to(torch.int32), "error", (TypeError,), (name,)),
        ("dtype float64 among float32", lambda t: t.double(), "error", (TypeError,), names_all if first else (name,)),
        ("dtype float16 among float32", lambda t: t.half(), "error", (TypeError,), names_all if first else (name,)),
        ("dtype bool", lambda t: t > 0, "error", (TypeError,), (name,)),
        ("dtype complex64", lambda t: t.to(torch.complex64), "error", (TypeError,), (name,)),
        ("last dim + 1", lambda t: torch.cat([t, t[..., :1]], -1), "error", (ValueError,), names_all),
        ("first dim + 1", lambda t: torch.cat([t, t[:1]], 0), "error", (ValueError,), names_all),
        ("one more dim", lambda t: t.unsqueeze(0), "error", (ValueError,), names_all),
        ("0-d", lambda t: torch.tensor(1.0, dtype=t.dtype), "error", (ValueError,), (name,)),
        ("empty", lambda t: t[:0], "error", (ValueError,), names_all),
        ("on the meta device", lambda t: t.to("meta"), "error", (ValueError,), dev_names),
        ("a list", lambda t: t.tolist(), "error", (TypeError,), (name,)),
        ("a float", lambda t: 1.0, "error", (TypeError,), (name,)),
        ("None", lambda t: None, "error", (TypeError,), (name,)),
        ("a numpy array", lambda t: t.numpy(), "error", (TypeError,), (name,)),
        ("last-dim stride 2", _last_strided, "either", (ValueError,), (name,)),
        ("padded leading stride", _padded, "compute", (), ()),
        ("storage offset", _offset, "compute", (), ()),
        ("leading dims transposed", _lead_transposed, "compute", (), ()),
        ("stride-0 first dim", _expanded_row, "compute", (), ()),
        ("a NaN", _nan_at, "compute", (), ()),
        ("an inf", lambda t: _nan_at(t, float("inf")), "compute", (), ()),
        ("requires_grad", lambda t: t.clone().requires_grad_(True), "compute", (), ()),
    ]
    if t.dim() == 1:   # 1-D parameters: no leading dims to vary; one with stride 2 must work or refuse
        m = [x for x in m if x[0] not in ("padded leading stride", "leading dims transposed", "stride-0 first dim",
                                          "first dim + 1")]
        m.append(("1-D stride 2", _last_strided, "either", (ValueError,), (name,)))
    return m


def _many_dims(t):
    """t [.., D] as a 6-D as_strided view with size-1 dims of odd strides."""
    n = t.numel() // t.shape[-1]
    flat = t.reshape(n, t.shape[-1]).contiguous()
    shape = (1, 2, 1, n // 2, 1, t.shape[-1]) if n % 2 == 0 else (1, 1, 1, n, 1, t.shape[-1])
    st = (999, shape[3] * t.shape[-1], 7, t.shape[-1], 12345, 1)
    return flat.as_strided(shape, st)


# ----------------------------------------------------------------------------------
# targets: how to call, what the reference is

def _sf_call_public(kw):
    import skipdit_fast.ops as ops

    return ops.skip_fuse(**kw)


def _sf_ref(kw):
    from skipdit_fast.ops import reference

    return reference.skip_fuse(**_ref_args(kw))


def _attn_ref(kw):
    from skipdit_fast.ops import reference

    return reference.attention(**_ref_args(kw))


def _attn_fwd_ref(kw):
    from skipdit_fast.ops import reference

    a = _ref_args(kw)
    s = a["scale"] if a["scale"] is not None else a["q"].shape[-1] ** -0.5
    return reference.attention(a["q"], a["k"], a["v"], s), reference.attention_lse(a["q"], a["k"], a["v"], s)


def _cd_ref(kw):
    from skipdit_fast.ops import reference

    return reference.cache_delta(**_ref_args(kw))


def _ref_args(kw):
    return {k: (v.detach().double().contiguous() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def _grads_ref(fn, kw, grad_names, grad_out):
    """fp64 gradients of sum(fn(**kw) * grad_out) w.r.t. grad_names."""
    a = _ref_args(kw)
    for n in grad_names:
        if a.get(n) is not None:
            a[n] = a[n].clone().requires_grad_(True)
    out = fn(**a)
    go = grad_out.double() if grad_out is not None else torch.ones_like(out)
    ins = [a[n] for n in grad_names if a.get(n) is not None]
    gs = torch.autograd.grad(out, ins, go, allow_unused=True)
    return tuple(torch.zeros_like(i) if g is None else g for i, g in zip(ins, gs))


def _public(op):
    def call(kw):
        import skipdit_fast.ops as ops

        return getattr(ops, op)(**kw)
    return call


def _plain_ref(op):
    def f(**a):
        from skipdit_fast.ops import reference

        return getattr(reference, op)(**a)
    return f


def _public_backward(op, ref_fn, grad_names):
    """Forward through the public op with every float tensor argument requiring grad,
    backward with a fixed gradient: the gradients, and the reference's."""
    def call(kw):
        import skipdit_fast.ops as ops

        # detach() keeps the mutation's layout (strides, offset, stride 0): the leaf is that view
        kw = {k: (v.detach().requires_grad_(True) if k in grad_names and isinstance(v, torch.Tensor)
                  and v.is_floating_point() else v) for k, v in kw.items()}
        out = getattr(ops, op)(**kw)
        g = _gradient_for(out)
        ins = [kw[n] for n in grad_names if isinstance(kw.get(n), torch.Tensor) and kw[n].requires_grad]
        gs = torch.autograd.grad(out, ins, g, allow_unused=True)
        return tuple(torch.zeros_like(i) if x is None else x for i, x in zip(ins, gs))

    def ref(kw):
        kw2 = dict(kw)
        out = ref_fn(kw2)
        g = _gradient_for(out)
        names = [n for n in grad_names if isinstance(kw.get(n), torch.Tensor) and kw[n].is_floating_point()]
        return _grads_ref(_plain_ref(op), kw, names, g)
    return call, ref


def _gradient_for(out):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype) if out.dim() else \
        torch.ones((), dtype=out.dtype)


def _native(op):
    def call(kw):
        return getattr(torch.ops.skipdit, op)(*kw.values())
    return call


def _sf_bwd_ref(kw):
    names = ["x", "skip", "norm_weight", "norm_bias", "weight", "bias"]
    sub = {k: v for k, v in kw.items() if k != "grad_out"}

    def f(**a):
        from skipdit_fast.ops import reference

        return reference.skip_fuse(**a)
    g = _grads_ref(f, sub, names, kw["grad_out"])
    # without a bias the op returns an empty grad_bias (the schema has six outputs)
    return g if kw.get("bias") is not None else g + (torch.empty(0, dtype=torch.float64),)


def _attn_bwd_ref(kw):
    """The backward from the given out and lse (the op's contract: flash attention's
    dS = P * (dP - rowsum(dO * O)), P = exp(S - lse)), in fp64: with out and lse of q,
    k, v it is autograd's gradient."""
    a = _ref_args(kw)
    q, k, v, o, do = (a[n].transpose(1, 2) for n in ("q", "k", "v", "out", "grad_out"))
    s = a["scale"]
    p = torch.exp(torch.matmul(q, k.transpose(-1, -2)) * s - a["lse"][..., None])
    dv = torch.matmul(p.transpose(-1, -2), do)
    dp = torch.matmul(do, v.transpose(-1, -2))
    ds = p * (dp - (do * o).sum(-1, keepdim=True))
    dq, dk = torch.matmul(ds, k) * s, torch.matmul(ds.transpose(-1, -2), q) * s
    return tuple(g.transpose(1, 2) for g in (dq, dk, dv))


def _attn_bwd_fixup(kw, name):
    """After a change of q, k or v: out and lse recomputed from them (when they are
    good enough to compute with), so that the backward's inputs stay consistent."""
    from skipdit_fast.ops import reference

    if name in ATTN_T:
        try:
            a = _ref_args({n: kw[n] for n in ATTN_T})
            kw["out"] = reference.attention(a["q"], a["k"], a["v"], kw["scale"]).float()
            kw["lse"] = reference.attention_lse(a["q"], a["k"], a["v"], kw["scale"]).float()
        except Exception:  # noqa: BLE001 - a bad q / k / v: the op must refuse it
            pass
    return kw


SF_T = ("x", "skip", "norm_weight", "norm_bias", "weight", "bias")
ATTN_T = ("q", "k", "v")
CD_T = ("a", "b")


@dataclass
class Target:
    name: str
    backends: tuple
    good: Callable[[], dict]
    tensors: tuple          # the tensor arguments that are mutated
    call: Callable
    ref: Callable
    scalars: dict = field(default_factory=dict)   # name -> [(case, value, expect, exc)]
    errors: bool = True     # also the bad-input (error) mutations
    dispatcher: bool = False   # a torch.ops call: a non-tensor is the dispatcher's RuntimeError
    all_meta: bool = True
    lead: str = ""          # the tensor the others' devices are compared with (default: the first)
    fixup: Callable | None = None   # (kwargs, changed name) -> kwargs


def _eps_cases():
    return [("eps nan", math.nan, "error", (ValueError,)), ("eps inf", math.inf, "error", (ValueError,)),
            ("eps -1", -1.0, "error", (ValueError,)), ("eps a string", "1e-6", "error", (TypeError, RuntimeError)),
            ("eps None", None, "error", (TypeError, RuntimeError)), ("eps 0", 0.0, "compute", ()),
            ("eps a 0-d tensor", torch.tensor(1e-6), "either", (TypeError, RuntimeError))]


def _scale_cases(optional: bool):
    c = [("scale nan", math.nan, "error", (ValueError,)), ("scale inf", math.inf, "error", (ValueError,)),
         ("scale -inf", -math.inf, "error", (ValueError,)), ("scale a string", "0.3", "error", (TypeError, RuntimeError)),
         ("scale 0", 0.0, "compute", ()), ("scale negative", -0.7, "compute", ()), ("scale huge", 1e30, "compute", ())]
    if not optional:
        c.append(("scale None", None, "error", (TypeError, RuntimeError)))
    return c


def public_backends() -> tuple:
    """reference, torch, cpu; and triton in Triton's interpreter with SKIPDIT_FAST_FUZZ_TRITON=1."""
    from skipdit_fast.ops import triton_ops

    return BACKENDS + (("triton",) if os.environ.get("SKIPDIT_FAST_FUZZ_TRITON") == "1"
                       and triton_ops.interpreting() and triton_ops.triton_missing_reason() is None else ())


def targets() -> list[Target]:
    pub = public_backends()
    sfb_call, sfb_ref = _public_backward("skip_fuse", _sf_ref, SF_T)
    ab_call, ab_ref = _public_backward("attention", _attn_ref, ATTN_T)
    cb_call, cb_ref = _public_backward("cache_delta", _cd_ref, CD_T)
    return [
        Target("ops.skip_fuse", pub, sf_good, SF_T, _public("skip_fuse"), _sf_ref, {"eps": _eps_cases()}),
        Target("ops.attention", pub, attn_good, ATTN_T, _public("attention"), _attn_ref,
               {"scale": _scale_cases(True)}),
        Target("ops.cache_delta", pub, cd_good, CD_T, _public("cache_delta"), _cd_ref),
        Target("ops.skip_fuse.backward", pub, sf_good, SF_T, sfb_call, sfb_ref, errors=False, all_meta=False),
        Target("ops.attention.backward", pub, attn_good, ATTN_T, ab_call, ab_ref, errors=False, all_meta=False),
        Target("ops.cache_delta.backward", pub, cd_good, CD_T, cb_call, cb_ref, errors=False, all_meta=False),
        Target("skipdit::skip_fuse", (NATIVE,), sf_good, SF_T, _native("skip_fuse"), _sf_ref, {"eps": _eps_cases()},
               dispatcher=True),
        Target("skipdit::skip_fuse_backward", (NATIVE,), sf_bwd_good, ("grad_out",) + SF_T,
               _native("skip_fuse_backward"), _sf_bwd_ref, {"eps": _eps_cases()[:3]}, dispatcher=True, lead="x"),
        Target("skipdit::attention", (NATIVE,), attn_good, ATTN_T, _native("attention"), _attn_ref,
               {"scale": _scale_cases(True)}, dispatcher=True),
        Target("skipdit::attention_forward", (NATIVE,), lambda: attn_good(0.3), ATTN_T, _native("attention_forward"),
               _attn_fwd_ref, {"scale": _scale_cases(False)}, dispatcher=True),
        Target("skipdit::attention_backward", (NATIVE,), attn_bwd_good, ("grad_out",) + ATTN_T + ("out", "lse"),
               _native("attention_backward"), _attn_bwd_ref, {"scale": _scale_cases(False)[:4]}, dispatcher=True,
               lead="q", fixup=_attn_bwd_fixup),
        Target("skipdit::cache_delta", (NATIVE,), cd_good, CD_T, _native("cache_delta"), _cd_ref, dispatcher=True),
    ]


# mutations that make no sense for an argument, or whose expectation differs there
def _adjust(t: Target, name: str, case: str, expect, exc, names):
    """(expect, exc, names), or None to leave the probe out."""
    if name == "bias" and case == "None":
        return "compute", (), ()     # bias is optional
    if case in ("last dim + 1", "first dim + 1", "one more dim", "empty") and name in ("grad_out", "out", "lse"):
        return expect, exc, (name,)
    if case == "first dim + 1" and t.name.endswith("cache_delta") and name == "b":
        return expect, exc, ("a", "b")
    if t.name.startswith("skipdit::attention") and case == "last dim + 1" and name in ("k", "v", "q"):
        return expect, exc, ATTN_T + ("head dim",)
    if t.dispatcher and case in ("a list", "a float", "None", "a numpy array"):
        return expect, (TypeError, RuntimeError), names   # the dispatcher parses the schema first
    if case == "requires_grad" and t.dispatcher and t.name.endswith("backward"):
        return None
    if name in ("norm_weight", "norm_bias") and case.startswith("dtype"):
        return expect, exc, (name, "norm parameters")   # one message for both: "norm parameters must be ..."
    if case == "on the meta device" and not t.dispatcher and names == tuple(t.tensors):
        from skipdit_fast.ops import BackendError

        # the lead tensor's device picks the backend: one that cannot run on meta says so
        return expect, exc + (BackendError,), names + ("meta",)
    if name == "lse" and case in ("dtype float16 among float32",):
        return expect, exc, ("lse",)
    return expect, exc, names


def _backward_case(case: str) -> bool:
    """The cases that the backward (autograd) targets probe: layouts and values."""
    return case in ("padded leading stride", "storage offset", "leading dims transposed", "stride-0 first dim",
                    "a NaN", "an inf", "1-D stride 2", "last-dim stride 2", "many dims")


def _make(t: Target, name: str | None, change, scalar=None):
    def make():
        torch.manual_seed(0)
        kw = t.good()
        if name is not None:
            kw[name] = change(kw[name])
            if t.fixup:
                kw = t.fixup(kw, name)
        if scalar is not None:
            kw[scalar[0]] = scalar[1]
        return kw
    return make


def _all_meta(t: Target):
    def make():
        torch.manual_seed(0)
        return {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in t.good().items()}
    return make


def probes() -> list[Probe]:
    out = []
    for t0 in targets():
        for backend in t0.backends:
            t = t0
            if backend == "triton" and "skip_fuse" in t0.name:   # a width the triton kernels serve
                t = replace(t0, good=lambda g=t0.good: g(wide=True))
            good = t.good()
            tensor_names = tuple(n for n in t.tensors if isinstance(good.get(n), torch.Tensor))

            def add(case, make, expect, exc=(), names=(), t=t):
                out.append(Probe(f"{t.name}[{backend}]: {case}", t.name, backend, case, make, expect, tuple(names),
                                 tuple(exc), good=t.good))
            add("good arguments", _make(t, None, None), "compute")
            for i, name in enumerate(tensor_names):
                lead = name == (t.lead or tensor_names[0])
                for case, change, expect, exc, names in tensor_mutations(name, good[name], lead, tensor_names):
                    if not t.errors and not _backward_case(case):
                        continue
                    adj = _adjust(t, name, case, expect, exc, names)
                    if adj is None:
                        continue
                    add(f"{name}: {case}", _make(t, name, change), *adj)
            first = tensor_names[0]
            if good[first].dim() >= 2 and (t.name.endswith("skip_fuse") or "cache_delta" in t.name
                                           or t.name.endswith("skip_fuse.backward")):
                add(f"{first}: many dims (6-D as_strided)", _many_dims_all(t, tensor_names), "compute")
            for sname, cases in t.scalars.items():
                for case, value, expect, exc in cases:
                    names = (sname,) if expect == "error" else ()
                    add(case, _make(t, None, None, (sname, value)), expect, exc, names)
            if t.errors and t.all_meta:
                add("every tensor on meta", _all_meta(t), "either", (ValueError, TypeError, RuntimeError),
                    tensor_names + ("meta",))
    out += _special()
    if os.environ.get("SKIPDIT_FAST_FUZZ_SELFTEST") == "1":   # test_fuzz.py: a crash fails its probe only
        out.append(Probe("selftest: segfault", "selftest", "none", "segfault", lambda: {}, "compute"))
    for p in out:
        p.xfail = known_bug(p.id)
    return out


def _many_dims_all(t, tensor_names):
    """Every [..., D] argument of the same leading shape as a 6-D as_strided view."""
    def make():
        torch.manual_seed(0)
        kw = t.good()
        lead = kw[tensor_names[0]].shape[:-1]
        for n in tensor_names:
            v = kw[n]
            if v.dim() >= 2 and v.shape[:-1] == lead:
                kw[n] = _many_dims(v)
        return kw
    return make


def _special() -> list[Probe]:
    """Probes outside the per-argument pattern: int32-overflowing element counts
    (stride-0 views: no memory), NaN propagation through attention."""
    out = []

    def huge():
        a = torch.full((1, 8), 2.0).expand(2 ** 28 + 1, 8)   # 2**31 + 8 elements
        b = torch.full((1, 8), 1.0).expand(2 ** 28 + 1, 8)
        return dict(a=a, b=b)

    for target, backend in (("skipdit::cache_delta", NATIVE), ("ops.cache_delta", "cpu")):
        # sum|2 - 1| / sum|1| = 1 (the reference would materialize 16 GiB of fp64)
        out.append(Probe(f"{target}[{backend}]: a, b: 2**31 + 8 elements (stride-0 rows)", target, backend,
                         "2**31 + 8 elements", huge, "compute", want=lambda: torch.tensor(1.0, dtype=torch.float64)))

    if os.environ.get("SKIPDIT_FAST_FUZZ_HEAVY") == "1":   # tools/fuzz_report.py --heavy: ~20 s and 1 GiB each
        M = 2 ** 28 + 1   # M * D = 2**31 + 8 elements of x (stride-0 rows), a 1 GiB output

        def huge_sf():
            torch.manual_seed(0)
            return dict(x=_r(1, 8).expand(M, 8), skip=_r(1, 8).expand(M, 8), norm_weight=1 + 0.1 * _r(16),
                        norm_bias=0.1 * _r(16), weight=_r(1, 16), bias=_r(1), eps=1e-6)

        def huge_sf_check(got, kw=None):
            from skipdit_fast.ops import reference

            kw = huge_sf()
            want = reference.skip_fuse(*(kw[n][:1].double() if kw[n].dim() == 2 and n in ("x", "skip") else
                                         kw[n].double() for n in SF_T), eps=1e-6)
            if tuple(got.shape) != (M, 1):
                return f"shape {list(got.shape)}, want [{M}, 1]"
            err = ((got.view(-1) - float(want)).abs().max() / abs(float(want))).item()
            return None if err <= 1e-5 else f"max error {err:.2e} of the value every row has (tolerance 1e-5)"

        for target, backend in (("skipdit::skip_fuse", NATIVE), ("ops.skip_fuse", "cpu")):
            out.append(Probe(f"{target}[{backend}]: x, skip: 2**31 + 8 elements (stride-0 rows)", target, backend,
                             "2**31 + 8 elements of x", huge_sf, "compute", check=huge_sf_check))

    def nan_q_row():
        kw = attn_good(0.3)
        kw["q"][0, 1, 0, :] = float("nan")    # one query row all NaN
        return kw

    def nan_k_row():
        kw = attn_good(0.3)
        kw["k"][1, 3, 1, 2] = float("nan")    # one key element NaN: its (batch, head) row is NaN
        return kw

    def inf_logit():
        kw = attn_good(0.3)
        kw["q"][0, 0, 0, 0] = float("inf")
        return kw

    for target, backends in (("ops.attention", public_backends()), ("skipdit::attention_forward", (NATIVE,))):
        for backend in backends:
            for case, make in (("q: a NaN query row", nan_q_row), ("k: one NaN element", nan_k_row),
                               ("q: an inf element", inf_logit)):
                out.append(Probe(f"{target}[{backend}]: {case}", target, backend, case, make, "compute"))
    return out


# the cases that fail today, with the reason (a bug named): (regex on the probe id,
# reason); marked xfail in test_fuzz.py, counted as fails by tools/fuzz_report.py
KNOWN_BUG_PATTERNS: list[tuple[str, str]] = [
    (r"^ops\.attention\[torch\]: q: (a NaN|a NaN query row)$",
     "the torch backend is PyTorch's SDPA: its CPU kernel returns a finite output row for a query row with a NaN "
     "where the fp64 reference (and our cpu kernel) give NaN: PyTorch's behaviour (reference.sdpa_attention "
     "documents it)"),
]


def known_bug(pid: str) -> str | None:
    for pat, why in KNOWN_BUG_PATTERNS:
        if re.search(pat, pid):
            return why
    return None


# ----------------------------------------------------------------------------------
# running one probe

def _segfault(kw):
    import ctypes

    return ctypes.string_at(0)


def _target(name: str) -> Target:
    if name == "selftest":
        return Target("selftest", ("none",), dict, (), _segfault, _segfault)
    return {t.name: t for t in targets()}[name]


def _flatten(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [y for v in x for y in _flatten(v)]
    return []


def _names_arg(msg: str, names) -> bool:
    return any(re.search(rf"(?<![\w]){re.escape(n)}(?![\w])", msg) for n in names)


def _compare(got, want, nonfinite_alike: bool = False) -> str | None:
    """None when got matches want (fp64): same shapes, NaN exactly where want has
    NaN, infs equal, the rest within 1e-4 of the largest finite magnitude (every
    probe is fp32). nonfinite_alike (an inf among the inputs): NaN and +-inf are one
    class, non-finite exactly where want is (whether inf - inf or inf * 0 arises is
    the order of evaluation's; that a result is not finite is not)."""
    g, w = _flatten(got), _flatten(want)
    if len(g) != len(w):
        return f"{len(g)} outputs, the reference has {len(w)}"
    for i, (a, b) in enumerate(zip(g, w)):
        if tuple(a.shape) != tuple(b.shape):
            return f"output {i}: shape {list(a.shape)}, the reference's {list(b.shape)}"
        if b.device.type == "meta" or a.device.type == "meta":
            continue
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        if nonfinite_alike:
            na, nb = ~torch.isfinite(a), ~torch.isfinite(b)
            if not torch.equal(na, nb):
                return (f"output {i}: non-finite at {int(na.sum())} elements, the reference at {int(nb.sum())}")
            a, b = a[~nb], b[~nb]
        na, nb = torch.isnan(a), torch.isnan(b)
        if not torch.equal(na, nb):
            return (f"output {i}: NaN at {int(na.sum())} elements, the reference at {int(nb.sum())} "
                    f"({int((na & ~nb).sum())} NaN where the reference is not, {int((nb & ~na).sum())} the other way)")
        ia, ib = torch.isinf(a), torch.isinf(b)
        if not torch.equal(ia, ib) or not torch.equal(a[ib], b[ib]):
            return f"output {i}: infs differ from the reference's"
        fin = ~(nb | ib)
        if fin.any():
            scale = max(b[fin].abs().max().item(), 1e-30)
            err = (a[fin] - b[fin]).abs().max().item() / scale
            if not err <= 1e-4:
                return f"output {i}: max error {err:.2e} of the largest magnitude (tolerance 1e-4)"
    return None


def run_probe(p: Probe) -> dict:
    """{'outcome': error | correct | fail, 'detail': ...} (in this process)."""
    import skipdit_fast.ops as ops

    t = _target(p.target)
    kw = p.make()
    call = t.call
    try:
        if p.backend in (NATIVE, "none"):
            got = call(kw)
        else:
            with ops.use_backend(p.backend):
                got = call(kw)
    except Exception as e:  # noqa: BLE001 - classifying is the point
        msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        if p.expect == "compute":
            return {"outcome": "fail", "detail": f"raised where it must compute: {msg}"}
        if p.backend in ("triton", "cpu", "torch", "reference") and type(e).__name__ == "BackendError":
            # the backend asked for cannot serve these inputs (a dtype, a width, a device): it says why
            return {"outcome": "error", "detail": msg}
        if not isinstance(e, p.exc):
            return {"outcome": "fail", "detail": f"unclear error: {msg} (want {'/'.join(x.__name__ for x in p.exc)})"}
        if p.names and not _names_arg(str(e), p.names):
            return {"outcome": "fail", "detail": f"unclear error (names none of {', '.join(p.names)}): {msg}"}
        return {"outcome": "error", "detail": msg}
    if p.expect == "error":
        return {"outcome": "fail", "detail": "no error"}
    if any(x.device.type == "meta" for x in _flatten(got)) or any(
            isinstance(v, torch.Tensor) and v.device.type == "meta" for v in kw.values()):
        torch.manual_seed(0)
        want = t.ref((p.good or t.good)())   # meta: only the shapes can be checked, the good case's
        problem = _compare(got, want)
        return {"outcome": "fail" if problem else "correct",
                "detail": f"wrong result: {problem}" if problem else "meta: the right shapes"}
    if p.check:
        problem = p.check(got)
        return {"outcome": "fail" if problem else "correct", "detail": f"wrong result: {problem}" if problem else ""}
    want = p.want() if p.want else t.ref(kw)
    problem = _compare(got, want, nonfinite_alike="inf" in p.case)
    if problem:
        return {"outcome": "fail", "detail": f"wrong result: {problem}"}
    return {"outcome": "correct", "detail": ""}


# ----------------------------------------------------------------------------------
# other tables, and running probes in worker processes

def all_probes() -> list[Probe]:
    """This table's probes and those of every tests/fuzz_cases_*.py (its probes())."""
    ps = probes()
    for path in sorted(glob.glob(os.path.join(HERE, "fuzz_cases_*.py"))):
        spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        ps += mod.probes()
    ids = [p.id for p in ps]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise ValueError(f"fuzz probe ids must be unique: {sorted(dup)[:5]}")
    return ps


def worker_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    env["SKIPDIT_FAST_AUTOTUNE"] = "0"
    if not torch.cuda.is_available():
        env.setdefault("TRITON_INTERPRET", "1")
    return env


def run_isolated(ids: list[str], probe_timeout: float = 120.0, log=None) -> dict[str, dict]:
    """Runs the probes in worker subprocesses, in order: {id: result}. A probe that
    kills its worker (a crash) or runs past probe_timeout is a fail ('crash: ...' /
    'hang'); a new worker goes on from the next one."""
    results: dict[str, dict] = {}
    todo = list(ids)
    while todo:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=worker_env(),
                                cwd=ROOT)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)], daemon=True).start()

        def feed(ids=tuple(todo), stdin=proc.stdin):   # in a thread: the ids outgrow a pipe's buffer
            try:
                stdin.write("\n".join(ids) + "\n")
                stdin.close()
            except (BrokenPipeError, OSError):   # the worker died: the loop below says so
                pass
        threading.Thread(target=feed, daemon=True).start()
        err_tail: list[str] = []
        threading.Thread(target=lambda: [err_tail.append(x) or err_tail.__delitem__(slice(0, -20))
                                         for x in proc.stderr], daemon=True).start()
        try:
            _collect(proc, lines, err_tail, results, probe_timeout, len(ids), log)
        finally:
            if proc.poll() is None:   # the caller was interrupted: no orphan worker
                proc.kill()
                proc.wait()
        left = [i for i in todo if i not in results]
        if len(left) == len(todo):   # the worker died before its first probe: not a probe's doing
            raise RuntimeError(f"fuzz worker failed (exit {proc.returncode}):\n{''.join(err_tail)}")
        todo = left
    return results


def _collect(proc, lines, err_tail, results, probe_timeout, total, log) -> None:
    """Reads one worker's START / RESULT lines into results until it ends; a probe
    it started and did not finish is a crash (the worker died) or a hang (killed)."""
    current = None
    t_last = time.monotonic()
    while True:
        try:
            line = lines.get(timeout=max(0.1, probe_timeout - (time.monotonic() - t_last)))
        except queue.Empty:
            proc.kill()
            proc.wait()
            if current is not None:
                results[current] = {"outcome": "fail", "detail": f"hang: over {probe_timeout:.0f} s"}
            break
        if line is None:
            proc.wait()
            if current is not None:
                sig = -proc.returncode if proc.returncode and proc.returncode < 0 else None
                results[current] = {"outcome": "fail", "detail": (
                    f"crash: the process died ({'signal ' + str(sig) if sig else 'exit ' + str(proc.returncode)})"
                    f"; stderr: {''.join(err_tail)[-300:].strip()}")}
            break
        if line.startswith("START "):
            current, t_last = line[6:].rstrip("\n"), time.monotonic()
        elif line.startswith("RESULT "):
            r = json.loads(line[7:])
            results[r.pop("id")] = r
            current = None
            if log:
                log(len(results), total)


def _worker() -> int:
    torch.set_num_threads(1)
    by_id = {p.id: p for p in all_probes()}
    for line in sys.stdin:
        pid = line.rstrip("\n")
        if not pid:
            continue
        print("START " + pid, flush=True)
        try:
            r = run_probe(by_id[pid])
        except Exception as e:  # noqa: BLE001 - a probe whose checking itself failed
            r = {"outcome": "fail", "detail": f"probe error: {type(e).__name__}: {e}"}
        print("RESULT " + json.dumps({"id": pid, **r}), flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        sys.exit(_worker())
    print(__doc__)
