"""Every op passes torch.library.opcheck, compiles under torch.compile(fullgraph=True)
with no graph break, and passes fp64 gradcheck (CPU backends)."""

import pytest
import torch
from torch.library import opcheck

import skipdit_fast as sf
from skipdit_fast.ops import defs, triton_ops

ops = torch.ops.skipdit


def _sf_args(requires_grad=False, bias=True, dtype=torch.float32, strided=False, D=16, D_out=24):
    x = torch.randn(2, 5, D, dtype=dtype)
    if strided:
        x = torch.randn(2, 5, D + 24, dtype=dtype)[..., 4:4 + D]
    s = torch.randn(2, 5, D, dtype=dtype)
    t = [x, s, torch.randn(2 * D), torch.randn(2 * D), torch.randn(D_out, 2 * D, dtype=dtype),
         torch.randn(D_out, dtype=dtype) if bias else None]
    if requires_grad:
        t = [a.requires_grad_() if a is not None and a.is_floating_point() else a for a in t]
    return (*t, 1e-6)


def _attn_args(requires_grad=False):
    qkv = torch.randn(2, 6, 3, 2, 16)
    q, k, v = (t.clone() if requires_grad else t for t in qkv.unbind(2))
    if requires_grad:
        q.requires_grad_()
        v.requires_grad_()
    return q, k, v


OPCHECK_CASES = {
    "skip_fuse": lambda: (ops.skip_fuse.default, _sf_args()),
    "skip_fuse_grad": lambda: (ops.skip_fuse.default, _sf_args(requires_grad=True)),
    "skip_fuse_nobias_strided": lambda: (ops.skip_fuse.default, _sf_args(True, bias=False, strided=True)),
    "skip_fuse_backward": lambda: (ops.skip_fuse_backward.default,
                                   (torch.randn(2, 5, 24), *_sf_args())),
    "attention_forward": lambda: (ops.attention_forward.default, (*_attn_args(True), 0.3)),
    "attention": lambda: (ops.attention.default, (*_attn_args(True), None)),
    "attention_backward": lambda: (ops.attention_backward.default, _attn_bwd_args()),
    "cache_delta": lambda: (ops.cache_delta.default,
                            (torch.randn(3, 8, requires_grad=True), torch.randn(3, 8))),
}


def _attn_bwd_args():
    q, k, v = _attn_args()
    out, lse = ops.attention_forward(q, k, v, 0.25)
    return torch.randn_like(out), q, k, v, out, lse, 0.25


@pytest.mark.parametrize("case", sorted(OPCHECK_CASES))
def test_opcheck_native(case):
    op, args = OPCHECK_CASES[case]()
    opcheck(op, args)


@pytest.mark.skipif(not triton_ops.interpreting(), reason="Triton ops run on CPU only in the interpreter")
@pytest.mark.skipif(triton_ops.triton_missing_reason() is not None, reason=f"{triton_ops.triton_missing_reason()}")
@pytest.mark.parametrize("op", sorted(op for d in defs.OPS.values() for op in d.kernel_ops()))
def test_opcheck_triton(op):
    cases = {
        "cache_delta": lambda: (torch.randn(3, 8, requires_grad=True), torch.randn(3, 8)),
        # the Triton kernels serve D >= 64 (kernels/limits.py)
        "skip_fuse": lambda: _sf_args(requires_grad=True, D=64, D_out=72),
        "skip_fuse_backward": lambda: (torch.randn(2, 5, 72), *_sf_args(D=64, D_out=72)),
        "attention_forward": lambda: (*_attn_args(True), 0.3),
        "attention_backward": _attn_bwd_args,
    }
    opcheck(getattr(ops, f"{op}_triton").default, cases[op]())


def _model_step(x, skip, nw, nb, w, b, qkv_w):
    h = sf.ops.skip_fuse(x, skip, nw, nb, w, b)
    B, N, D = h.shape
    q, k, v = (h @ qkv_w).view(B, N, 3, 2, D // 2).unbind(2)
    o = sf.ops.attention(q, k, v).reshape(B, N, D)
    return o, sf.ops.cache_delta(o, h)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    D = 16
    args = (torch.randn(2, 8, D), torch.randn(2, 8, D), torch.randn(2 * D), torch.randn(2 * D),
            torch.randn(D, 2 * D), torch.randn(D), torch.randn(D, 3 * D))
    with sf.use_backend(backend):
        eager = _model_step(*args)
        compiled = torch.compile(_model_step, fullgraph=True, backend="aot_eager")(*args)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)


def test_compile_fullgraph_inductor_with_backward():
    torch._dynamo.reset()
    D = 16
    args = [torch.randn(2, 8, D, requires_grad=True), torch.randn(2, 8, D), torch.randn(2 * D),
            torch.randn(2 * D), torch.randn(D, 2 * D, requires_grad=True), torch.randn(D),
            torch.randn(D, 3 * D)]

    def loss(*a):
        o, d = _model_step(*a)
        return o.square().mean() + d

    with sf.use_backend("cpu"):
        ref = torch.autograd.grad(loss(*args), [args[0], args[4]])
        out = torch.autograd.grad(torch.compile(loss, fullgraph=True)(*args), [args[0], args[4]])
    for r, o in zip(ref, out):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-5)


def test_gradcheck_fp64():
    dd = dict(dtype=torch.float64, requires_grad=True)
    with sf.use_backend("cpu"):
        x, s = torch.randn(3, 5, 8, **dd), torch.randn(3, 5, 8, **dd)
        nw, nb = torch.randn(16, **dd), torch.randn(16, **dd)
        w, b = torch.randn(12, 16, **dd), torch.randn(12, **dd)
        assert torch.autograd.gradcheck(lambda *a: sf.ops.skip_fuse(*a), (x, s, nw, nb, w, b))
        assert torch.autograd.gradcheck(lambda *a: sf.ops.skip_fuse(*a, None), (x, s, nw, nb, w))
        qkv = torch.randn(2, 4, 3, 2, 8, **dd)
        k, v = torch.randn(2, 6, 2, 8, **dd), torch.randn(2, 6, 2, 8, **dd)
        assert torch.autograd.gradcheck(lambda q, k, v: sf.ops.attention(q, k, v, 0.4),
                                        (qkv[:, :, 0], k, v))
        a, bb = torch.randn(3, 8, **dd), torch.randn(3, 8, **dd)
        assert torch.autograd.gradcheck(sf.ops.cache_delta, (a, bb))


@pytest.mark.skipif(triton_ops.triton_missing_reason() is not None, reason=f"{triton_ops.triton_missing_reason()}")
def test_triton_cache_delta_gradcheck():
    if not triton_ops.interpreting():
        pytest.skip("CPU gradcheck of a Triton op needs the interpreter")
    a = torch.randn(3, 8, requires_grad=True)
    b = torch.randn(3, 8, requires_grad=True)
    with sf.use_backend("triton"):
        ga = torch.autograd.grad(sf.ops.cache_delta(a, b), [a, b])
    with sf.use_backend("reference"):
        gr = torch.autograd.grad(sf.ops.cache_delta(a, b), [a, b])
    for x, y in zip(ga, gr):
        torch.testing.assert_close(x, y)


def test_compile_first_call_and_backend_change():
    """Backend choice inside a compiled function: decided at trace time even for a
    query never seen eagerly, and a change of the requested backend recompiles."""
    from skipdit_fast.ops import backends

    torch._dynamo.reset()
    backends._CACHE.clear()
    D = 24
    args = (torch.randn(2, 8, D), torch.randn(2, 8, D), torch.randn(2 * D), torch.randn(2 * D),
            torch.randn(D, 2 * D))

    def f(x, s, nw, nb, w):
        return sf.ops.skip_fuse(x, s, nw, nb, w) + sf.ops.cache_delta(x, s)

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(cf(*args), f(*args))
    impl = backends.registry()["skip_fuse"]["reference"]
    calls = []
    orig = impl.fn
    impl.fn = lambda *a: calls.append(1) or orig(*a)
    try:
        cf(*args)
        assert not calls
        with sf.use_backend("reference"):
            cf(*args)
        assert calls, "the compiled function kept the old backend after use_backend()"
    finally:
        impl.fn = orig
