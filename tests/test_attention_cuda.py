"""The CUDA C++ attention forward (csrc/cuda/attention.cu, attention_kernels.cuh,
attention_tiles.h).

Three layers of checks:
- build: the kernels are in the ptxas report of every arch the library was built for
  (sm_80 and sm_90a by default) with 0 bytes spilled;
- emulation (CPU, runs everywhere): the kernel code itself, compiled by g++ into
  tests/emu/attention_kernels.cpp against the emulator (tests/emu/ptx_emu.h: ldmatrix /
  mma / cp.async / shuffles from the PTX ISA's definitions; tests/emu/cta.h: a
  fiber-per-thread model of a CTA), which checks every memory access; outputs against
  fp64 truth with the DESIGN.md error budget;
- GPU (@pytest.mark.gpu): the real kernels against fp64 truth, every head dim and
  sequence-length class of the issue, strided qkv views, lse, NaN poisoning.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import torch

from skipdit_fast.ops import backends, native, reference
from skipdit_fast.ops.testing import poison_outputs
import emu_build
from helpers import FAMILIES, assert_budget, attention_lse_pt, attention_pt, rows, strided_like

ROOT = Path(__file__).resolve().parents[1]

# Kernels per arch: attention_fwd_kernel for head-dim tiles 64, 72, 88, 96, 128, 256;
# attention_fwd_short_kernel for tiles 64..128 with 16 and 64 tokens; each for fp16 and
# bf16.
N_MAIN_KERNELS = 6 * 2
N_SHORT_KERNELS = 5 * 2 * 2


def make_qkv(B, Nq, Nk, H, dh, dtype, family="normal", layout="contiguous", device="cpu"):
    """q [B, Nq, H, dh], k/v [B, Nk, H, dh] drawn from `family`, laid out as
    contiguous tensors, views of one fused qkv projection output (needs Nq == Nk), or
    views with padded leading strides (NaN in the padding)."""
    if layout == "fused":
        assert Nq == Nk
        qkv = rows((B, Nq, 3 * H * dh), family, dtype, device)
        return qkv.view(B, Nq, 3, H, dh).unbind(2)
    q = rows((B, Nq, H, dh), family, dtype, device)
    k = rows((B, Nk, H, dh), family, dtype, device)
    v = rows((B, Nk, H, dh), "normal", dtype, device)
    if layout == "padded":
        q, k, v = strided_like(q), strided_like(k, pad=8), strided_like(v, pad=40)
    else:
        assert layout == "contiguous"
    return q, k, v


def check_against_truth(out, lse, q, k, v, scale, what):
    """out / lse against fp64 truth with the DESIGN.md budget (reference in q's dtype)."""
    qd, kd, vd = (t.detach().cpu().double() for t in (q, k, v))
    truth = reference.attention(qd, kd, vd, scale)
    ref_lowp = attention_pt(q, k, v, scale)
    ref_lse = attention_lse_pt(q, k, v, scale)
    if not (torch.isfinite(ref_lowp).all() and torch.isfinite(ref_lse).all()):
        # fp16 scores of the offset1000 family overflow in the reference (its q @ k^T is
        # rounded to fp16); the kernel accumulates scores in fp32 and stays finite. The
        # budget then comes from the bf16 reference, the nearest one with a finite error.
        assert q.dtype == torch.float16, what
        lo = [t.to(torch.bfloat16) for t in (q, k, v)]
        ref_lowp, ref_lse = attention_pt(*lo, scale), attention_lse_pt(*lo, scale)
    assert out.is_contiguous()
    assert_budget(out.cpu(), ref_lowp.cpu(), truth, atol=1e-3, what=f"{what} out")
    truth_lse = reference.attention_lse(qd, kd, vd, scale)
    assert lse.dtype == torch.float32 and lse.shape == truth_lse.shape and lse.is_contiguous()
    assert_budget(lse.cpu(), ref_lse.cpu(), truth_lse, atol=1e-3, what=f"{what} lse")
    # Scores are fp32 sums of exact 16-bit products: the lse is far tighter than the
    # budget above (whose reference rounds the scores to 16 bits).
    rel = ((lse.cpu().double() - truth_lse).abs() / (1 + truth_lse.abs())).max().item()
    assert rel < 2e-5, f"{what} lse relative error {rel:.2e}"


# ---------------------------------------------------------------------------------
# build


def _arch_list() -> list[str]:
    archs = native.build_info().get("cuda_archs", "") if native.available() else ""
    return [a.split("-")[0] for a in archs.split(",") if a]


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_ptxas_report_has_kernels_without_spills(arch):
    if not native.available():
        pytest.skip(f"native library not loaded: {native.load_error()}")
    if not native.build_info().get("cuda"):
        pytest.skip("native library built without CUDA")
    if arch.removeprefix("sm_") not in _arch_list():
        pytest.skip(f"library built for {_arch_list()}, not {arch}")
    report = [r for r in native.ptxas_report() if r["arch"] == arch and "attention_fwd_" in r["kernel"]]
    main = [r for r in report if "attention_fwd_kernel" in r["kernel"]]
    short = [r for r in report if "attention_fwd_short_kernel" in r["kernel"]]
    assert len(main) == N_MAIN_KERNELS and len(short) == N_SHORT_KERNELS, (
        f"{arch}: {len(main)} main / {len(short)} short attention kernels in the ptxas report")
    for r in report:
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"{arch} spills: {r}"
        assert r["registers"] is not None and r["registers"] <= 255, r


def test_cuda_kernel_registered_forward_only():
    if not native.available() or not native.build_info().get("cuda"):
        pytest.skip("native library built without CUDA")
    assert native.has_kernel("attention_forward", "CUDA")
    # The backward of the CUDA backend is the Triton kernel (issue 4), registered from
    # Python as the CUDA kernel of the native attention_backward op.
    from skipdit_fast.ops import triton_ops

    if triton_ops.triton_missing_reason() is None:
        assert "attention_backward" in triton_ops.ROUTED_TO_TRITON
        assert native.has_kernel("attention_backward", "CUDA")


def test_backend_limits_refuse_fp32():
    assert "float16 and bfloat16" in native.cuda_limits("attention", torch.device("cpu"), torch.float32, (72,))


# ---------------------------------------------------------------------------------
# emulation


class Emulator:
    """tests/emu/attention_kernels.cpp, built by emu_build (build/emu/)."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        self.fn = self.lib.emu_attention_forward
        self.fn.restype = ctypes.c_int

    def __call__(self, q, k, v, scale=None, mode=1, q_storage_bytes=None):
        """Runs the kernel on CPU tensors; returns (out, lse, info). mode bit 0: cp.async
        copies land at wait_group (else at issue); bit 1: warps scheduled one by one
        (else threads round-robin). q_storage_bytes: the size of q's storage the
        emulator lets the kernel read (default: all of it)."""
        B, Nq, H, dh = q.shape
        Nk = k.shape[1]
        scale = dh ** -0.5 if scale is None else scale
        out = torch.full((B, Nq, H, dh), float("nan"), dtype=q.dtype)
        lse = torch.full((B, H, Nq), float("nan"), dtype=torch.float32)

        def span(t):
            s = t.untyped_storage()
            return [s.data_ptr(), s.data_ptr() + s.nbytes()]

        strides = (ctypes.c_int64 * 9)(*[t.stride(i) for t in (q, k, v) for i in range(3)])
        spans = [span(t) for t in (q, k, v, out, lse)]
        if q_storage_bytes is not None:
            spans[0][1] = spans[0][0] + q_storage_bytes
        ranges = (ctypes.c_uint64 * 10)(*sum(spans, []))
        err = ctypes.create_string_buffer(1024)
        info = ctypes.create_string_buffer(256)
        vp = ctypes.c_void_p
        rc = self.fn(0 if q.dtype == torch.float16 else 1, mode, vp(q.data_ptr()), vp(k.data_ptr()),
                     vp(v.data_ptr()), vp(out.data_ptr()), vp(lse.data_ptr()), strides, ranges,
                     ctypes.c_int64(B), H, Nq, Nk, dh, ctypes.c_double(scale), ctypes.c_int64(0),
                     ctypes.c_int64(-1), err, len(err), info, len(info))
        assert rc == 0, f"emulator: {err.value.decode()} [{info.value.decode()}]"
        return out, lse, info.value.decode()


@pytest.fixture(scope="module")
def emu():
    # SKIPDIT_EMU_LIB_ATTENTION_KERNELS: run the tests on another build of the emulator
    # (e.g. one compiled against a deliberately broken copy of the kernel, to see them fail).
    return Emulator(emu_build.load("attention_kernels"))


F16, BF16 = torch.float16, torch.bfloat16

# (dtype, B, H, Nq, Nk, dh, layout, family, kernel the plan must pick)
EMU_CASES = [
    # fwd_main on every head-dim tile; ragged query and key tiles
    (F16, 1, 2, 70, 70, 72, "fused", "normal", "main kDh=72"),
    (BF16, 1, 1, 130, 97, 72, "padded", "offset10", "main kDh=72"),
    (BF16, 2, 1, 65, 80, 64, "contiguous", "outlier", "main kDh=64"),
    (F16, 1, 1, 33, 129, 88, "contiguous", "normal", "main kDh=88"),
    (BF16, 1, 2, 66, 66, 88, "fused", "offset1000", "main kDh=88"),
    (F16, 1, 1, 40, 70, 96, "padded", "normal", "main kDh=96"),
    (BF16, 1, 1, 65, 65, 128, "fused", "outlier", "main kDh=128"),
    (F16, 1, 1, 20, 70, 256, "contiguous", "offset10", "main kDh=256"),
    # several query tiles and K/V tiles (the cp.async ring wraps around)
    (BF16, 1, 1, 200, 300, 72, "padded", "normal", "main kDh=72"),
    (F16, 1, 2, 129, 257, 64, "contiguous", "offset10", "main kDh=64"),
    (BF16, 1, 1, 150, 200, 128, "contiguous", "normal", "main kDh=128"),
    (F16, 1, 1, 70, 100, 256, "padded", "normal", "main kDh=256"),
    # other multiples of 8 run on the next larger tile with zero-filled columns
    (BF16, 1, 1, 50, 90, 32, "padded", "normal", "main kDh=64"),
    (F16, 1, 1, 30, 100, 80, "contiguous", "normal", "main kDh=88"),
    (BF16, 1, 1, 20, 72, 136, "contiguous", "normal", "main kDh=256"),
    (F16, 1, 1, 1, 65, 72, "contiguous", "normal", "main kDh=72"),
    # fwd_short: Latte's N = 16, tiny and ragged sequences, Nq != Nk
    (BF16, 2, 3, 16, 16, 72, "fused", "normal", "short kDh=72"),
    (F16, 1, 5, 16, 16, 88, "padded", "offset10", "short kDh=88"),
    (BF16, 3, 1, 1, 1, 72, "contiguous", "normal", "short kDh=72"),
    (F16, 1, 2, 7, 13, 64, "contiguous", "outlier", "short kDh=64"),
    (BF16, 1, 3, 33, 33, 96, "fused", "normal", "short kDh=96"),
    (F16, 2, 1, 64, 17, 128, "contiguous", "offset1000", "short kDh=128"),
    (BF16, 1, 2, 16, 50, 40, "padded", "normal", "short kDh=64"),
]


@pytest.mark.parametrize("case", EMU_CASES, ids=lambda c: f"{str(c[0])[6:]}-B{c[1]}H{c[2]}-{c[3]}x{c[4]}-d{c[5]}-{c[6]}-{c[7]}")
def test_emulated_kernel_matches_truth(emu, case):
    dtype, B, H, Nq, Nk, dh, layout, family, kernel = case
    q, k, v = make_qkv(B, Nq, Nk, H, dh, dtype, family, layout)
    # Alternate between copies landing late (round-robin threads) and warps running
    # ahead of each other (copies landing at issue), the two ways a race shows.
    mode = (1, 2)[EMU_CASES.index(case) % 2]
    out, lse, info = emu(q, k, v, mode=mode)
    assert info.startswith(kernel + " "), info
    check_against_truth(out, lse, q, k, v, dh ** -0.5, f"{info} {family}")


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
@pytest.mark.parametrize("scale", [0.3, -0.2])
def test_emulated_scale_and_schedules(emu, mode, scale):
    """Explicit (also negative) scales, under every emulator schedule: cp.async
    performed at issue or at wait, threads round-robin or warp by warp."""
    for Nq, Nk, dh in ((45, 100, 72), (16, 16, 72)):
        q, k, v = make_qkv(1, Nq, Nk, 2, dh, torch.float16)
        out, lse, info = emu(q, k, v, scale=scale, mode=mode)
        check_against_truth(out, lse, q, k, v, scale, info)


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["fp16", "bf16"])
def test_emulator_16bit_conversions_match_torch(emu, dtype):
    x = torch.cat([torch.randn(20000) * 10.0 ** torch.randint(-9, 6, (20000,)),
                   torch.tensor([0.0, -0.0, 65504.0, 65519.9, 65520.0, 1e9, float("inf"), -float("inf"),
                                 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26, 2.0 ** -14 * 0.999])])
    out = torch.empty(x.numel(), dtype=torch.int16)
    back = torch.empty_like(x)
    emu.lib.emu_convert(0 if dtype == F16 else 1, ctypes.c_void_p(x.data_ptr()),
                        ctypes.c_void_p(out.data_ptr()), ctypes.c_void_p(back.data_ptr()),
                        ctypes.c_int64(x.numel()))
    assert torch.equal(out, x.to(dtype).view(torch.int16))  # bit for bit
    assert torch.equal(back, x.to(dtype).float())


@pytest.mark.parametrize("Nq, Nk", [(16, 16), (70, 90)], ids=["short", "main"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["q", "k", "v", "q row of -inf scores"])
def test_emulated_nonfinite_inputs(emu, where, value, Nq, Nk):
    """Non-finite inputs: out has the reference's NaNs and infinities at the same places;
    lse is NaN exactly where the reference's lse is not finite (ops.cpp documents both)."""
    import math

    val = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}[value]
    q, k, v = (rows((1, n, 2, 72), "normal", BF16) for n in (Nq, Nk, Nk))
    if where == "q row of -inf scores":  # column 3 of k > 0: every score of (0, 2, 1) is +-inf
        k[..., 3] = k[..., 3].abs() + 0.5
        q[0, 2, 1, 3] = val
    else:
        {"q": q, "k": k, "v": v}[where][0, 2, 1, 3] = val
    out, lse, info = emu(q, k, v)
    ref, ref_lse = attention_pt(q, k, v), attention_lse_pt(q, k, v)
    assert torch.equal(out.isnan(), ref.isnan()), info
    assert torch.equal(out.isposinf(), ref.isposinf()) and torch.equal(out.isneginf(), ref.isneginf()), info
    assert torch.equal(lse.isnan(), ~ref_lse.isfinite()), info
    fin = ref.isfinite()
    torch.testing.assert_close(out[fin].float(), ref[fin].float(), rtol=2e-2, atol=2e-2)


def test_emulator_reports_out_of_range_reads(emu):
    """The emulator checks every global read against the inputs' storage: declare q's
    storage one row too short and the kernel's (correct) reads of that row are reported."""
    q, k, v = make_qkv(1, 40, 40, 1, 72, torch.bfloat16)
    with pytest.raises(AssertionError, match="cp.async reads outside"):
        emu(q, k, v, q_storage_bytes=q.untyped_storage().nbytes() - 72 * 2)


# ---------------------------------------------------------------------------------
# GPU

def _cuda_op(q, k, v, scale):
    return torch.ops.skipdit.attention_forward(q, k, v, scale)


needs_cuda_kernel = pytest.mark.skipif(
    not (native.available() and native.has_kernel("attention_forward", "CUDA")),
    reason="native library built without the CUDA attention kernel")

HEAD_DIMS = (32, 64, 72, 88, 96, 128, 256)
SEQ_LENS = (1, 16, 77, 256, 1031)


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("dh", HEAD_DIMS)
@pytest.mark.parametrize("N", SEQ_LENS)
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["fp16", "bf16"])
def test_gpu_matches_truth(dtype, N, dh):
    # B x H from 64 (short sequences) down to 2 (N = 1031) keeps the fp64 CPU truth fast.
    B, H = {1: (4, 16), 16: (4, 16), 77: (2, 8), 256: (2, 4), 1031: (1, 2)}[N]
    layout = ("fused", "padded", "contiguous")[(N + dh) % 3]
    family = FAMILIES[(N + dh // 8) % len(FAMILIES)]
    q, k, v = make_qkv(B, N, N, H, dh, dtype, family, layout, device="cuda")
    with poison_outputs():
        out, lse = _cuda_op(q, k, v, dh ** -0.5)
    torch.cuda.synchronize()
    check_against_truth(out, lse, q, k, v, dh ** -0.5, f"N={N} dh={dh} {layout} {family}")


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("Nq,Nk", [(1, 300), (77, 1031), (256, 77), (16, 64), (64, 16), (300, 1)])
@pytest.mark.parametrize("dh", (72, 88, 128))
def test_gpu_cross_attention(Nq, Nk, dh):
    q, k, v = make_qkv(2, Nq, Nk, 3, dh, BF16, "normal", "padded", device="cuda")
    with poison_outputs():
        out, lse = _cuda_op(q, k, v, 0.17)
    check_against_truth(out, lse, q, k, v, 0.17, f"Nq={Nq} Nk={Nk} dh={dh}")


@pytest.mark.gpu
@needs_cuda_kernel
def test_gpu_latte_temporal_shape_and_public_api():
    """N = 16 with B x H = 16384 (Latte temporal attention) through ops.attention."""
    from skipdit_fast import ops, use_backend

    q, k, v = make_qkv(1024, 16, 16, 16, 72, BF16, "normal", "fused", device="cuda")
    with use_backend(attention="cuda"), poison_outputs():
        out = ops.attention(q, k, v)
    sel = backends.select(backends.Query("attention", q.device, q.dtype, False, (72,)))
    assert sel.backend in ("cuda",)
    truth = reference.attention(q.double(), k.double(), v.double())  # fp64 on the GPU: large
    ref = attention_pt(q, k, v)
    assert_budget(out, ref, truth, atol=1e-3, what="latte temporal")


@pytest.mark.gpu
@needs_cuda_kernel
def test_gpu_unaligned_views_and_refusals():
    # Rows that are not 16-byte aligned (odd storage offset) are still served.
    base = rows((2 * 50 * 4 * 72 + 1,), "normal", BF16, "cuda")
    q = base[1:].view(2, 50, 4, 72)
    k, v = (rows((2, 90, 4, 72), "normal", BF16, "cuda") for _ in range(2))
    out, lse = _cuda_op(q, k, v, 72 ** -0.5)
    check_against_truth(out, lse, q, k, v, 72 ** -0.5, "unaligned q")
    q32 = q.float()
    with pytest.raises(TypeError, match="float16 and bfloat16"):
        _cuda_op(q32, k.float(), v.float(), 0.1)
    with pytest.raises(ValueError, match="head dim"):
        _cuda_op(q[..., :60], k[..., :60], v[..., :60], 0.1)


@pytest.mark.gpu
@needs_cuda_kernel
def test_gpu_opcheck():
    q, k, v = make_qkv(2, 40, 40, 2, 72, F16, device="cuda")
    torch.library.opcheck(torch.ops.skipdit.attention_forward.default, (q, k, v, 0.1),
                          test_utils=("test_schema", "test_faketensor"))
