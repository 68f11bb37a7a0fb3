"""The Triton skip_fuse (kernels/skip_fuse.py), forward and backward.

- Interpreter (CPU, TRITON_INTERPRET=1; fp16 and fp32 because Triton 3.8's interpreter
  gets bf16 dots wrong): outputs and all six gradients against fp64 truth with the
  DESIGN.md error budget, over the input families, odd sizes, D_out != D, strided and
  permuted x/skip views, bias / no bias, fp32 or activation-dtype norm parameters,
  NaN-poisoned outputs; the real GPU tile configs on masked shapes; limits; opcheck.
- GPU (@pytest.mark.gpu): the same checks on CUDA tensors for bf16/fp16/fp32 up to
  M = 4096, D = 1152, with autotuning, and determinism of the backward.
- Ahead of time (no GPU): every AOT_SPECS entry compiled for sm_80 and sm_90 with 0
  spills and tensor cores where expected (the last section).
"""

from __future__ import annotations

import pytest
import torch

import skipdit_fast
from skipdit_fast import ops
from skipdit_fast.ops import backends, fakes, reference, triton_ops
from skipdit_fast.ops.testing import poison_outputs
from helpers import FAMILIES, assert_budget, interpreter_dot_ok, rows, strided_like

GRAD_NAMES = ("x", "skip", "norm_weight", "norm_bias", "weight", "bias")


def _triton_unavailable() -> str | None:
    impl = backends.registry()["skip_fuse"]["triton"]
    return impl.available()


needs_triton = pytest.mark.skipif(_triton_unavailable() is not None,
                                  reason=f"triton backend unavailable: {_triton_unavailable()}")
interp_only = pytest.mark.skipif(not triton_ops.interpreting(),
                                 reason="interpreter tests (CPU tensors) run without a GPU")


def _K():
    from skipdit_fast.kernels import skip_fuse as K

    return K


# ---------------------------------------------------------------------------
# inputs and truth

def make_inputs(M, D, N, dtype, family="normal", *, bias=True, norm_dtype=torch.float32, layout="contiguous",
                device="cpu", lead=None):
    """x, skip [*lead, D] (lead defaults to (M,)) from `family`; norm params near (1, 0)
    with noise; weight scaled like nn.Linear's init; bias or None.
    layout: contiguous | strided (padded row stride) | permuted (3 stride groups)."""
    lead = (M,) if lead is None else lead
    if layout == "permuted":
        # [a, b, c, D] stored as [a, c, b, D]: three leading dims that do not collapse
        a, b, c = lead
        x = rows((a, c, b, D), family, dtype).permute(0, 2, 1, 3)
        skip = strided_like(rows((a, b, c, D), family, dtype), pad=8)
    else:
        x = rows((*lead, D), family, dtype)
        skip = rows((*lead, D), "normal" if family == "outlier" else family, dtype)
        if layout == "strided":
            x, skip = strided_like(x), strided_like(skip, pad=40)
    nw = (1 + 0.3 * torch.randn(2 * D, dtype=torch.float64)).to(norm_dtype)
    nb = (0.3 * torch.randn(2 * D, dtype=torch.float64)).to(norm_dtype)
    w = (torch.randn(N, 2 * D, dtype=torch.float64) / (2 * D) ** 0.5).to(dtype)
    b = (0.5 * torch.randn(N, dtype=torch.float64)).to(dtype) if bias else None
    out = [x, skip, nw, nb, w, b]
    return [t.to(device) if t is not None else None for t in out]


def _leaves(args, dtype=None, device=None):
    out = []
    for t in args:
        if t is None:
            out.append(None)
            continue
        u = t.detach()
        if dtype is not None:
            u = u.to(dtype)
        if device is not None:
            u = u.to(device)
        out.append(u.requires_grad_())
    return out


def run_reference(args, grad, dtype=None, device=None, eps=1e-6):
    """Output and gradients of reference.skip_fuse (fp64 truth when dtype=float64)."""
    leaves = _leaves(args, dtype, device)
    y = reference.skip_fuse(*leaves, eps)
    g = grad.to(y.dtype if dtype is not None else grad.dtype)
    if device is not None:
        g = g.to(device)
    y.backward(g)
    return y.detach(), [t.grad if t is not None else None for t in leaves]


def run_triton(args, grad, eps=1e-6):
    """ops.skip_fuse on the triton backend, outputs poisoned with NaN beforehand."""
    leaves = _leaves(args)
    with poison_outputs(), skipdit_fast.use_backend(skip_fuse="triton"):
        y = ops.skip_fuse(*leaves, eps)
        y.backward(grad)
    return y.detach(), [t.grad if t is not None else None for t in leaves]


ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def grad_atol(name: str, M: int, dtype: torch.dtype) -> float:
    """Parameter gradients are sums over M rows: their atol grows like sqrt(M)."""
    return ATOL[dtype] * (1.0 if name in ("x", "skip") else max(1.0, M ** 0.5))


def check_all(args, dtype, eps=1e-6, what="", with_backward=True):
    """Triton output (and gradients) against fp64 CPU truth, budget from the reference
    run in `dtype` on the inputs' device."""
    x = args[0]
    N = args[4].shape[0]
    grad = torch.randn(*x.shape[:-1], N, dtype=torch.float64).to(dtype).to(x.device)
    if with_backward:
        y, grads = run_triton(args, grad, eps)
    else:
        with poison_outputs(), skipdit_fast.use_backend(skip_fuse="triton"):
            y = ops.skip_fuse(*args, eps)
        grads = None
    assert y.dtype == dtype and y.is_contiguous() and y.shape == (*x.shape[:-1], N)
    y64, g64 = run_reference(args, grad, torch.float64, "cpu", eps)
    ylo, glo = run_reference(args, grad, None, None, eps)
    assert_budget(y.cpu(), ylo.cpu(), y64, atol=ATOL[dtype], what=f"{what} y")
    if not with_backward:
        return
    for name, g, gt, gl, a in zip(GRAD_NAMES, grads, g64, glo, args):
        if a is None:
            assert g is None
            continue
        # (autograd gives .grad the leaf's strides; kernel layouts: test_backward_layouts)
        assert g.dtype == a.dtype and g.shape == a.shape, name
        atol = grad_atol(name, x.numel() // x.shape[-1], dtype)
        assert_budget(g.cpu(), gl.cpu(), gt, atol=atol, what=f"{what} grad_{name}")


# ---------------------------------------------------------------------------
# interpreter: numerics

# (dtype, M, D, N, family, bias, norm dtype (None: activation dtype), layout)
CASES = [
    (torch.float16, 37, 72, 72, "normal", True, None, "contiguous"),
    (torch.float16, 300, 72, 72, "offset10", False, torch.float32, "strided"),
    (torch.float16, 37, 72, 136, "offset1000", True, torch.float32, "contiguous"),
    (torch.float16, 1, 72, 72, "outlier", True, None, "contiguous"),
    (torch.float32, 300, 72, 72, "normal", True, torch.float32, "contiguous"),
    (torch.float32, 37, 72, 72, "offset10", True, None, "strided"),
    (torch.float32, 1, 72, 200, "offset1000", False, torch.float32, "contiguous"),
    (torch.float32, 37, 72, 72, "outlier", False, None, "strided"),
    (torch.float16, 200, 384, 384, "offset1000", True, torch.float32, "strided"),
    (torch.float16, 37, 384, 200, "outlier", False, None, "contiguous"),
    (torch.float32, 37, 384, 384, "outlier", True, torch.float32, "contiguous"),
    (torch.float32, 1, 384, 384, "normal", True, None, "strided"),
]


@needs_triton
@interp_only
@pytest.mark.parametrize("dtype,M,D,N,family,bias,norm_dtype,layout", CASES,
                         ids=[f"{str(c[0])[6:]}-M{c[1]}-D{c[2]}-N{c[3]}-{c[4]}-{'b' if c[5] else 'nob'}-"
                              f"{'n32' if c[6] else 'nact'}-{c[7]}" for c in CASES])
def test_interpreter_fwd_bwd(dtype, M, D, N, family, bias, norm_dtype, layout):
    assert interpreter_dot_ok(dtype)
    args = make_inputs(M, D, N, dtype, family, bias=bias, norm_dtype=norm_dtype or dtype, layout=layout)
    check_all(args, dtype, what=f"{dtype} M={M} D={D} N={N} {family}")


@needs_triton
@interp_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_interpreter_permuted_and_1d(dtype):
    # x: a permuted [2, 5, 3, D] view (three stride groups); skip: padded rows
    args = make_inputs(None, 72, 80, dtype, "offset10", layout="permuted", lead=(2, 5, 3))
    assert not args[0].is_contiguous()
    check_all(args, dtype, what="permuted")
    # a single row given as a 1-D tensor
    args = make_inputs(None, 64, 64, dtype, "normal", lead=())
    check_all(args, dtype, what="1-D")


@needs_triton
@interp_only
def test_interpreter_eps_zero_and_large():
    args = make_inputs(37, 72, 72, torch.float32, "offset10")
    check_all(args, torch.float32, eps=0.0, what="eps=0")
    check_all(args, torch.float32, eps=0.5, what="eps=0.5")


@needs_triton
@interp_only
@pytest.mark.parametrize("family_name", ["16bit", "tf32", "ieee"])
def test_interpreter_real_configs(family_name):
    """Every GPU tile config (forward and grad_weight) on shapes that leave partial
    tiles in every dimension, with split-row grad_weight partials and several LN
    backward programs: the masking and reduction paths of the configs the GPU runs."""
    K = _K()
    dtype = torch.float16 if family_name == "16bit" else torch.float32
    M, D, N = 70, 72, 136
    args = make_inputs(M, D, N, dtype, "offset10")
    x, skip, nw, nb, w, b = args
    grad = torch.randn(M, N, dtype=torch.float64).to(dtype)
    y64, g64 = run_reference(args, grad, torch.float64)
    ylo, glo = run_reference(args, grad)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = family_name == "tf32"
    try:
        assert K._prec_kind(dtype)[0] == family_name
        for cfg in K.FWD_CONFIGS[family_name]:
            with K.force_configs(fwd=cfg), poison_outputs():
                y = K.skip_fuse(x, skip, nw, nb, w, b, 1e-6)
            assert_budget(y, ylo, y64, atol=ATOL[dtype], what=f"fwd {cfg}")
        for i, cfg in enumerate(K.DW_CONFIGS[family_name]):
            splits = 3 if i == 0 else 1  # split-row partials once per family
            with K.force_configs(dw=cfg, dw_splits=splits, ln_programs=3), poison_outputs():
                grads = K.skip_fuse_backward(grad, x, skip, nw, nb, w, b, 1e-6)
            for name, g, gt, gl in zip(GRAD_NAMES, grads, g64, glo):
                assert_budget(g, gl, gt, atol=grad_atol(name, M, dtype), what=f"{cfg} splits={splits} grad_{name}")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


@needs_triton
@interp_only
@pytest.mark.parametrize("bias", [False, True])
def test_interpreter_backward_layouts(bias):
    """Kernel outputs match the fake kernels exactly (shape, dtype, strides): grads of
    x/skip contiguous with x's shape (also for permuted x), parameters' grads in their
    dtypes, grad_bias an empty [0] tensor without bias."""
    K = _K()
    x, skip, nw, nb, w, b = make_inputs(None, 64, 64, torch.float16, layout="permuted", lead=(2, 3, 2),
                                        norm_dtype=torch.float32, bias=bias)
    g = torch.randn(2, 3, 2, 64).to(torch.float16)
    y = K.skip_fuse(x, skip, nw, nb, w, b, 1e-6)
    fy = fakes.skip_fuse_fake(x, skip, nw, nb, w, b, 1e-6)
    assert y.shape == fy.shape and y.dtype == fy.dtype and y.stride() == fy.stride()
    grads = K.skip_fuse_backward(g, x, skip, nw, nb, w, b, 1e-6)
    fake = fakes.skip_fuse_backward_fake(g, x, skip, nw, nb, w, b, 1e-6)
    for real, f in zip(grads, fake):
        assert real.shape == f.shape and real.dtype == f.dtype and real.stride() == f.stride()
    if not bias:
        assert grads[5].shape == (0,) and grads[5].dtype == w.dtype


# ---------------------------------------------------------------------------
# limits, layout, dispatch

@needs_triton
def test_lead_layout_groups():
    K = _K()
    x = torch.empty(4, 6, 8)
    assert K._lead_layout(x, x) == (1, 1, (8, 0, 0), (8, 0, 0))
    s = strided_like(torch.empty(4, 6, 8))  # rows padded to 32: still one group
    assert K._lead_layout(s, x) == (1, 1, (32, 0, 0), (8, 0, 0))
    p = torch.empty(2, 3, 5, 8).permute(0, 2, 1, 3)  # [2, 5, 3, 8], strides (120, 8, 40, 1)
    assert K._lead_layout(p, torch.empty(2, 5, 3, 8)) == (5, 3, (120, 8, 40), (120, 24, 8))
    t = torch.empty(3, 4, 8).transpose(0, 1)  # [4, 3, 8] strides (8, 32, 1): two groups
    assert K._lead_layout(t, torch.empty(4, 3, 8)) == (1, 3, (8, 0, 32), (24, 0, 8))
    assert K._lead_layout(torch.empty(1, 8), torch.empty(1, 8)) == (1, 1, (0, 0, 0), (0, 0, 0))
    # four groups: refused
    q = torch.empty(2, 3, 2, 3, 8).permute(1, 0, 3, 2, 4)
    assert K._lead_layout(q, q.contiguous()) is None


def _row_index_check(lay, t):
    """Offsets from the kernel formula equal the tensor's own row offsets."""
    n1, n2, (s0, s1, s2), _ = lay
    D = t.shape[-1]
    M = t.numel() // D
    base = t.storage_offset()
    idx = torch.arange(M)
    off = (idx // (n1 * n2)) * s0 + ((idx // n2) % n1) * s1 + (idx % n2) * s2
    ref = torch.as_strided(torch.arange(t.untyped_storage().nbytes() // t.element_size()), t.shape, t.stride(),
                           base)[..., 0].reshape(-1) - base
    assert torch.equal(off, ref)


@needs_triton
def test_lead_layout_offsets_match_torch():
    K = _K()
    cases = [torch.empty(4, 6, 8), torch.empty(2, 3, 5, 8).permute(0, 2, 1, 3),
             torch.empty(3, 4, 8).transpose(0, 1), strided_like(torch.empty(2, 3, 8)),
             torch.empty(2, 1, 3, 8)[:, :, ::2]]
    for t in cases:
        lay = K._lead_layout(t, t)
        _row_index_check(lay, t)


def test_limits_are_the_kernels():
    """The triton backend refuses what kernels/limits.py says the kernels cannot serve,
    with its reason; the launcher refuses the same shapes."""
    from skipdit_fast.kernels import limits

    assert limits.skip_fuse("cuda", torch.bfloat16, 1152, 1152) is None
    assert limits.skip_fuse("cuda", torch.bfloat16, 64, 8) is None
    assert limits.skip_fuse("cuda", torch.float16, 4096, 72) is None
    for D, N, word in ((60, 64, "D"), (4104, 64, "D"), (76, 64, "D"), (72, 100, "D_out")):
        why = limits.skip_fuse("cuda", torch.bfloat16, D, N)
        assert why is not None and word in why
    assert "interpreter" in limits.skip_fuse("cpu", torch.bfloat16, 64, 64)
    if triton_ops.interpreting() and triton_ops.triton_missing_reason() is None:  # CPU tensors: interpreter only
        q = backends.Query("skip_fuse", torch.device("cpu"), torch.float32, False, (60, 64))
        assert any("multiple of 8 in [64, 4096]" in r for r in backends.explain(q)["triton"])


@needs_triton
@interp_only
def test_explicit_request_refuses_with_reason():
    x, skip, nw, nb, w, b = make_inputs(4, 60, 64, torch.float32)
    with skipdit_fast.use_backend(skip_fuse="triton"):
        with pytest.raises(backends.BackendError, match="multiple of 8"):
            ops.skip_fuse(x, skip, nw, nb, w, b)
    with pytest.raises(ValueError, match="multiple of 8"):
        _K().skip_fuse(x, skip, nw, nb, w, b)
    x, skip, nw, nb, w, b = make_inputs(4, 64, 64, torch.float32)
    q = torch.empty(2, 3, 2, 3, 64).permute(1, 0, 3, 2, 4)
    with pytest.raises(ValueError, match="stride groups"):
        _K().skip_fuse(q, q.contiguous(), nw, nb, w, b)
    with pytest.raises(TypeError):
        _K().skip_fuse(x.double(), skip.double(), nw.double(), nb.double(), w.double(), b.double())


@needs_triton
def test_prec_kind_follows_allow_tf32():
    K = _K()
    prev = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert K._prec_kind(torch.float32) == ("ieee", "ieee")
        torch.backends.cuda.matmul.allow_tf32 = True
        assert K._prec_kind(torch.float32) == ("tf32", "tf32")
        assert K._prec_kind(torch.bfloat16)[0] == "16bit"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


@needs_triton
def test_m_bucket_and_pruning():
    K = _K()
    assert [K._m_bucket(m) for m in (1, 16, 17, 4096, 4097, 10 ** 7)] == [16, 16, 32, 4096, 8192, 65536]
    for fam, cfgs in K.FWD_CONFIGS.items():
        for mb in (16, 64, 512, 4096, 65536):
            kept = K._prune_fwd(cfgs, {"M_BUCKET": mb})
            assert kept, (fam, mb)
            assert all(c.kwargs["BLOCK_M"] <= max(mb, 32) for c in kept)
    big = K._prune_fwd(K.FWD_CONFIGS["16bit"], {"M_BUCKET": 4096})
    assert any(c.kwargs["BLOCK_N"] == 256 for c in big)


@needs_triton
@interp_only
def test_opcheck():
    torch.ops.skipdit.skip_fuse_triton  # registered by the backend registry
    x, skip, nw, nb, w, b = make_inputs(6, 64, 64, torch.float32, "offset10")
    args = [t.requires_grad_() for t in (x, skip, nw, nb, w, b)]
    torch.library.opcheck(torch.ops.skipdit.skip_fuse_triton.default, (*args, 1e-6))
    g = torch.randn(6, 64)
    torch.library.opcheck(torch.ops.skipdit.skip_fuse_backward_triton.default,
                          (g, x.detach(), skip.detach(), nw.detach(), nb.detach(), w.detach(), None, 1e-6))


# ---------------------------------------------------------------------------
# GPU
#
# Most GPU tests pin one real config per M class (K.force_configs) to keep the number
# of compilations small; test_gpu_autotuned_dit_xl runs the autotuner.

def gpu_configs(dtype: torch.dtype, M: int):
    K = _K()
    family = K._prec_kind(dtype)[0]
    fwd = K._prune_fwd(K.FWD_CONFIGS[family], {"M_BUCKET": K._m_bucket(M)})[0]
    dw = K._prune_dw(K.DW_CONFIGS[family], {"M_BUCKET": K._m_bucket(M)})[0]
    return K.force_configs(fwd=fwd, dw=dw)


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("M,D", [(1, 72), (37, 384), (4096, 72), (4096, 1152)])
def test_gpu_fwd_bwd(dtype, M, D):
    family = FAMILIES[(M + D) % len(FAMILIES)]
    layout = "strided" if M == 37 else "contiguous"
    args = make_inputs(M, D, D, dtype, family, bias=D != 384, norm_dtype=torch.float32 if M > 1 else dtype,
                       layout=layout, device="cuda")
    with gpu_configs(dtype, M):
        check_all(args, dtype, what=f"cuda {dtype} M={M} D={D} {family}")


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("family", FAMILIES)
def test_gpu_autotuned_dit_xl(family):
    """DiT-XL/2 shape in bf16 with autotuning, every family (offset1000 is where an
    epilogue-folded normalization fails), forward and backward."""
    args = make_inputs(4096, 1152, 1152, torch.bfloat16, family, device="cuda")
    check_all(args, torch.bfloat16, what=f"cuda bf16 DiT-XL {family}")


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("allow_tf32", [False, True])
def test_gpu_fp32_tf32_switch(allow_tf32):
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    try:
        args = make_inputs(512, 384, 384, torch.float32, "offset10", device="cuda")
        with gpu_configs(torch.float32, 512):
            check_all(args, torch.float32, what=f"cuda fp32 allow_tf32={allow_tf32}")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_permuted_layout_d_out(dtype):
    args = make_inputs(None, 1152, 576, dtype, "outlier", layout="permuted", lead=(2, 64, 8), device="cuda")
    with gpu_configs(dtype, 1024):
        check_all(args, dtype, what="cuda permuted")


@pytest.mark.gpu
@needs_triton
def test_gpu_backward_deterministic():
    K = _K()
    x, skip, nw, nb, w, b = make_inputs(4096, 1152, 1152, torch.bfloat16, "offset10", device="cuda")
    g = torch.randn(4096, 1152, device="cuda", dtype=torch.bfloat16)
    first = K.skip_fuse_backward(g, x, skip, nw, nb, w, b, 1e-6)
    second = K.skip_fuse_backward(g, x, skip, nw, nb, w, b, 1e-6)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


# ---------------------------------------------------------------------------
# ahead-of-time compilation (no GPU needed): every entry of kernels/skip_fuse.py
# AOT_SPECS (each autotune config of the forward and grad_weight GEMMs for every
# dtype it serves, the row-wise kernels at small, DiT-XL and maximum widths) compiled
# for sm_80 and sm_90 with the ptxas bundled with Triton: 0 bytes spilled, tensor-core
# MMAs where expected (wgmma for the sm_90 16-bit GEMMs with >= 64-row tiles),
# pipelined 16-byte cp.async loads in the forward GEMM. The compilation is shared with
# tests/test_kernels_aot.py (conftest.aot_results).

@pytest.fixture(scope="module")
def compiled(aot_results):
    """{(spec name, 80 | 90): record} for the skip_fuse kernels, from the session's
    AOT compilation of every kernel module (conftest.aot_results)."""
    out = {}
    for (module, name, arch), r in aot_results.items():
        if module == "skip_fuse":
            assert "error" not in r, (name, arch, r.get("error"))
            out[(name, 80 if arch == "sm_80" else 90)] = {
                **r, "wgmma": r["tensor_cores"] == "wgmma", "mma_sync": r["tensor_cores"] == "mma"}
    return out


def test_specs_cover_every_config():
    from skipdit_fast.kernels import skip_fuse as K

    names = [s.name for s in K.AOT_SPECS()]
    assert len(names) == len(set(names))
    for tag, table in (("fwd", K.FWD_CONFIGS), ("dw", K.DW_CONFIGS)):
        for family, configs in table.items():
            dtypes = ("fp16", "bf16") if family == "16bit" else ("fp32",)
            for dt in dtypes:
                got = [n for n in names if n.startswith(f"skip_fuse_{tag}_{dt}_{family}_") and n.endswith("_rows")]
                assert len(got) == len(configs), (tag, family, dt, got)
    for kernel in ("stats", "ln_bwd"):
        for dt in ("fp16", "bf16", "fp32"):
            assert sum(n.startswith(f"skip_fuse_{kernel}_{dt}_") for n in names) == 3


def test_no_spills(compiled):
    bad = [f"{n} sm_{a}: {r['spill_stores']} B stored / {r['spill_loads']} B loaded, {r['registers']} regs"
           for (n, a), r in compiled.items() if r["spill_stores"] or r["spill_loads"]]
    assert not bad, "spills:\n" + "\n".join(bad)


def test_tensor_cores(compiled):
    from skipdit_fast.kernels import skip_fuse as K

    for (name, arch), r in compiled.items():
        if not (name.startswith("skip_fuse_fwd_") or name.startswith("skip_fuse_dw_")) or "_ieee_" in name:
            continue
        # 16-bit and tf32 GEMMs run on tensor cores: wgmma on sm_90 when the tile has
        # >= 64 rows per warp group, mma.sync otherwise
        assert r["wgmma"] or r["mma_sync"], (name, arch)
        if arch == 80:
            assert r["mma_sync"] and not r["wgmma"], name
    big = K.FWD_CONFIGS["16bit"][0].kwargs
    name = f"skip_fuse_fwd_bf16_16bit_{big['BLOCK_M']}x{big['BLOCK_N']}x{big['BLOCK_K']}"
    hits = [r for (n, a), r in compiled.items() if n.startswith(name) and a == 90]
    assert hits and all(r["wgmma"] for r in hits), "sm_90 bf16 forward does not use wgmma"


def test_forward_loads_are_pipelined(compiled):
    """The forward GEMM's x/skip and W tiles arrive by 16-byte cp.async (the software
    pipeline), not by plain register loads."""
    for (name, arch), r in compiled.items():
        if name.startswith("skip_fuse_fwd_") and "_16bit_" in name:
            assert r["cp_async_16"] > 0, (name, arch)
