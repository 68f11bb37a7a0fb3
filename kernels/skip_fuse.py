"""skip_fuse in Triton: y = linear(layer_norm(cat([x, skip], -1)), weight, bias).

Forward (two launches):
  1. _skip_fuse_row_stats_kernel: per-row mean and rstd of z = cat(x, skip) in fp32, [M] each. The
     whole row sits in registers; the mean is refined by a second centered pass and
     the variance is the centered sum of squares (never E[z^2] - E[z]^2 on raw values).
     One HBM read of x and skip, which also leaves them in L2 for the GEMM.
  2. _skip_fuse_fwd_kernel: a GEMM over K = 2D in two halves, one per base pointer (x, then
     skip; no concatenation). The prologue of every K step loads a [BLOCK_M, BLOCK_K]
     tile, normalizes it in fp32 with the row statistics, applies gamma/beta, rounds
     to the operand dtype and feeds tl.dot; bias is added in the epilogue. Nothing is
     folded into the epilogue (DESIGN.md: that fails in bf16 on offset rows).

Backward (grad_out dy [M, D_out]):
  1. dh = dy @ W (torch.matmul, [M, 2D] in the operand dtype, as the reference does).
  2. _skip_fuse_ln_bwd_kernel: persistent over row tiles; recomputes the row statistics (and
     writes them for step 3), writes grad_x and grad_skip directly from the two halves
     of the LayerNorm input gradient, and accumulates per-program partial sums of
     grad_norm_weight / grad_norm_bias ([P, 2D] fp32).
  3. _skip_fuse_dw_kernel: grad_weight = dy^T @ h with h normalized in the GEMM prologue from x
     and skip (h is never materialized), optionally split over rows into fp32
     partials.
  4. _skip_fuse_col_sums_kernel: fixed-order (deterministic) column sums: the partials of
     steps 2 and 3, and grad_bias from dy (row chunks, then the chunks), cast to the
     parameters' dtypes.

Leading dims of x and skip may be strided (last dim contiguous): rows are addressed
through up to three (size, stride) groups, after merging the dims that collapse.
Lengths are runtime values (M is not specialized); configs are autotuned per
(M bucket, D, D_out, dtype).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from skipdit_fast.ops.checks import check_skip_fuse, check_skip_fuse_backward, new_output

from . import limits

# ---------------------------------------------------------------------------
# Triton helpers


@triton.jit
def _row_offsets(rows, n1, n2, s0, s1, s2):
    """Element offset of each logical row: rows = ((i0 * n1) + i1) * n2 + i2."""
    r = rows.to(tl.int64)
    return (r // (n1 * n2)) * s0 + ((r // n2) % n1) * s1 + (r % n2) * s2


@triton.jit
def _row_stats(x, s, cmask, D, eps):
    """Mean and rstd of each row of cat(x, s) ([R, BLOCK_D] fp32 tiles, columns past
    D zero): a first mean, then the centered sums sum(d) and sum(d^2) with
    d = z - mean1 (corrected two-pass; stable for rows far from zero mean)."""
    n = 2.0 * D
    m1 = (tl.sum(x, axis=1) + tl.sum(s, axis=1)) / n
    dx = tl.where(cmask[None, :], x - m1[:, None], 0.0)
    ds = tl.where(cmask[None, :], s - m1[:, None], 0.0)
    c = (tl.sum(dx, axis=1) + tl.sum(ds, axis=1)) / n
    q = (tl.sum(dx * dx, axis=1) + tl.sum(ds * ds, axis=1)) / n
    var = tl.maximum(q - c * c, 0.0)
    rstd = tl.div_rn(1.0, tl.sqrt_rn(var + eps))
    return m1 + c, rstd


# ---------------------------------------------------------------------------
# forward


@triton.jit(do_not_specialize=["M"])
def _skip_fuse_row_stats_kernel(x_ptr, s_ptr, mean_ptr, rstd_ptr, M, D, n1, n2, sx0, sx1, sx2, ss0, ss1, ss2, eps,
                  BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ALIGNED: tl.constexpr):
    D = (D // 8) * 8  # D % 8 == 0 (backends.LIMITS): lets the column masks vectorize
    pid = tl.program_id(0)
    rr = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rr < M
    rows = tl.where(rmask, rr, 0)
    x_rows = x_ptr + _row_offsets(rows, n1, n2, sx0, sx1, sx2)
    s_rows = s_ptr + _row_offsets(rows, n1, n2, ss0, ss1, ss2)
    if ALIGNED:  # see _skip_fuse_fwd_kernel
        x_rows = tl.multiple_of(x_rows, [16])
        s_rows = tl.multiple_of(s_rows, [16])
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    x = tl.load(x_rows[:, None] + cols[None, :], mask=cmask[None, :], other=0.0).to(tl.float32)
    s = tl.load(s_rows[:, None] + cols[None, :], mask=cmask[None, :], other=0.0).to(tl.float32)
    mean, rstd = _row_stats(x, s, cmask, D, eps)
    tl.store(mean_ptr + rr, mean, mask=rmask)
    tl.store(rstd_ptr + rr, rstd, mask=rmask)


@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _skip_fuse_fwd_kernel(x_ptr, s_ptr, mean_ptr, rstd_ptr, g_ptr, b_ptr, w_ptr, bias_ptr, y_ptr,
                M, D, N, n1, n2, sx0, sx1, sx2, ss0, ss1, ss2, stride_w, M_BUCKET,
                HAS_BIAS: tl.constexpr, ALIGNED: tl.constexpr, PREC: tl.constexpr, EVEN_K: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped ("swizzled") program order: GROUP_M row tiles share each W column tile
    # while it is in L2, and the x/skip rows of a group stay in L2 across columns.
    D = (D // 8) * 8  # D, N % 8 == 0 (backends.LIMITS): aligned masks and W[:, D:]
    N = (N // 8) * 8
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.where(rm < M, rm, 0)  # tail rows re-read row 0; never stored
    cols_n = tl.where(rn < N, rn, 0)
    mean = tl.load(mean_ptr + rows)
    rstd = tl.load(rstd_ptr + rows)
    rk = tl.arange(0, BLOCK_K)
    # Row base pointers ([rows] tensors), hinted 16-byte aligned when the launcher
    # checked it: without the hint the loads are not vectorized and not pipelined
    # (cp.async needs >= 4 aligned bytes) unless Triton happened to specialize every
    # stride as divisible by 16. Hints on scalar arguments are ignored by Triton, so
    # they go on the pointer tensors.
    x_rows = x_ptr + _row_offsets(rows, n1, n2, sx0, sx1, sx2)
    s_rows = s_ptr + _row_offsets(rows, n1, n2, ss0, ss1, ss2)
    wx_rows = w_ptr + cols_n.to(tl.int64) * stride_w  # W[:, :D]
    ws_rows = wx_rows + D  # W[:, D:]
    if ALIGNED:
        x_rows = tl.multiple_of(x_rows, [16])
        s_rows = tl.multiple_of(s_rows, [16])
        wx_rows = tl.multiple_of(wx_rows, [16])
        ws_rows = tl.multiple_of(ws_rows, [16])

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for half in tl.static_range(2):
        if half == 0:
            a_rows = x_rows
            w_rows = wx_rows
        else:
            a_rows = s_rows
            w_rows = ws_rows
        for k0 in range(0, D, BLOCK_K):
            kk = k0 + rk
            kw = half * D + kk
            if EVEN_K:
                a = tl.load(a_rows[:, None] + kk[None, :])
                w = tl.load(w_rows[None, :] + kk[:, None])
                gam = tl.load(g_ptr + kw).to(tl.float32)
                bet = tl.load(b_ptr + kw).to(tl.float32)
            else:
                km = kk < D
                a = tl.load(a_rows[:, None] + kk[None, :], mask=km[None, :], other=0.0)
                w = tl.load(w_rows[None, :] + kk[:, None], mask=km[:, None], other=0.0)
                gam = tl.load(g_ptr + kw, mask=km, other=0.0).to(tl.float32)
                bet = tl.load(b_ptr + kw, mask=km, other=0.0).to(tl.float32)
            h = (a.to(tl.float32) - mean[:, None]) * rstd[:, None] * gam[None, :] + bet[None, :]
            acc = tl.dot(h.to(w.dtype), w, acc, input_precision=PREC)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols_n).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(rm < M)[:, None] & (rn < N)[None, :])


# ---------------------------------------------------------------------------
# backward


@triton.jit(do_not_specialize=["M"])
def _skip_fuse_ln_bwd_kernel(dh_ptr, x_ptr, s_ptr, g_ptr, dx_ptr, ds_ptr, mean_ptr, rstd_ptr, pg_ptr, pb_ptr,
                   M, D, n1, n2, sx0, sx1, sx2, ss0, ss1, ss2, eps,
                   BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ALIGNED: tl.constexpr):
    """LayerNorm backward over z = cat(x, skip), written straight into grad_x and
    grad_skip. dh is the gradient of the LayerNorm output ([M, 2D], contiguous).
    Each program walks row tiles pid, pid + P, ... and keeps its grad_norm_weight /
    grad_norm_bias partial sums in registers until the end."""
    D = (D // 8) * 8  # D % 8 == 0 (backends.LIMITS): lets the column masks vectorize
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    two_d = 2 * D
    gx = tl.load(g_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    gs = tl.load(g_ptr + D + cols, mask=cmask, other=0.0).to(tl.float32)
    acc_gx = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    acc_gs = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    acc_bx = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    acc_bs = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for t in range(pid, tl.cdiv(M, BLOCK_R), nprog):
        rr = t * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rr < M
        rows = tl.where(rmask, rr, 0)
        r64 = rows.to(tl.int64)
        x_rows = x_ptr + _row_offsets(rows, n1, n2, sx0, sx1, sx2)
        s_rows = s_ptr + _row_offsets(rows, n1, n2, ss0, ss1, ss2)
        # dh, grad_x, grad_skip are this launcher's contiguous buffers; D % 8 == 0
        dh_rows = tl.multiple_of(dh_ptr + r64 * two_d, [16])[:, None]
        dx_rows = tl.multiple_of(dx_ptr + r64 * D, [16])[:, None]
        ds_rows = tl.multiple_of(ds_ptr + r64 * D, [16])[:, None]
        if ALIGNED:  # see _skip_fuse_fwd_kernel
            x_rows = tl.multiple_of(x_rows, [16])
            s_rows = tl.multiple_of(s_rows, [16])
        x = tl.load(x_rows[:, None] + cols[None, :], mask=cmask[None, :], other=0.0).to(tl.float32)
        s = tl.load(s_rows[:, None] + cols[None, :], mask=cmask[None, :], other=0.0).to(tl.float32)
        mean, rstd = _row_stats(x, s, cmask, D, eps)
        tl.store(mean_ptr + rr, mean, mask=rmask)
        tl.store(rstd_ptr + rr, rstd, mask=rmask)
        xh = tl.where(cmask[None, :], (x - mean[:, None]) * rstd[:, None], 0.0)
        sh = tl.where(cmask[None, :], (s - mean[:, None]) * rstd[:, None], 0.0)
        m2 = rmask[:, None] & cmask[None, :]
        dhx = tl.load(dh_rows + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        dhs = tl.load(dh_rows + D + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        gdx = dhx * gx[None, :]
        gds = dhs * gs[None, :]
        c1 = (tl.sum(gdx, axis=1) + tl.sum(gds, axis=1)) / two_d
        c2 = (tl.sum(gdx * xh, axis=1) + tl.sum(gds * sh, axis=1)) / two_d
        dxv = (gdx - c1[:, None] - xh * c2[:, None]) * rstd[:, None]
        dsv = (gds - c1[:, None] - sh * c2[:, None]) * rstd[:, None]
        tl.store(dx_rows + cols[None, :], dxv.to(dx_ptr.dtype.element_ty), mask=m2)
        tl.store(ds_rows + cols[None, :], dsv.to(ds_ptr.dtype.element_ty), mask=m2)
        acc_gx += dhx * xh  # rows past M have dh = 0
        acc_gs += dhs * sh
        acc_bx += dhx
        acc_bs += dhs
    out = pid.to(tl.int64) * two_d + cols
    tl.store(pg_ptr + out, tl.sum(acc_gx, axis=0), mask=cmask)
    tl.store(pg_ptr + out + D, tl.sum(acc_gs, axis=0), mask=cmask)
    tl.store(pb_ptr + out, tl.sum(acc_bx, axis=0), mask=cmask)
    tl.store(pb_ptr + out + D, tl.sum(acc_bs, axis=0), mask=cmask)


@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _skip_fuse_dw_kernel(dy_ptr, x_ptr, s_ptr, mean_ptr, rstd_ptr, g_ptr, b_ptr, dw_ptr,
               M, D, N, n1, n2, sx0, sx1, sx2, ss0, ss1, ss2, stride_dy, SPLITS, M_BUCKET,
               ALIGNED: tl.constexpr, PREC: tl.constexpr, EVEN_K: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr):
    """grad_weight[:, cols] = dy^T @ h[:, cols] for one [BLOCK_N, BLOCK_K] tile, the
    reduction over rows split into SPLITS slices (program_id(1)); h is normalized in
    the prologue from x or skip (the tile lies in one half). dw_ptr is [SPLITS, N, 2D]
    (fp32 partials, or grad_weight itself when SPLITS == 1)."""
    D = (D // 8) * 8  # D, N % 8 == 0 (backends.LIMITS): aligned masks
    N = (N // 8) * 8
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    num_kd = tl.cdiv(D, BLOCK_K)
    pid_n = pid % num_n
    pid_k = pid // num_n
    is_skip = pid_k >= num_kd
    kt = tl.where(is_skip, pid_k - num_kd, pid_k)
    a_ptr = tl.where(is_skip, s_ptr, x_ptr)
    t0 = tl.where(is_skip, ss0, sx0)
    t1 = tl.where(is_skip, ss1, sx1)
    t2 = tl.where(is_skip, ss2, sx2)
    half_off = tl.where(is_skip, D, 0)

    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    kcol = kt * BLOCK_K + tl.arange(0, BLOCK_K)  # column within the half
    kmask = kcol < D
    gam = tl.load(g_ptr + half_off + kcol, mask=kmask, other=0.0).to(tl.float32)
    bet = tl.load(b_ptr + half_off + kcol, mask=kmask, other=0.0).to(tl.float32)

    rows_per = tl.cdiv(tl.cdiv(M, SPLITS), BLOCK_M) * BLOCK_M
    m_lo = pid_s * rows_per
    m_hi = tl.minimum(M, m_lo + rows_per)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    rb = tl.arange(0, BLOCK_M)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        rm = m0 + rb
        rmask = rm < m_hi
        rows = tl.where(rmask, rm, 0)
        r64 = rows.to(tl.int64)
        dy_rows = dy_ptr + r64 * stride_dy
        # _row_offsets, inlined (nested jit calls are slow in the interpreter)
        a_rows = a_ptr + ((r64 // (n1 * n2)) * t0 + ((r64 // n2) % n1) * t1 + (r64 % n2) * t2)
        if ALIGNED:  # see _skip_fuse_fwd_kernel
            dy_rows = tl.multiple_of(dy_rows, [16])
            a_rows = tl.multiple_of(a_rows, [16])
        dy = tl.load(dy_rows[:, None] + rn[None, :], mask=rmask[:, None] & nmask[None, :], other=0.0)
        if EVEN_K:
            a = tl.load(a_rows[:, None] + kcol[None, :])
        else:
            a = tl.load(a_rows[:, None] + kcol[None, :], mask=kmask[None, :], other=0.0)
        mean = tl.load(mean_ptr + rows)
        rstd = tl.load(rstd_ptr + rows)
        h = (a.to(tl.float32) - mean[:, None]) * rstd[:, None] * gam[None, :] + bet[None, :]
        acc = tl.dot(tl.trans(dy), h.to(dy.dtype), acc, input_precision=PREC)

    dw_ptrs = dw_ptr + (pid_s.to(tl.int64) * N + rn)[:, None] * (2 * D) + (half_off + kcol)[None, :]
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=nmask[:, None] & kmask[None, :])


@triton.jit(do_not_specialize=["R", "ROWS_PER"])
def _skip_fuse_col_sums_kernel(in_ptr, out_ptr, R, L, stride, ROWS_PER, BLOCK_R: tl.constexpr, BLOCK: tl.constexpr):
    """out[c, j] = sum of in[r, j] over rows r in [c * ROWS_PER, (c + 1) * ROWS_PER) ∩ [0, R),
    c = program_id(1), in fp32, cast to out's dtype. The order of the additions is
    fixed (deterministic). Reduces the per-program partials, and gives grad_bias
    from dy."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    c = tl.program_id(1)
    mask = offs < L
    r0 = c * ROWS_PER
    r1 = tl.minimum(R, r0 + ROWS_PER)
    rr = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R, BLOCK), dtype=tl.float32)
    for t in range(r0, r1, BLOCK_R):
        r = t + rr
        ptrs = in_ptr + r.to(tl.int64)[:, None] * stride + offs[None, :]
        acc += tl.load(ptrs, mask=(r < r1)[:, None] & mask[None, :], other=0.0).to(tl.float32)
    tl.store(out_ptr + c.to(tl.int64) * L + offs, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------
# configs
#
# Tile shapes were chosen from the ahead-of-time register / shared-memory reports
# (kernels/aot.py) so that every one compiles without spills for both sm_80 and sm_90:
#   128x256x32, 8 warps, 4 stages: the large-M workhorse on H100 (two consumer warp
#     groups, 88 KB of smem; 128x256x64 spills on sm_80 because the prologue keeps the
#     A tile in registers, so K steps of 32);
#   128x128x64 / 64x128x64 / 64x64x64: more CTAs for mid-size M or small D_out;
#   32x64x128: M <= 32 (one skinny row tile, long K steps).
# The autotuner picks among those whose BLOCK_M suits the M bucket.

def _cfg(bm, bn, bk, warps, stages, group=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group},
                         num_warps=warps, num_stages=stages)


FWD_CONFIGS = {
    "16bit": [_cfg(128, 256, 32, 8, 4), _cfg(128, 128, 64, 8, 3), _cfg(64, 128, 64, 4, 4),
              _cfg(64, 64, 64, 4, 4), _cfg(32, 64, 128, 4, 3)],
    "tf32": [_cfg(128, 128, 32, 8, 3), _cfg(64, 64, 32, 4, 3), _cfg(32, 64, 32, 4, 2)],
    "ieee": [_cfg(64, 64, 32, 4, 3), _cfg(32, 64, 32, 4, 3)],
}


def _dw_cfg(bn, bk, bm, warps, stages):
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_M": bm}, num_warps=warps, num_stages=stages)


DW_CONFIGS = {
    "16bit": [_dw_cfg(128, 128, 64, 8, 3), _dw_cfg(64, 128, 64, 4, 3), _dw_cfg(128, 64, 32, 4, 3)],
    "tf32": [_dw_cfg(128, 128, 32, 8, 2), _dw_cfg(64, 64, 32, 4, 3)],
    "ieee": [_dw_cfg(64, 64, 32, 8, 2), _dw_cfg(32, 64, 32, 4, 2)],
}

# Configs used when the kernels run in Triton's interpreter (CPU tensors): large tiles
# keep the interpreter fast; tests force other configs through force_configs().
_INTERP_FWD = _cfg(64, 128, 128, 4, 1)
_INTERP_DW = _dw_cfg(128, 128, 64, 4, 1)
_INTERP_ROWS = 64  # rows per program of the row-wise kernels in the interpreter


def _prune_fwd(configs, named_args, **kwargs):
    mb = named_args["M_BUCKET"]
    smallest = min(c.kwargs["BLOCK_M"] for c in configs)
    keep = [c for c in configs if c.kwargs["BLOCK_M"] <= max(mb, smallest)]
    if mb >= 1024:  # plenty of row tiles: skinny tiles only waste W traffic
        keep = [c for c in keep if c.kwargs["BLOCK_M"] >= 64] or keep
    return keep


def _prune_dw(configs, named_args, **kwargs):
    mb = named_args["M_BUCKET"]
    smallest = min(c.kwargs["BLOCK_M"] for c in configs)
    return [c for c in configs if c.kwargs["BLOCK_M"] <= max(mb, smallest)]


def _even_k(args):
    return args["D"] % args["BLOCK_K"] == 0


_KEY = ["M_BUCKET", "D", "N"]  # + the dtypes of the tensor arguments (added by triton)
_fwd_heur = triton.heuristics({"EVEN_K": _even_k})(_skip_fuse_fwd_kernel)
_dw_heur = triton.heuristics({"EVEN_K": _even_k})(_skip_fuse_dw_kernel)
_FWD_TUNED = {k: triton.autotune(v, key=_KEY, prune_configs_by={"early_config_prune": _prune_fwd})(_fwd_heur)
              for k, v in FWD_CONFIGS.items()}
_DW_TUNED = {k: triton.autotune(v, key=_KEY, prune_configs_by={"early_config_prune": _prune_dw})(_dw_heur)
             for k, v in DW_CONFIGS.items()}

_FORCED: dict = {}


@contextlib.contextmanager
def force_configs(fwd: triton.Config | None = None, dw: triton.Config | None = None,
                  dw_splits: int | None = None, ln_programs: int | None = None):
    """Run with fixed configs instead of autotuning (tests, benchmarks of one config)."""
    saved = dict(_FORCED)
    _FORCED.update({k: v for k, v in (("fwd", fwd), ("dw", dw), ("dw_splits", dw_splits),
                                      ("ln_programs", ln_programs)) if v is not None})
    try:
        yield
    finally:
        _FORCED.clear()
        _FORCED.update(saved)


# ---------------------------------------------------------------------------
# launchers

def _lead_layout(x: torch.Tensor, skip: torch.Tensor):
    """(n1, n2, x strides (s0, s1, s2), skip strides) addressing row
    r = (i0 * n1 + i1) * n2 + i2 at i0*s0 + i1*s1 + i2*s2, after merging the leading
    dims that collapse in both tensors; None if more than three groups remain."""
    groups = []  # outer -> inner: [size, stride_x, stride_skip]
    for size, a, b in zip(x.shape[:-1], x.stride()[:-1], skip.stride()[:-1]):
        if size == 1:
            continue
        if groups and groups[-1][1] == a * size and groups[-1][2] == b * size:
            groups[-1] = [groups[-1][0] * size, a, b]
        else:
            groups.append([size, a, b])
    if len(groups) > 3:
        return None
    one = [1, 0, 0]
    if len(groups) <= 1:
        groups = [groups[0] if groups else one, one, one]
    elif len(groups) == 2:
        groups = [groups[0], one, groups[1]]
    (_, x0, k0), (n1, x1, k1), (n2, x2, k2) = groups
    return n1, n2, (x0, x1, x2), (k0, k1, k2)


def _aligned(*tensors) -> bool:
    """All base pointers 16-byte aligned and all strides (but the last) multiples of
    16 bytes: lets the kernels use 16-byte vector and cp.async loads."""
    for t in tensors:
        esz = t.element_size()
        if t.data_ptr() % 16 or any((st * esz) % 16 for st in t.stride()[:-1]):
            return False
    return True


def _m_bucket(M: int) -> int:
    return min(max(16, triton.next_power_of_2(M)), 1 << 16)


def _prec_kind(dtype: torch.dtype) -> tuple[str, str]:
    """(config family, tl.dot input_precision)."""
    if dtype == torch.float32:
        if torch.backends.cuda.matmul.allow_tf32:
            return "tf32", "tf32"
        return "ieee", "ieee"
    return "16bit", "tf32"  # input_precision is ignored for 16-bit operands


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # interpreter: a few programs, so multi-program paths are exercised


def _check(op: str, x: torch.Tensor, skip: torch.Tensor, D: int, N: int):
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{op}: dtype {x.dtype} not supported by the Triton kernels (float16, bfloat16, float32)")
    why = limits.skip_fuse(x.device.type, x.dtype, D, N)
    if why:
        raise ValueError(f"{op}: {why}")
    lay = _lead_layout(x, skip)
    if lay is None:
        raise ValueError(f"{op}: the leading dims of x/skip form more than three non-collapsible stride "
                         "groups; make them contiguous first")
    return lay


def _launch(tuned, heur, forced_key: str, interp_cfg, grid, args, meta, device):
    cfg = _FORCED.get(forced_key)
    if cfg is None and device.type != "cuda":
        cfg = interp_cfg
    if cfg is None:
        tuned[grid](*args, **meta)
    else:
        heur[grid](*args, **meta, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _rowwise_meta(D: int, elems: int, device: torch.device):
    """(BLOCK_R, BLOCK_D, num_warps) of the row-wise kernels: whole rows in registers,
    about `elems` elements per tile."""
    block_d = triton.next_power_of_2(D)
    block_r = max(1, elems // block_d) if device.type == "cuda" else _INTERP_ROWS
    return block_r, block_d, min(16, max(4, block_r * block_d // 256))


def _row_stats_launch(x, skip, lay, M, D, eps, aligned):
    n1, n2, sx, ss = lay
    mean = new_output((M,), dtype=torch.float32, device=x.device)
    rstd = new_output((M,), dtype=torch.float32, device=x.device)
    block_r, block_d, warps = _rowwise_meta(D, 2048, x.device)
    _skip_fuse_row_stats_kernel[(triton.cdiv(M, block_r),)](x, skip, mean, rstd, M, D, n1, n2, *sx, *ss, eps,
                                              BLOCK_R=block_r, BLOCK_D=block_d, ALIGNED=aligned,
                                              num_warps=warps)
    return mean, rstd


def skip_fuse(x: torch.Tensor, skip: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor,
              weight: torch.Tensor, bias: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    op = "skipdit::skip_fuse_triton"
    M, D, N = check_skip_fuse(op, x, skip, norm_weight, norm_bias, weight, bias, eps)
    lay = _check(op, x, skip, D, N)
    n1, n2, sx, ss = lay
    aligned = _aligned(x, skip, weight)
    mean, rstd = _row_stats_launch(x, skip, lay, M, D, eps, aligned)
    y = new_output((M, N), dtype=x.dtype, device=x.device)
    family, prec = _prec_kind(x.dtype)
    nw, nb = norm_weight.contiguous(), norm_bias.contiguous()
    b = bias.contiguous() if bias is not None else y  # unused when HAS_BIAS is False
    args = (x, skip, mean, rstd, nw, nb, weight, b, y, M, D, N, n1, n2, *sx, *ss, weight.stride(0), _m_bucket(M))
    meta = dict(HAS_BIAS=bias is not None, ALIGNED=aligned, PREC=prec)

    def grid(m):
        return (triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"]),)

    _launch(_FWD_TUNED[family], _fwd_heur, "fwd", _INTERP_FWD, grid, args, meta, x.device)
    return y.view(*x.shape[:-1], N)


def _dw_splits(device, M: int, D: int, N: int) -> int:
    forced = _FORCED.get("dw_splits")
    if forced is not None:
        return forced
    tiles = triton.cdiv(N, 128) * 2 * triton.cdiv(D, 128)
    return max(1, min(triton.cdiv(2 * _num_sms(device), tiles), M // 512, 16))


_SUM_R, _SUM_BLOCK = 16, 256


def _col_sums(inp: torch.Tensor, out: torch.Tensor, chunks: int = 1) -> None:
    """out[c] = column sums of chunk c of inp's rows (inp 2-D, last dim contiguous;
    out [chunks, L] or [L] when chunks == 1)."""
    R, L = inp.shape
    rows_per = triton.cdiv(R, chunks)
    block = _SUM_BLOCK if inp.device.type == "cuda" else 4096  # interpreter: fewer programs
    _skip_fuse_col_sums_kernel[(triton.cdiv(L, block), chunks)](inp, out, R, L, inp.stride(0), rows_per,
                                                      BLOCK_R=_SUM_R, BLOCK=block, num_warps=4)


def skip_fuse_backward(grad_out: torch.Tensor, x: torch.Tensor, skip: torch.Tensor, norm_weight: torch.Tensor,
                       norm_bias: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float):
    op = "skipdit::skip_fuse_backward_triton"
    M, D, N = check_skip_fuse_backward(op, grad_out, x, skip, norm_weight, norm_bias, weight, bias, eps)
    lay = _check(op, x, skip, D, N)
    n1, n2, sx, ss = lay
    dev = x.device
    dy = grad_out.reshape(M, N)
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    nw, nb = norm_weight.contiguous(), norm_bias.contiguous()

    # 1. gradient of the LayerNorm output (the reference rounds it to x.dtype too)
    dh = torch.matmul(dy, weight)  # [M, 2D]

    # 2. LayerNorm backward into grad_x / grad_skip; row statistics for step 3
    aligned = _aligned(x, skip)
    dx = new_output(x.shape, dtype=x.dtype, device=dev)
    dskip = new_output(x.shape, dtype=x.dtype, device=dev)
    mean = new_output((M,), dtype=torch.float32, device=dev)
    rstd = new_output((M,), dtype=torch.float32, device=dev)
    block_r, block_d, warps = _rowwise_meta(D, 1024, dev)
    P = _FORCED.get("ln_programs") or min(triton.cdiv(M, block_r), 2 * _num_sms(dev))
    part_g = new_output((P, 2 * D), dtype=torch.float32, device=dev)
    part_b = new_output((P, 2 * D), dtype=torch.float32, device=dev)
    _skip_fuse_ln_bwd_kernel[(P,)](dh, x, skip, nw, dx, dskip, mean, rstd, part_g, part_b, M, D, n1, n2, *sx, *ss, eps,
                         BLOCK_R=block_r, BLOCK_D=block_d, ALIGNED=aligned, num_warps=warps)
    dnw = new_output(norm_weight.shape, dtype=norm_weight.dtype, device=dev)
    dnb = new_output(norm_bias.shape, dtype=norm_bias.dtype, device=dev)
    _col_sums(part_g, dnw)
    _col_sums(part_b, dnb)

    # 3. grad_weight = dy^T @ h (h normalized in the GEMM prologue)
    S = _dw_splits(dev, M, D, N)
    dw = new_output(weight.shape, dtype=weight.dtype, device=dev)
    dw_out = dw if S == 1 else new_output((S, N, 2 * D), dtype=torch.float32, device=dev)
    family, prec = _prec_kind(x.dtype)
    args = (dy, x, skip, mean, rstd, nw, nb, dw_out, M, D, N, n1, n2, *sx, *ss, dy.stride(0), S, _m_bucket(M))
    meta = dict(ALIGNED=aligned and _aligned(dy), PREC=prec)

    def grid(m):
        return (triton.cdiv(N, m["BLOCK_N"]) * 2 * triton.cdiv(D, m["BLOCK_K"]), S)

    _launch(_DW_TUNED[family], _dw_heur, "dw", _INTERP_DW, grid, args, meta, dev)
    if S > 1:
        _col_sums(dw_out.view(S, N * 2 * D), dw.view(N * 2 * D))

    # 4. grad_bias: column sums of dy, over row chunks then over the chunks
    if bias is None:
        db = weight.new_empty((0,))
    else:
        db = new_output(bias.shape, dtype=bias.dtype, device=dev)
        chunks = min(triton.cdiv(M, 256), max(1, 2 * _num_sms(dev) // triton.cdiv(N, _SUM_BLOCK)))
        if chunks == 1:
            _col_sums(dy, db)
        else:
            part = new_output((chunks, N), dtype=torch.float32, device=dev)
            _col_sums(dy, part, chunks)
            _col_sums(part, db)
    return dx, dskip, dnw, dnb, dw, db


# ---------------------------------------------------------------------------
# ahead-of-time compilation specs (kernels/aot.py): every autotune config of the GEMM
# kernels for each dtype it serves, and the row-wise kernels at small, DiT-XL and
# maximum widths. Strides and lengths are runtime arguments as in real launches; n1 and
# n2 are 1 (what Triton specializes them to for layouts that collapse into one row
# stride), plus one spec per GEMM kernel with the general three-group row layout.

_ROW_SIG = {"M": "i32", "D": "i32", "n1": "i32", "n2": "i32", "sx0": "i64", "sx1": "i64", "sx2": "i64",
            "ss0": "i64", "ss1": "i64", "ss2": "i64"}


def _fwd_sig(dt: str, norm_dt: str) -> dict:
    return {"x_ptr": f"*{dt}", "s_ptr": f"*{dt}", "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "g_ptr": f"*{norm_dt}",
            "b_ptr": f"*{norm_dt}", "w_ptr": f"*{dt}", "bias_ptr": f"*{dt}", "y_ptr": f"*{dt}", **_ROW_SIG,
            "N": "i32", "stride_w": "i64", "M_BUCKET": "i32"}


def _dw_sig(dt: str, out_dt: str) -> dict:
    return {"dy_ptr": f"*{dt}", "x_ptr": f"*{dt}", "s_ptr": f"*{dt}", "mean_ptr": "*fp32", "rstd_ptr": "*fp32",
            "g_ptr": "*fp32", "b_ptr": "*fp32", "dw_ptr": f"*{out_dt}", **_ROW_SIG,
            "N": "i32", "stride_dy": "i64", "SPLITS": "i32", "M_BUCKET": "i32"}


def _specs():
    from .aot import AotSpec

    def gemm_specs(kernel, sig_fn, configs_by_family, tag, out_dt):
        specs = []
        for family, configs in configs_by_family.items():
            dtypes = ("fp16", "bf16") if family == "16bit" else ("fp32",)
            prec = "ieee" if family == "ieee" else "tf32"
            for dt in dtypes:
                for i, cfg in enumerate(configs):
                    general = family == "16bit" and dt == "bf16" and i == 0
                    for layout in ("rows", "general") if general else ("rows",):
                        sig = sig_fn(dt, out_dt or dt)
                        ce = dict(cfg.kwargs, ALIGNED=True, PREC=prec, EVEN_K=True)
                        if kernel is _skip_fuse_fwd_kernel:
                            ce["HAS_BIAS"] = True
                        if layout == "rows":
                            ce.update(n1=1, n2=1)
                        kw = cfg.kwargs
                        shape = "x".join(str(v) for k, v in kw.items() if k.startswith("BLOCK"))
                        specs.append(AotSpec(kernel, sig, ce, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                                             name=f"skip_fuse_{tag}_{dt}_{family}_{shape}_w{cfg.num_warps}"
                                                  f"s{cfg.num_stages}_{layout}"))
        return specs

    specs = gemm_specs(_skip_fuse_fwd_kernel, lambda dt, _: _fwd_sig(dt, "fp32"), FWD_CONFIGS, "fwd", None)
    specs += gemm_specs(_skip_fuse_dw_kernel, _dw_sig, DW_CONFIGS, "dw", "fp32")
    for dt in ("fp16", "bf16", "fp32"):
        for D in (72, 1152, 4096):
            dev = torch.device("cuda")
            br, bd, warps = _rowwise_meta(D, 2048, dev)
            sig = {"x_ptr": f"*{dt}", "s_ptr": f"*{dt}", "mean_ptr": "*fp32", "rstd_ptr": "*fp32", **_ROW_SIG,
                   "eps": "fp32"}
            specs.append(AotSpec(_skip_fuse_row_stats_kernel, sig, dict(BLOCK_R=br, BLOCK_D=bd, ALIGNED=True, n1=1, n2=1),
                                 num_warps=warps, name=f"skip_fuse_stats_{dt}_d{D}"))
            br, bd, warps = _rowwise_meta(D, 1024, dev)
            sig = {"dh_ptr": f"*{dt}", "x_ptr": f"*{dt}", "s_ptr": f"*{dt}", "g_ptr": "*fp32", "dx_ptr": f"*{dt}",
                   "ds_ptr": f"*{dt}", "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "pg_ptr": "*fp32",
                   "pb_ptr": "*fp32", **_ROW_SIG, "eps": "fp32"}
            specs.append(AotSpec(_skip_fuse_ln_bwd_kernel, sig, dict(BLOCK_R=br, BLOCK_D=bd, ALIGNED=True, n1=1, n2=1),
                                 num_warps=warps, name=f"skip_fuse_ln_bwd_{dt}_d{D}"))
        for src, dst in {("fp32", dt), (dt, "fp32")}:  # partials -> parameter dtype; dy -> fp32
            specs.append(AotSpec(_skip_fuse_col_sums_kernel, {"in_ptr": f"*{src}", "out_ptr": f"*{dst}", "R": "i32", "L": "i32",
                                                    "stride": "i64", "ROWS_PER": "i32"},
                                 {"BLOCK_R": _SUM_R, "BLOCK": _SUM_BLOCK}, num_warps=4,
                                 name=f"skip_fuse_sum_rows_{src}_to_{dst}"))
    return specs


AOT_SPECS = _specs
