"""The C++ CPU skip_fuse (csrc/cpu/skip_fuse.cpp) and the reference backend against fp64
truth, DESIGN.md section 4: every input family, odd sizes, strided views, NaN-poisoned
outputs, bounded temporaries."""

import pytest
import torch

import skipdit_fast as sf
from helpers import FAMILIES, assert_budget, rows, strided_like
from skipdit_fast.ops import native, reference
from skipdit_fast.ops.testing import poison_outputs

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-4, torch.float64: 1e-12}


def _skip_fuse_inputs(M, D, D_out, family, dtype, norm_f32=True, bias=True, strided=False):
    lead = (M,) if M % 2 else (2, M // 2)
    x = rows((*lead, D), family, dtype)
    skip = rows((*lead, D), "normal" if family == "outlier" else family, dtype)
    if strided:
        x, skip = strided_like(x), strided_like(skip, pad=8)
    pdt = torch.float32 if norm_f32 else dtype
    nw = (1 + 0.1 * torch.randn(2 * D)).to(pdt)
    nb = (0.1 * torch.randn(2 * D)).to(pdt)
    w = (torch.randn(D_out, 2 * D) / (2 * D) ** 0.5).to(dtype)
    b = (0.1 * torch.randn(D_out)).to(dtype) if bias else None
    return x, skip, nw, nb, w, b


def _f64(args):
    return [a.double() if isinstance(a, torch.Tensor) else a for a in args]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,D,D_out", [(1, 72, 72), (37, 88, 88), (1030, 72, 144), (64, 1152, 1152)])
def test_skip_fuse_forward(family, dtype, M, D, D_out):
    args = _skip_fuse_inputs(M, D, D_out, family, dtype, norm_f32=(M % 2 == 1), bias=(D != 88))
    truth = reference.skip_fuse(*_f64(args))
    ref_lowp = reference.skip_fuse(*args)
    with sf.use_backend("cpu"), poison_outputs():
        out = sf.ops.skip_fuse(*args)
    assert out.dtype == dtype and out.is_contiguous()
    assert_budget(out, ref_lowp, truth, atol=ATOL[dtype], what=f"skip_fuse {family} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_skip_fuse_strided_views(dtype):
    args = _skip_fuse_inputs(40, 72, 72, "offset10", dtype, strided=True)
    assert not args[0].is_contiguous()
    with sf.use_backend("cpu"), poison_outputs():
        out = sf.ops.skip_fuse(*args)
    contig = [a.contiguous() if isinstance(a, torch.Tensor) else a for a in args]
    with sf.use_backend("cpu"):
        torch.testing.assert_close(out, sf.ops.skip_fuse(*contig), rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_skip_fuse_backward(family, dtype, bias):
    M, D, D_out = 37, 72, 88
    args = _skip_fuse_inputs(M, D, D_out, family, dtype, norm_f32=True, bias=bias)
    # the incoming gradient is representable in the low dtype, so truth sees the same one
    gy = torch.randn(M, D_out, dtype=torch.float64).to(dtype).double()

    def grads(fn, a, g):
        a = [t.detach().clone().requires_grad_() if isinstance(t, torch.Tensor) else t for t in a]
        fn(*a).backward(g.to(a[0].dtype))
        return [t.grad for t in a if isinstance(t, torch.Tensor)]

    truth = grads(reference.skip_fuse, _f64(args), gy)
    ref_lowp = grads(reference.skip_fuse, args, gy)
    with sf.use_backend("cpu"), poison_outputs():
        out = grads(sf.ops.skip_fuse, args, gy)
    names = ["x", "skip", "norm_weight", "norm_bias", "weight", "bias"]
    for name, o, r, t in zip(names, out, ref_lowp, truth):
        assert o.dtype == r.dtype, name
        # gradients sum over rows: scale atol with the magnitude
        atol = ATOL[dtype] * max(1.0, t.abs().max().item())
        assert_budget(o, r, t, atol=atol, what=f"grad {name} {family} {dtype}")


def test_reference_backend_matches_reference_module():
    args = _skip_fuse_inputs(9, 72, 72, "normal", torch.float32)
    with sf.use_backend("reference"):
        out = sf.ops.skip_fuse(*args)
    torch.testing.assert_close(out, reference.skip_fuse(*args), rtol=0, atol=0)


def _skip_fuse_args(M, D, grad=False):
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(M, D, generator=g), torch.randn(M, D, generator=g), torch.randn(2 * D, generator=g),
            torch.randn(2 * D, generator=g), torch.randn(D, 2 * D, generator=g) * 0.02,
            torch.randn(D, generator=g)]
    return [a.requires_grad_(grad) for a in args]


def _cpu_chunk_bytes(which: str) -> int:
    """The CPU kernel's row-chunk buffer size (csrc/cpu/skip_fuse.h), from build_info."""
    return native.constant(f"skip_fuse_cpu_{which}_chunk_bytes")


def test_skip_fuse_cpu_peak_memory_forward():
    """Issue 3 (CPU): no (M, 2D) temporary. The kernel normalizes row chunks into one
    buffer of at most skip_fuse_cpu_fwd_chunk_bytes; here the (M, 2D) tensor would be
    48 MiB, eager holds the concatenation and its normalized copy (96 MiB) on top of the
    output."""
    from skipdit_fast.benchmark import peak_memory_bytes

    M, D = 16384, 384
    x, s, nw, nb, w, b = _skip_fuse_args(M, D)
    out_bytes, cat_bytes = M * D * 4, M * 2 * D * 4
    dev = torch.device("cpu")
    ours = peak_memory_bytes(dev, lambda: torch.ops.skipdit.skip_fuse(x, s, nw, nb, w, b, 1e-6)) - out_bytes
    eager = peak_memory_bytes(dev, lambda: reference.skip_fuse(x, s, nw, nb, w, b, 1e-6)) - out_bytes
    assert eager >= 2 * cat_bytes  # the measurement sees what eager allocates
    assert 0 < ours <= _cpu_chunk_bytes("fwd") + (1 << 20), ours
    assert ours < cat_bytes / 2


def test_skip_fuse_cpu_peak_memory_backward():
    """The backward recomputes the normalization per row chunk and writes the LayerNorm
    gradient straight into grad_x / grad_skip: its temporaries stay bounded (two chunk
    buffers and the weight-sized partial sums) as M grows, below one (M, 2D) tensor."""
    from skipdit_fast.benchmark import peak_memory_bytes

    M, D = 32768, 384
    x, s, nw, nb, w, b = _skip_fuse_args(M, D)
    g = torch.randn(M, D)
    grads_bytes = (2 * M * D + 2 * 2 * D + D * 2 * D + D) * 4
    cat_bytes = M * 2 * D * 4
    temp = peak_memory_bytes(torch.device("cpu"), lambda: torch.ops.skipdit.skip_fuse_backward(
        g, x, s, nw, nb, w, b, 1e-6)) - grads_bytes
    assert 0 < temp <= 2 * _cpu_chunk_bytes("bwd") + 8 * D * 2 * D * 4, temp
    assert temp < cat_bytes
