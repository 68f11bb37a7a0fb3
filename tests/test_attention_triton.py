"""Triton attention (kernels/attention.py) against fp64 truth, DESIGN.md section 4.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (fp16 and fp32:
the 3.8 interpreter's bf16 tl.dot is wrong) and are compiled ahead of time for sm_80
and sm_90; the @pytest.mark.gpu tests run the issue's full grid on a CUDA device.
"""

from __future__ import annotations

import os

import pytest
import torch

import skipdit_fast
from skipdit_fast.ops import reference, triton_ops
from skipdit_fast.ops.testing import poison_outputs
from helpers import assert_budget, attention_lse_pt, attention_pt, rows, strided_like

if triton_ops.triton_missing_reason() is not None:
    pytest.skip(triton_ops.triton_missing_reason(), allow_module_level=True)
attn = pytest.importorskip("skipdit_fast.kernels.attention")

FWD = torch.ops.skipdit.attention_forward_triton
BWD = torch.ops.skipdit.attention_backward_triton
GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"


# ---------------------------------------------------------------------------
# inputs

def _draw(B, Nq, Nk, H, Dh, family):
    """q, k, v in fp64 from one DESIGN.md family. q.k is kept inside fp16's range:
    offsets shift q, k and v by 10 std; 'outlier' puts the 500-std channel on k and
    v (q normal), 'offset1000' shifts v only (scores of 1000-std q and k overflow
    fp16 in any implementation)."""
    qf = {"offset10": "offset10"}.get(family, "normal")
    kf = {"offset10": "offset10", "outlier": "outlier"}.get(family, "normal")
    q = rows((B, Nq, H, Dh), qf, torch.float64)
    k = rows((B, Nk, H, Dh), kf, torch.float64)
    v = rows((B, Nk, H, Dh), family, torch.float64)
    return q, k, v


def make_inputs(B, Nq, Nk, H, Dh, dtype, layout, family="normal", device=DEV):
    """q, k, v in `dtype` on `device`, laid out as:
    contig: three contiguous tensors;
    fused:  views of one qkv projection output, qkv.view(B, N, 3, H, Dh).unbind(2)
            (q from its own tensor and k, v from a fused kv one when Nq != Nk);
    padded: rows padded by 8 elements (strides multiples of 8: the SU = 8 path);
    odd:    rows padded by 3 elements (strides not multiples of 8: the SU = 1 path)."""
    q, k, v = (t.to(dtype=dtype, device=device) for t in _draw(B, Nq, Nk, H, Dh, family))
    if layout == "contig":
        return q, k, v
    if layout == "fused":
        if Nq == Nk:
            qkv = torch.empty(B, Nq, 3 * H * Dh, dtype=dtype, device=device)
            views = qkv.view(B, Nq, 3, H, Dh).unbind(2)
            for dst, src in zip(views, (q, k, v)):
                dst.copy_(src)
            return views
        kv = torch.empty(B, Nk, 2 * H * Dh, dtype=dtype, device=device)
        kview, vview = kv.view(B, Nk, 2, H, Dh).unbind(2)
        kview.copy_(k)
        vview.copy_(v)
        return q, kview, vview
    if layout in ("padded", "odd"):
        return tuple(strided_like(t, 8 if layout == "padded" else 3) for t in (q, k, v))
    raise ValueError(layout)


def _truth_fwd(q, k, v, scale):
    qd, kd, vd = q.double(), k.double(), v.double()
    return reference.attention(qd, kd, vd, scale), reference.attention_lse(qd, kd, vd, scale)


def _grads(fn, q, k, v, g, scale, dtype=None):
    ins = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v)]
    fn(*ins, scale).backward(g.to(dtype or g.dtype))
    return [t.grad for t in ins]


_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 2e-6}


def _atol(dtype, v):
    """Absolute slack: a few units in the last place of the output's magnitude."""
    return _TOL[dtype] * max(1.0, v.abs().max().item())


def _grad_atols(q, k, v, g, scale, dtype):
    """Slack for dq, dk, dv: a few ulps of the truth's magnitude, plus 2 fp32 ulps of
    the sum of the absolute terms each gradient adds up. The second term matters
    where the softmax is one-hot (large logits): the exact gradients cancel to ~0
    there, the reference's too (its p is exactly 0 or 1), while any lse-recompute
    backward (this one, FlashAttention's) is left with fp32 rounding of
    dP - rowsum(dO * O), whose terms are |dO| |V| large."""
    qd, kd, vd, gd = (t.double().transpose(1, 2) for t in (q, k, v, g))  # BHSD
    p = torch.softmax(qd @ kd.transpose(-1, -2) * scale, -1)
    a = gd.abs() @ vd.abs().transpose(-1, -2)          # |terms| of dP
    e = p * (a + (p * a).sum(-1, keepdim=True))         # |terms| of dS
    units = (abs(scale) * (e @ kd.abs()), abs(scale) * (e.transpose(-1, -2) @ qd.abs()),
             p.transpose(-1, -2) @ gd.abs())
    slack = [2 * 2.0 ** -24 * u.max().item() for u in units]
    # The backward recomputes P = exp(S - lse) from S rounded in fp32 and the forward's
    # lse: where |S| is large (inputs with a large common offset, "offset10": |S| ~ 1600)
    # P's relative error is the rounding of S itself, ~ sqrt(Dh) fp32 ulps of
    # |q| . |k| * scale (a Dh-term dot), which the reference (one consistent S for
    # numerator and normalizer) does not have. It reaches dV as P^T |dO|.
    s_abs = abs(scale) * (qd.abs() @ kd.abs().transpose(-1, -2))
    ps = p * s_abs * q.shape[-1] ** 0.5 * 2.0 ** -24
    slack[2] += (ps.transpose(-1, -2) @ gd.abs()).max().item()
    slack[0] += abs(scale) * ((ps * (a + (p * a).sum(-1, keepdim=True))) @ kd.abs()).max().item()
    slack[1] += abs(scale) * ((ps * (a + (p * a).sum(-1, keepdim=True))).transpose(-1, -2) @ qd.abs()).max().item()
    return slack


def check_case(B, Nq, Nk, H, Dh, dtype, layout, family, scale, backward=True, device=DEV):
    q, k, v = make_inputs(B, Nq, Nk, H, Dh, dtype, layout, family, device)
    s = Dh ** -0.5 if scale is None else scale
    what = f"B{B} Nq{Nq} Nk{Nk} H{H} Dh{Dh} {dtype} {layout} {family} scale={scale}"
    with poison_outputs():
        out, lse = FWD(q, k, v, s)
    assert out.is_contiguous() and out.shape == q.shape and out.dtype == dtype
    assert lse.is_contiguous() and lse.shape == (B, H, Nq) and lse.dtype == torch.float32
    truth, truth_lse = _truth_fwd(q, k, v, s)
    assert_budget(out, attention_pt(q, k, v, s), truth, atol=_atol(dtype, v), what=f"out {what}")
    assert_budget(lse, attention_lse_pt(q, k, v, s), truth_lse,
                  atol=_atol(dtype, truth_lse), what=f"lse {what}")
    if not backward:
        return
    g = rows((B, Nq, H, Dh), "normal", torch.float64).to(dtype=dtype, device=q.device)
    with poison_outputs():
        dq, dk, dv = BWD(g, q, k, v, out, lse, s)
    gt = _grads(reference.attention, q, k, v, g, s, torch.float64)
    gl = _grads(attention_pt, q, k, v, g, s)
    extra = _grad_atols(q, k, v, g, s, dtype)
    for name, got, ref_lowp, tr, x, ex in zip(("dq", "dk", "dv"), (dq, dk, dv), gl, gt, (q, k, v), extra):
        assert got.is_contiguous() and got.shape == x.shape and got.dtype == dtype, name
        assert_budget(got, ref_lowp, tr, atol=_TOL[dtype] * tr.abs().max().item() + ex, what=f"{name} {what}")


# ---------------------------------------------------------------------------
# interpreter / CPU tests (fp16 and fp32)

# (B, Nq, Nk, H, Dh, dtype, layout, family, scale): every head dim of the issue,
# N in {1, 16, 77, 256, ragged}, Nq != Nk both ways, all four layouts and families,
# default / explicit / negative scales, the short (N <= 64) and blocked paths.
F16, F32 = torch.float16, torch.float32
CASES = [
    (2, 16, 16, 4, 72, F16, "fused", "normal", None),      # Latte temporal (short path)
    (1, 77, 77, 2, 72, F16, "fused", "offset10", None),    # blocked, ragged tail
    (1, 256, 256, 1, 72, F16, "contig", "outlier", None),  # several full key blocks
    (1, 77, 77, 2, 88, F16, "padded", "outlier", None),
    (2, 1, 1, 2, 64, F16, "contig", "normal", None),       # N = 1
    (1, 130, 130, 2, 96, F16, "odd", "offset1000", 0.3),
    (1, 100, 100, 1, 128, F16, "fused", "normal", None),
    (1, 40, 40, 1, 256, F16, "padded", "normal", None),    # short path, widest head
    (1, 77, 77, 1, 256, F32, "contig", "offset10", None),
    (1, 77, 77, 2, 32, F16, "contig", "normal", -0.25),    # negative scale, blocked
    (1, 50, 50, 2, 32, F32, "fused", "outlier", -0.2),     # negative scale, short
    (2, 77, 16, 2, 72, F16, "fused", "normal", None),      # cross: Nq > 64 > Nk
    (1, 16, 77, 2, 88, F16, "contig", "offset10", None),   # cross: Nq < 64 < Nk
    (1, 1, 130, 2, 128, F32, "odd", "normal", None),       # one query, many keys
    (1, 33, 20, 3, 40, F32, "contig", "normal", 1.0),      # generic head dim, short
    (1, 70, 70, 1, 8, F16, "padded", "normal", None),      # smallest head dim
    (1, 90, 65, 1, 136, F32, "fused", "normal", None),     # generic dim > 128 (bwd: 256 chunk)
]


# On a GPU machine these run as test_gpu_* on CUDA tensors instead (there the fp32
# cases would compile Triton's slow FMA dots, which backends.LIMITS refuses anyway).
interpreter_only = pytest.mark.skipif(GPU, reason="interpreter grid; CUDA runs the test_gpu_* grid")


@interpreter_only
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-Nq{c[1]}-Nk{c[2]}-H{c[3]}-Dh{c[4]}-"
                         f"{str(c[5])[6:]}-{c[6]}-{c[7]}-s{c[8]}")
def test_forward_backward(case):
    check_case(*case)


@interpreter_only
@pytest.mark.slow
def test_long_ragged_sequence():
    """N = 1031: 16 full key blocks and a 7-row tail, forward and backward."""
    check_case(1, 1031, 1031, 1, 72, F16, "fused", "normal", None)


def test_public_op_autograd_and_default_scale():
    """skipdit_fast.ops.attention on the triton backend: the composite op (scale
    None -> Dh**-0.5), the registered autograd, strided qkv views."""
    q, k, v = make_inputs(1, 77, 77, 2, 72, F16, "fused")
    ins = [t.detach().requires_grad_() for t in (q, k, v)]
    with skipdit_fast.use_backend(attention="triton"):
        out = skipdit_fast.ops.attention(*ins)
    g = torch.randn_like(out)
    out.backward(g)
    truth = reference.attention(q.double(), k.double(), v.double())
    assert_budget(out.detach(), attention_pt(q, k, v), truth, atol=2e-3, what="public out")
    gt = _grads(reference.attention, q, k, v, g, None, torch.float64)
    gl = _grads(attention_pt, q, k, v, g, None)
    for name, x, a, b in zip("qkv", ins, gl, gt):
        assert_budget(x.grad, a, b, atol=_atol(F16, b), what=f"public d{name}")


# the dtype of the small API tests: fp32 in the interpreter, fp16 on a GPU (where the
# Triton backend refuses fp32), at head dim 72 so a GPU run reuses the grid's kernels
API_DT = F16 if GPU else F32


def test_expanded_grad_out():
    """out.sum().backward() hands the backward a stride-0 gradient."""
    q, k, v = (t.requires_grad_() for t in make_inputs(1, 16, 16, 2, 72, API_DT, "contig"))
    with skipdit_fast.use_backend(attention="triton"):
        skipdit_fast.ops.attention(q, k, v).sum().backward()
    ones = torch.ones(1, 16, 2, 72, dtype=API_DT, device=q.device)
    gt = _grads(reference.attention, q, k, v, ones, None, torch.float64)
    gl = _grads(attention_pt, q, k, v, ones, None)
    extra = _grad_atols(q, k, v, ones, 72 ** -0.5, API_DT)
    for x, a, b, ex in zip((q, k, v), gl, gt, extra):
        assert_budget(x.grad, a, b, atol=_TOL[API_DT] * b.abs().max().item() + ex, what="expanded grad")


def test_opcheck_forward():
    """Schema, fake kernel, autograd registration and aot_dispatch_dynamic of the
    forward op on strided qkv views."""
    q, k, v = (t.detach().requires_grad_() for t in make_inputs(1, 16, 16, 2, 72, API_DT, "fused"))
    torch.library.opcheck(FWD, (q, k, v, 0.25))


def test_opcheck_backward():
    q, k, v = make_inputs(1, 16, 16, 2, 72, API_DT, "fused")
    out, lse = FWD(q, k, v, 0.3)
    torch.library.opcheck(BWD, (torch.randn_like(out), q, k, v, out, lse, 0.3))


def test_rejects_bad_inputs():
    q, k, v = make_inputs(1, 8, 8, 1, 72, API_DT, "contig")
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        attn.attention_forward(q.double(), k.double(), v.double(), 0.25)
    with pytest.raises(ValueError, match="head dim"):
        FWD(q[..., :12], k[..., :12], v[..., :12], 0.25)
    out, lse = FWD(q, k, v, 0.25)
    with pytest.raises(ValueError, match="lse must have shape"):
        BWD(out, q, k, v, out, lse[:, :, :4], 0.25)


def test_head_dim_chunks():
    """The chunk splits the kernels use, and that they never pad more than the MMA
    granularity needs (16 for the contraction, 8 for the output width)."""
    assert attn.contraction_chunks(72) == (64, 16, 0) and attn.output_chunks(72) == (64, 8, 0)
    assert attn.contraction_chunks(88) == (64, 32, 0) and attn.output_chunks(88) == (64, 16, 8)
    for dh in (64, 96, 128):
        assert sum(attn.contraction_chunks(dh)) == dh and sum(attn.output_chunks(dh)) == dh
    for dh in range(8, 257, 8):
        kc, oc = attn.contraction_chunks(dh), attn.output_chunks(dh)
        for chunks, gran in ((kc, 16), (oc, 8)):
            parts = [c for c in chunks if c]
            assert all(c & (c - 1) == 0 and c >= gran for c in parts), (dh, chunks)
            assert sum(parts) >= dh
            if dh <= 128 and dh in attn.FAST_HEAD_DIMS:
                assert sum(parts) - dh < gran, (dh, chunks)


def test_configs_cover_every_head_dim():
    for arch in (80, 90):
        for dt in (F16, torch.bfloat16, F32):
            for dh in range(8, 257, 8):
                kd = sum(attn.contraction_chunks(dh))
                for c in attn.fwd_configs(arch, dt, kd) + attn.bwd_configs(arch, dt, kd):
                    assert c.block_m >= 16 and c.block_n >= 16 and c.num_warps in (4, 8)


# ---------------------------------------------------------------------------
# ahead-of-time compilation for sm_80 / sm_90 (no GPU needed)

# The CI subset of AOT_SPECS (AotSpec.ci; the full sweep with SKIPDIT_FULL_AOT=1),
# compiled once per session by conftest.aot_results.
_SPECS = [s for s in attn.AOT_SPECS() if s.ci or os.environ.get("SKIPDIT_FULL_AOT") == "1"]


@pytest.mark.slow
@pytest.mark.parametrize("spec", _SPECS, ids=lambda s: s.name)
def test_aot_compiles_without_spills(spec, aot_results):
    (arch,) = spec.archs
    rec = aot_results[("attention", spec.name, "sm_90a" if arch >= 90 else f"sm_{arch}")]
    assert "error" not in rec, rec["error"]
    rec = {**rec, "wgmma": rec["tensor_cores"] == "wgmma", "mma_sync": rec["tensor_cores"] == "mma",
           "rows": spec.constexprs.get("BLOCK_N" if "dkdv" in spec.name else "BLOCK_M", 0)}
    assert rec["spill_stores"] == 0 and rec["spill_loads"] == 0, rec
    # tensor cores: wgmma for the blocked kernels on sm_90 (their resident tile has the
    # 64+ rows of a warpgroup MMA), mma.sync for the rest
    if "delta" not in spec.name:
        wants_wgmma = arch >= 90 and "short" not in spec.name and rec["rows"] >= 64
        assert rec["wgmma" if wants_wgmma else "mma_sync"], rec
    # 16-byte vector loads: the SU stride scaling and the pointer alignment took effect
    assert rec["vector_loads"], rec
    assert rec["shared"] <= (227 if arch >= 90 else 163) * 1024, rec


def test_aot_specs_list_the_real_configs():
    specs = attn.AOT_SPECS()
    names = {s.name for s in specs}
    assert len(names) == len(specs)
    for arch in (80, 90):
        for dt in ("fp16", "bf16"):
            for dh in attn.FAST_HEAD_DIMS:
                tag = f"{dt}_d{dh}_sm{arch}"
                for kind in ("attn_fwd_", "attn_fwd_short_", "attn_bwd_dkdv_", "attn_bwd_dq_",
                             "attn_bwd_short_", "attn_bwd_delta_"):
                    assert any(n.startswith(kind) and tag in n for n in names), (kind, tag)


# ---------------------------------------------------------------------------
# GPU (real kernels on a CUDA device)

GPU_HEAD_DIMS = (32, 64, 72, 88, 96, 128, 256)
GPU_NS = (1, 16, 77, 256, 1031)


@pytest.mark.gpu
@pytest.mark.parametrize("dh", GPU_HEAD_DIMS)
@pytest.mark.parametrize("n", GPU_NS)
def test_gpu_grid(dh, n):
    """The issue's grid, B x H up to 64, strided (fused qkv, padded rows) and
    contiguous inputs, forward and backward: bf16 at every head dim, fp16 too at the
    chunked ones (72, 88). Layouts keep 16-byte aligned rows here so that each
    (head dim, dtype) compiles once per kernel (~55 compiles in all);
    test_gpu_unaligned_strides covers the other specialization."""
    i, j = GPU_HEAD_DIMS.index(dh), GPU_NS.index(n)
    B, H = (2, 32) if n <= 256 else (2, 4)
    layout = ("fused", "contig", "padded")[(i + j) % 3]
    family = ("normal", "offset10", "outlier", "offset1000")[(i + 2 * j) % 4]
    for dtype in (torch.bfloat16, torch.float16) if dh in (72, 88) else (torch.bfloat16,):
        check_case(B, n, n, H, dh, dtype, layout, family, None, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("n", (16, 300))
def test_gpu_unaligned_strides(n):
    """Row strides that are not multiples of 8 elements (SU = 1: no 16-byte loads)."""
    check_case(2, n, n, 4, 72, torch.bfloat16, "odd", "normal", -0.1, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("nq,nk", [(1024, 77), (77, 1024), (16, 300), (300, 16)])
def test_gpu_cross_attention(nq, nk):
    for dh in (72, 88):
        check_case(2, nq, nk, 4, dh, torch.bfloat16, "fused", "normal", 0.1, device="cuda")


@pytest.mark.gpu
def test_gpu_temporal_shape():
    """Latte temporal attention: N = 16, B x H = 16384, Dh = 72."""
    check_case(1024, 16, 16, 16, 72, torch.bfloat16, "fused", "normal", None, backward=True, device="cuda")


@pytest.mark.gpu
def test_gpu_deterministic_backward():
    q, k, v = make_inputs(2, 1031, 1031, 4, 72, torch.bfloat16, "fused", device="cuda")
    out, lse = FWD(q, k, v, 0.1)
    g = torch.randn_like(out)
    first = BWD(g, q, k, v, out, lse, 0.1)
    for _ in range(3):
        again = BWD(g, q, k, v, out, lse, 0.1)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_int64_offsets():
    """Batch offsets past 2^31 elements: three batches 1.1e9 elements apart in one
    7 GB buffer (the kernels compute b * stride_b in int64)."""
    stride_b = 1_100_000_000
    H, Dh, N = 2, 72, 100
    try:
        buf = torch.empty(2 * stride_b + N * 3 * H * Dh, dtype=torch.bfloat16, device="cuda")
    except torch.OutOfMemoryError:
        pytest.skip("needs ~7 GB of GPU memory")
    qkv = torch.as_strided(buf, (3, N, 3, H, Dh), (stride_b, 3 * H * Dh, H * Dh, Dh, 1))
    qkv.copy_(torch.randn(3, N, 3, H, Dh, device="cuda"))
    for n in (40, N):  # short path, blocked path
        q, k, v = (t[:, :n] for t in qkv.unbind(2))
        out, lse = FWD(q, k, v, Dh ** -0.5)
        truth = reference.attention(q.double(), k.double(), v.double())
        assert_budget(out, attention_pt(q, k, v), truth, atol=1.6e-2, what=f"int64 offsets N={n}")
        g = torch.randn_like(out)
        dq, dk, dv = BWD(g, q, k, v, out, lse, Dh ** -0.5)
        gt = _grads(reference.attention, q, k, v, g, Dh ** -0.5, torch.float64)
        gl = _grads(attention_pt, q, k, v, g, Dh ** -0.5)
        for got, a, b in zip((dq, dk, dv), gl, gt):
            assert_budget(got, a, b, atol=_atol(torch.bfloat16, b), what=f"int64 offsets grad N={n}")


def test_backend_refuses_interpreted_bf16():
    if GPU:
        pytest.skip("CPU tensors run interpreted only without a GPU")
    q, k, v = (torch.randn(1, 8, 1, 16, dtype=torch.bfloat16) for _ in range(3))
    with skipdit_fast.use_backend(attention="triton"):
        with pytest.raises(skipdit_fast.BackendError, match="bf16 tl.dot"):
            skipdit_fast.ops.attention(q, k, v)


@pytest.mark.gpu
def test_gpu_backend_refuses_fp32():
    q, k, v = (torch.randn(1, 8, 1, 16, device="cuda") for _ in range(3))
    with skipdit_fast.use_backend(attention="triton"):
        with pytest.raises(skipdit_fast.BackendError, match="fp32"):
            skipdit_fast.ops.attention(q, k, v)


def test_autotune_choice(monkeypatch):
    """SKIPDIT_FAST_TILE_AUTOTUNE=1: every candidate is timed once per key, the fastest
    is kept, and candidates that do not fit the device are skipped."""
    import triton
    from triton.runtime.errors import OutOfResources

    cands = (attn.Cfg(128, 128, 8, 3), attn.Cfg(128, 64, 8, 3), attn.Cfg(64, 64, 4, 3))
    launched = []

    def launch(c):
        launched.append(c)
        if c.block_n == 128:
            raise OutOfResources(300000, 232448, "shared memory")

    def fake_bench(fn, warmup, rep):
        fn()
        return {64: 2.0}.get(launched[-1].block_m, 1.0)

    cfgs = pytest.importorskip("skipdit_fast.kernels._attention_configs")
    monkeypatch.setattr(cfgs, "_AUTOTUNE", True)
    monkeypatch.setattr(cfgs, "_TUNED", {})
    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    assert attn._choose(("k",), cands, launch) == cands[1]
    n = len(launched)
    assert attn._choose(("k",), cands, launch) == cands[1] and len(launched) == n  # cached
    monkeypatch.setattr(cfgs, "_AUTOTUNE", False)
    assert attn._choose(("other",), cands, launch) == cands[0]
