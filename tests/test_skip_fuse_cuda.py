"""CUDA C++ skip_fuse (csrc/cuda/skip_fuse.cu): forward and all gradients against fp64
CPU truth with the DESIGN.md section 4 error budget, plus checks that need no GPU: the
tile index math replayed on the CPU (tests/emu/skip_fuse_tiles.cpp), the kernels
themselves on the CPU emulator (tests/emu/skip_fuse_kernels.cpp), the ptxas report
(0 spills on every built arch) and the backend limits."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import skipdit_fast
from skipdit_fast.ops import backends, native, reference
from skipdit_fast.ops.testing import poison_outputs
import emu_build
from helpers import FAMILIES, assert_budget, rows, strided_like

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ("skip_fuse_fwd_kernel", "skip_fuse_row_stats_kernel", "skip_fuse_normalize_rows_kernel",
           "skip_fuse_ln_bwd_kernel", "skip_fuse_col_sums_kernel")


# ---------------------------------------------------------------------------
# CPU-side checks

@pytest.fixture(scope="module")
def tiles_emu():
    return emu_build.load("skip_fuse_tiles")


@pytest.fixture(scope="module")
def kernels_emu():
    return emu_build.load("skip_fuse_kernels")


# (dtype: 1 bf16 / 2 fp32, M, N, D, pad_x, pad_s, pad_w, bias, seed)
TILE_CASES = [
    # ragged M (2 tiles, 37 rows in the last), ragged N (136 = 128 + 8), K = 144 not a
    # multiple of the k-tile, x/skip boundary inside a k-tile, padded strides
    (1, 165, 136, 72, 24, 8, 16, 1, 1),
    (2, 165, 136, 72, 24, 8, 16, 1, 2),
    # one row, D spanning several k-tiles, no bias
    (1, 1, 64, 200, 0, 8, 0, 0, 3),
    (2, 1, 64, 200, 0, 8, 0, 0, 4),
    # exact tile multiples
    (1, 128, 128, 64, 0, 0, 0, 1, 5),
    (2, 128, 256, 32, 8, 0, 8, 1, 6),
]


@pytest.mark.parametrize("case", TILE_CASES, ids=lambda c: f"{'bf16' if c[0] == 1 else 'tf32'}-M{c[1]}N{c[2]}D{c[3]}")
def test_tile_index_math_emulation(tiles_emu, case):
    """Replays the forward GEMM's copy / normalize / ldmatrix / mma / epilogue index math
    on the CPU against the PTX fragment tables (bf16 m16n8k16 and tf32 m16n8k8)."""
    fails, log = emu_build.run_checks(tiles_emu.emu_skip_fuse_tiles, *case)
    assert fails == 0 and log.startswith("ok"), log


# (check, dtype: 0 fp16 / 1 bf16 / 2 fp32, arguments after the dtype)
KERNEL_CASES = [
    # forward GEMM (M, D, N, pad, bias, seed): ragged M (2 tiles), ragged N (128 + 8),
    # K = 144 (ragged last k-tile, x/skip boundary inside a k-tile), padded row strides;
    # one row; exact tiles. Each also checks the row statistics.
    ("forward", 1, (165, 72, 136, 8, 1, 1)),
    ("forward", 0, (165, 72, 136, 24, 1, 2)),
    ("forward", 2, (165, 72, 136, 8, 1, 3)),
    ("forward", 1, (1, 200, 64, 0, 0, 4)),
    ("forward", 2, (1, 200, 64, 16, 0, 5)),
    ("forward", 1, (128, 64, 128, 0, 1, 6)),
    # normalize_rows (M, D, seed)
    ("normalize_rows", 1, (37, 72, 7)),
    ("normalize_rows", 2, (37, 200, 8)),
    # LayerNorm backward (M, D, grid, seed): several rows per CTA (both reduction slots),
    # D not a multiple of 256 chunks, partial sums over several CTAs
    ("ln_backward", 1, (37, 72, 5, 9)),
    ("ln_backward", 0, (20, 1152, 3, 10)),
    ("ln_backward", 2, (37, 200, 4, 11)),
]
SCHEDULES = {"copies-at-wait": 1, "copies-at-wait-warp-by-warp": 3}


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("case", KERNEL_CASES,
                         ids=lambda c: f"{c[0]}-{('fp16', 'bf16', 'fp32')[c[1]]}-" + "x".join(map(str, c[2])))
def test_kernels_on_emulator(kernels_emu, case, schedule):
    """Runs the kernel source itself (csrc/cuda/skip_fuse_kernels.cuh) on the CPU
    emulator: barriers are real, warp collectives and cp.async follow the PTX ISA
    (cp.async lands only at its wait, its destination poisoned until then), every memory
    access is bounds-checked; warps in near lockstep or one by one. Checks row
    statistics, the forward GEMM (bf16, fp16, tf32; ragged tiles, strided rows),
    normalize_rows and the LayerNorm backward with its column sums against double
    references."""
    check, dtype, args = case
    fn = getattr(kernels_emu, f"emu_skip_fuse_{check}")
    fails, log = emu_build.run_checks(fn, dtype, *args, SCHEDULES[schedule])
    assert fails == 0 and "FAIL" not in log and log.count("ok") >= 2, log


def _built_archs() -> list[str]:
    archs = native.build_info().get("cuda_archs") or ""
    return ["sm_" + a.split("-")[0] for a in archs.split(",") if a.endswith("-real")]


def test_ptxas_no_spills():
    """Every skip_fuse kernel was compiled for every real arch of the build, without
    spills or stack frames (the register budget of the forward GEMM is fixed by
    __launch_bounds__: 2 CTAs/SM on sm_90, 1 on sm_80)."""
    if not native.available() or not native.build_info().get("cuda"):
        pytest.skip("native library built without CUDA")
    archs = _built_archs()
    assert archs, native.build_info()
    report = [r for r in native.ptxas_report() if any(k in r["kernel"] for k in KERNELS)]
    for kernel in KERNELS:
        for arch in archs:
            recs = [r for r in report if kernel in r["kernel"] and r["arch"] == arch]
            assert recs, f"{kernel} not in the ptxas report for {arch}"
            for r in recs:
                assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
                assert r["stack"] == 0, r
    fwd = [r for r in report if "skip_fuse_fwd_kernel" in r["kernel"]]
    assert len(fwd) == 3 * len(archs)  # bf16, fp16, fp32 (tf32) per arch
    for r in fwd:
        if r["arch"].startswith("sm_90"):
            assert r["registers"] <= 128, r  # two 256-thread CTAs per SM


@pytest.mark.parametrize("D, D_out, why", [(100, 64, "D=100"), (8200, 64, "D=8200"),
                                           (64, 100, "D_out=100"), (1152, 1152, None),
                                           (72, 136, None), (8, 8, None)])
def test_limits(D, D_out, why):
    reason = native.cuda_limits("skip_fuse", torch.device("cpu"), torch.bfloat16, (D, D_out))
    if why is None:
        assert reason is None
    else:
        assert reason is not None and why in reason


# ---------------------------------------------------------------------------
# GPU tests

TOL = {  # atol of the error budget, relative to the largest |truth|
    torch.bfloat16: 1e-3,
    torch.float16: 2e-4,
    "tf32": 2e-4,
    torch.float32: 2e-6,
}


def _dtype(mode):
    return torch.float32 if mode in ("tf32", torch.float32) else mode


@pytest.fixture
def cuda_backend():
    if not native.has_kernel("skip_fuse", "CUDA"):
        pytest.fail(f"no CUDA skip_fuse kernel in the native library: {native.build_info()}")
    prev = torch.backends.cuda.matmul.allow_tf32
    with skipdit_fast.use_backend(skip_fuse="cuda"):
        yield
    torch.backends.cuda.matmul.allow_tf32 = prev


def _make(lead, D, D_out, mode, family, *, norm_f32=True, bias=True, strided=False,
          requires_grad=False):
    dtype = _dtype(mode)
    dev = "cuda"
    # One row of the family over the concatenation, so that z = [x | skip] has the
    # family's offset (mean 1000 std) or outlier channel as a whole.
    z = rows((*lead, 2 * D), family, dtype, dev)
    x, skip = z[..., :D].contiguous(), z[..., D:].contiguous()
    pdt = torch.float32 if norm_f32 else dtype
    nw = (1 + 0.2 * torch.randn(2 * D, dtype=torch.float64)).to(pdt).to(dev)
    nb = (0.2 * torch.randn(2 * D, dtype=torch.float64)).to(pdt).to(dev)
    w = (torch.randn(D_out, 2 * D, dtype=torch.float64) / (2 * D) ** 0.5).to(dtype).to(dev)
    b = (0.5 * torch.randn(D_out, dtype=torch.float64)).to(dtype).to(dev) if bias else None
    if strided:
        x, skip = strided_like(x, pad=24), strided_like(skip, pad=8)
        w = strided_like(w, pad=16)
    args = [x, skip, nw, nb, w, b]
    if requires_grad:
        for t in args:
            if t is not None:
                t.requires_grad_(True)
    return args


def _leaves(args):
    return [t for t in args if t is not None]


def _to_truth(args):
    out = []
    for t in args:
        out.append(None if t is None else t.detach().cpu().double().requires_grad_(t.requires_grad))
    return out


# (leading dims, D, D_out)
FWD_SHAPES = [((1,), 72, 72), ((37,), 384, 384), ((37,), 72, 136), ((1, 37), 1152, 384),
              ((2, 2048), 1152, 1152)]
MODES = [torch.bfloat16, torch.float16, "tf32", torch.float32]


def _mode_id(m):
    return m if isinstance(m, str) else str(m).replace("torch.", "")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES, ids=_mode_id)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lead, D, D_out", FWD_SHAPES)
def test_forward(cuda_backend, mode, family, lead, D, D_out):
    torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
    M = 1
    for s in lead:
        M *= s
    strided = D_out != D  # cover strided views on the odd shapes
    args = _make(lead, D, D_out, mode, family, norm_f32=(M != 37), bias=(D != 72 or M == 1),
                 strided=strided)
    with poison_outputs():
        out = skipdit_fast.ops.skip_fuse(*args)
    assert out.dtype == args[0].dtype and out.shape == (*lead, D_out) and out.is_contiguous()
    truth = reference.skip_fuse(*_to_truth(args))
    ref_lowp = reference.skip_fuse(*args)  # same dtype, same device, same TF32 setting
    atol = TOL[mode] * truth.abs().max().item()
    assert_budget(out.cpu(), ref_lowp.cpu(), truth, atol=atol, what=f"y {_mode_id(mode)} {family}")


BWD_CASES = [  # (leading dims, D, D_out, norm params fp32, bias, strided)
    ((1,), 72, 72, True, True, False),
    ((37,), 72, 136, False, False, True),
    ((37,), 384, 384, True, True, True),
    ((4096,), 1152, 1152, True, True, False),
    ((3, 11), 1152, 384, False, True, False),
]


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES, ids=_mode_id)
@pytest.mark.parametrize("family", ["normal", "offset1000", "outlier"])
@pytest.mark.parametrize("lead, D, D_out, norm_f32, bias, strided", BWD_CASES)
def test_backward(cuda_backend, mode, family, lead, D, D_out, norm_f32, bias, strided):
    torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
    args = _make(lead, D, D_out, mode, family, norm_f32=norm_f32, bias=bias, strided=strided,
                 requires_grad=True)
    dtype = _dtype(mode)
    gy = torch.randn((*lead, D_out), dtype=torch.float64).to(dtype).cuda()
    with poison_outputs():
        out = skipdit_fast.ops.skip_fuse(*args)
        grads = torch.autograd.grad(out, _leaves(args), gy)
    targs = _to_truth(args)
    truth = torch.autograd.grad(reference.skip_fuse(*targs), _leaves(targs), gy.cpu().double())
    rargs = [None if t is None else t.detach().clone().requires_grad_(True) for t in args]
    ref = torch.autograd.grad(reference.skip_fuse(*rargs), _leaves(rargs), gy)
    names = ["grad_x", "grad_skip", "grad_norm_weight", "grad_norm_bias", "grad_weight", "grad_bias"]
    for name, g, r, t, a in zip(names, grads, ref, truth, _leaves(args)):
        assert g.dtype == a.dtype and g.shape == a.shape, name
        atol = TOL[mode] * t.abs().max().item()
        assert_budget(g.cpu(), r.cpu(), t, atol=atol, what=f"{name} {_mode_id(mode)} {family}")


@pytest.mark.gpu
def test_backward_deterministic(cuda_backend):
    args = _make((2, 300), 384, 384, torch.bfloat16, "outlier", requires_grad=True)
    gy = torch.randn(2, 300, 384, device="cuda", dtype=torch.bfloat16)
    g1 = torch.autograd.grad(skipdit_fast.ops.skip_fuse(*args), _leaves(args), gy)
    g2 = torch.autograd.grad(skipdit_fast.ops.skip_fuse(*args), _leaves(args), gy)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_grad_weight_row_chunks(cuda_backend):
    """M large enough that grad_weight is accumulated over several chunks of h
    (64 MiB of bf16 rows at D = 1152 is 14563 rows)."""
    args = _make((15000,), 1152, 64, torch.bfloat16, "offset10", requires_grad=True)
    gy = torch.randn(15000, 64, dtype=torch.float64).to(torch.bfloat16).cuda()
    gw = torch.autograd.grad(skipdit_fast.ops.skip_fuse(*args), [args[4]], gy)[0]
    targs = _to_truth(args)
    tw = torch.autograd.grad(reference.skip_fuse(*targs), [targs[4]], gy.cpu().double())[0]
    rargs = [t.detach().clone().requires_grad_(True) for t in args]
    rw = torch.autograd.grad(reference.skip_fuse(*rargs), [rargs[4]], gy)[0]
    assert_budget(gw.cpu(), rw.cpu(), tw, atol=1e-3 * tw.abs().max().item(), what="grad_weight")


@pytest.mark.gpu
def test_refusals(cuda_backend):
    x = torch.randn(4, 100, device="cuda", dtype=torch.bfloat16)
    nw = torch.ones(200, device="cuda")
    nb = torch.zeros(200, device="cuda")
    w = torch.randn(64, 200, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(backends.BackendError, match="multiple of 8"):
        skipdit_fast.ops.skip_fuse(x, x, nw, nb, w)
    with pytest.raises(ValueError, match="multiple of 8"):
        torch.ops.skipdit.skip_fuse(x, x, nw, nb, w, None, 1e-6)
    xd = torch.randn(4, 64, device="cuda", dtype=torch.float64)
    with pytest.raises(TypeError, match="float16, bfloat16 and float32"):
        torch.ops.skipdit.skip_fuse(xd, xd, torch.ones(128, device="cuda", dtype=torch.float64),
                                    torch.zeros(128, device="cuda", dtype=torch.float64),
                                    torch.randn(8, 128, device="cuda", dtype=torch.float64), None, 1e-6)


@pytest.mark.gpu
def test_misaligned_views(cuda_backend):
    """Views that start off a 16-byte boundary are copied, not misread."""
    base = rows((37, 392), "offset10", torch.bfloat16, "cuda")
    x, skip = base[:, 1:385], base[:, 3:387]  # 2- and 6-byte offsets
    nw = torch.ones(768, device="cuda")
    nb = torch.zeros(768, device="cuda")
    wb = torch.randn(64, 769, device="cuda", dtype=torch.bfloat16)
    w = wb[:, 1:]
    out = skipdit_fast.ops.skip_fuse(x, skip, nw, nb, w)
    truth = reference.skip_fuse(*_to_truth([x, skip, nw, nb, w]))
    assert_budget(out.cpu(), reference.skip_fuse(x, skip, nw, nb, w).cpu(), truth,
                  atol=1e-3 * truth.abs().max().item(), what="misaligned")


@pytest.mark.gpu
def test_opcheck(cuda_backend):
    args = _make((2, 19), 72, 136, torch.bfloat16, "normal", requires_grad=True)
    torch.library.opcheck(torch.ops.skipdit.skip_fuse.default, (*args, 1e-6))


SANITIZE_SCRIPT = textwrap.dedent("""
    import torch, skipdit_fast
    from tests.helpers import rows, strided_like
    torch.backends.cuda.matmul.allow_tf32 = True
    with skipdit_fast.use_backend(skip_fuse="cuda"):
        for dt in (torch.bfloat16, torch.float32):
            for M, D, N in ((1, 72, 8), (37, 72, 136), (130, 200, 264)):
                x = strided_like(rows((M, D), "normal", dt, "cuda"), 8).requires_grad_(True)
                s = rows((M, D), "outlier", dt, "cuda").requires_grad_(True)
                nw = torch.ones(2 * D, device="cuda", requires_grad=True)
                nb = torch.zeros(2 * D, device="cuda", requires_grad=True)
                w = (torch.randn(N, 2 * D, device="cuda") * 0.05).to(dt).requires_grad_(True)
                b = torch.zeros(N, device="cuda", dtype=dt, requires_grad=True)
                y = skipdit_fast.ops.skip_fuse(x, s, nw, nb, w, b)
                y.sum().backward()
    torch.cuda.synchronize()
    print("done")
""")


@pytest.mark.gpu
@pytest.mark.skipif(os.environ.get("SKIPDIT_SANITIZE") != "1",
                    reason="compute-sanitizer run is opt-in (SKIPDIT_SANITIZE=1; it takes minutes)")
def test_compute_sanitizer_memcheck():
    """Ragged M / N / K tiles and strided rows under compute-sanitizer memcheck: no
    out-of-bounds or misaligned accesses in the skip_fuse kernels."""
    san = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    if not os.path.exists(san):
        pytest.fail("SKIPDIT_SANITIZE=1 but compute-sanitizer was not found")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run([san, "--tool", "memcheck", "--error-exitcode", "3", sys.executable, "-c",
                        SANITIZE_SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "done" in r.stdout, out[-4000:]
    m = re.search(r"ERROR SUMMARY: (\d+) error", out)
    assert m is not None and m.group(1) == "0", out[-4000:]


def _median_ms(fn, iters=20, warmup=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


@pytest.mark.gpu
@pytest.mark.parametrize("M, D", [(4096, 1152), (16384, 1152)])
def test_forward_speed(cuda_backend, M, D, capsys):
    """bf16 forward against eager, torch.compile of the eager code and the bare cuBLAS
    GEMM (M, 2D) x (2D, D): prints the ratios of DESIGN.md section 6 (targets: >= 2x
    eager, >= 1.3x compile, <= 1.15x GEMM) and asserts only that fusion beats eager."""
    x, skip, nw, nb, w, b = _make((M,), D, D, torch.bfloat16, "normal")
    h = torch.randn(M, 2 * D, device="cuda", dtype=torch.bfloat16)
    op = torch.ops.skipdit.skip_fuse.default
    compiled = torch.compile(reference.skip_fuse, dynamic=False)
    t = {
        "cuda": _median_ms(lambda: op(x, skip, nw, nb, w, b, 1e-6)),
        "eager": _median_ms(lambda: reference.skip_fuse(x, skip, nw, nb, w, b)),
        "compile": _median_ms(lambda: compiled(x, skip, nw, nb, w, b)),
        "gemm": _median_ms(lambda: torch.nn.functional.linear(h, w, b)),
    }
    tflops = 2 * M * 2 * D * D / (t["cuda"] * 1e-3) / 1e12
    with capsys.disabled():
        print(f"\nskip_fuse cuda bf16 M={M} D={D} on {torch.cuda.get_device_name()}: "
              + ", ".join(f"{k} {v * 1e3:.1f} us" for k, v in t.items())
              + f"; {tflops:.0f} TFLOP/s; vs eager {t['eager'] / t['cuda']:.2f}x, "
              f"vs compile {t['compile'] / t['cuda']:.2f}x, vs GEMM {t['cuda'] / t['gemm']:.2f}x time")
    assert t["cuda"] < t["eager"], t
