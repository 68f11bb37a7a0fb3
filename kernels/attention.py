"""attention in Triton: flash-style forward and backward for DiT shapes (BSHD).

    o = softmax(q @ k^T * scale) @ v per (batch, head), lse = row log-sum-exp (natural log)

q [B, Nq, H, Dh], k/v [B, Nk, H, Dh] are read in place through their strides (views
of a fused qkv projection output included); o is written contiguous BSHD, lse as
[B, H, Nq] fp32. Shapes/dtypes: skipdit_fast/ops/fakes.py. The head-dim chunking and
tile helpers are in _attention_tiles.py, the launch configurations in _attention_configs.py.

Head dims without power-of-two padding. Triton tiles must be powers of two and
tl.dot needs a contraction (K) dim >= 16 for 16-bit operands, but accepts any output
(N) width (the backend pads to the MMA's n = 8). So the head dim is split into at
most three power-of-two chunks, each its own tl.dot and accumulator:
  - q and k, where Dh is contracted (S = q k^T): chunks of >= 16, the last one
    masked:  64 | 72 = 64+16 | 88 = 64+32 | 96 = 64+32 | 128
  - v and o, where Dh is the output width (o = p v): chunks of >= 8, exact for every
    multiple of 8 that is a sum of <= 3 powers of two:
             64 | 72 = 64+8  | 88 = 64+16+8 | 96 = 64+32 | 128
Work per score element, real Dh = 2 x Dh multiply-adds (q k and p v):
  Dh 72: 80 + 72 = 152 vs 144, +5.6 %  (padded to 128: +78 %; to 96 as FA2/FA3: +33 %)
  Dh 88: 96 + 88 = 184 vs 176, +4.5 %  (to 128: +45 %;  to 96: +9 %)
  Dh 96, 64, 128: no padding.
The backward uses the >= 16 chunking for every operand (each of q, k, v, dO is both
contracted and an output width there): 72 -> 80, 88 -> 96.

Kernels:
  _attention_fwd_kernel          one program per (batch*head, BLOCK_M query rows); online softmax in
                     the log2 domain (exp2, scale*log2(e) folded into one FMA); full
                     key blocks run unmasked, the ragged last block once with masks.
  _attention_fwd_short_kernel    N <= 64 (Latte temporal attention: N = 16, B*H = 16384): G
                     (batch, head) pairs per program, whole sequences in registers,
                     batched 3-D tl.dot, one pass softmax.
  _attention_bwd_delta_kernel    delta = rowsum(dO * O) (fp32), the pre-pass of the backward.
  _attention_bwd_dkdv_kernel     one program per key block: loops over query blocks, recomputes
                     P^T from lse, accumulates dK and dV in registers.
  _attention_bwd_dq_kernel       one program per query block: loops over key blocks, accumulates dQ.
  _attention_bwd_short_kernel    N <= 64: dQ, dK, dV of G pairs in one program (delta computed inline).
No atomics anywhere: results are bitwise deterministic run to run.

Offsets: batch/head bases and row offsets are int64 (B*N*H*Dh can pass 2^31);
strides are runtime ints (never constexpr); sequence lengths are not specialized.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from skipdit_fast.ops.checks import acc_dtype, check_attention, check_attention_backward, new_output

from . import limits
from ._attention_configs import (Cfg, _arch, _sm_count, fwd_configs, fwd_short_configs, bwd_configs,
                                bwd_short_configs, _choose, _n_bucket)
from ._attention_tiles import (contraction_chunks, output_chunks, backward_chunks, _strides, _ld,
                              _tile_of, _ld_chunks, _zeros_chunks, _st_chunks, _ld3, _st3)

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
SHORT_MAX_N = 64  # both Nq and Nk at most this -> the short-sequence kernels

# Sizes and strides are plain runtime ints: no recompile per sequence length, head
# count or layout (Triton would otherwise specialize each on == 1 and on % 16, one
# compile per pattern). Row alignment reaches the compiler through SU instead.
_RUNTIME_INTS = ["Nq", "Nk", "H", "BH"] + [f"stride_{t}{d}" for t in "qkvod" for d in "bnh"]


# ---------------------------------------------------------------------------
# forward

@triton.jit
def _fwd_block(acc0, acc1, acc2, m_i, l_i, q0, q1, q2, kt, vt, start_n, Nk, skn, svn, qk_scale,
               HEAD_DIM: tl.constexpr, KD0: tl.constexpr, KD1: tl.constexpr, KD2: tl.constexpr,
               VD0: tl.constexpr, VD1: tl.constexpr, VD2: tl.constexpr, BLOCK_N: tl.constexpr,
               MASKED: tl.constexpr, SCALE_NEG: tl.constexpr, DOT_PREC: tl.constexpr):
    """One key/value block of the online softmax. kt/vt point at the block's first row."""
    rows_n = tl.arange(0, BLOCK_N)
    nmask = start_n + rows_n < Nk
    k = _ld(kt, rows_n, skn, nmask, 0, KD0, HEAD_DIM, MASKED)
    s = tl.dot(q0, tl.trans(k), input_precision=DOT_PREC)
    if KD1 > 0:
        k = _ld(kt, rows_n, skn, nmask, KD0, KD1, HEAD_DIM, MASKED)
        s = tl.dot(q1, tl.trans(k), s, input_precision=DOT_PREC)
    if KD2 > 0:
        k = _ld(kt, rows_n, skn, nmask, KD0 + KD1, KD2, HEAD_DIM, MASKED)
        s = tl.dot(q2, tl.trans(k), s, input_precision=DOT_PREC)
    if MASKED:
        s = tl.where(nmask[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
    else:
        # max(s) * c == max(s * c) for c >= 0 (rounding is monotonic): one FMA per score
        if SCALE_NEG:
            ext = tl.min(s, 1)
        else:
            ext = tl.max(s, 1)
        m_new = tl.maximum(m_i, ext * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    p = p.to(vt.dtype.element_ty)
    v = _ld(vt, rows_n, svn, nmask, 0, VD0, HEAD_DIM, MASKED)
    acc0 = tl.dot(p, v, acc0 * alpha[:, None], input_precision=DOT_PREC)
    if VD1 > 0:
        v = _ld(vt, rows_n, svn, nmask, VD0, VD1, HEAD_DIM, MASKED)
        acc1 = tl.dot(p, v, acc1 * alpha[:, None], input_precision=DOT_PREC)
    if VD2 > 0:
        v = _ld(vt, rows_n, svn, nmask, VD0 + VD1, VD2, HEAD_DIM, MASKED)
        acc2 = tl.dot(p, v, acc2 * alpha[:, None], input_precision=DOT_PREC)
    return acc0, acc1, acc2, m_new, l_i


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _attention_fwd_kernel(Q, K, V, O, LSE, qk_scale, Nq, Nk, H,
              stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh,
              stride_vb, stride_vn, stride_vh,
              HEAD_DIM: tl.constexpr, KD0: tl.constexpr, KD1: tl.constexpr, KD2: tl.constexpr,
              VD0: tl.constexpr, VD1: tl.constexpr, VD2: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SU: tl.constexpr,
              SCALE_NEG: tl.constexpr, DOT_PREC: tl.constexpr):
    sqb, sqn, sqh = _strides(stride_qb, stride_qn, stride_qh, SU)
    skb, skn, skh = _strides(stride_kb, stride_kn, stride_kh, SU)
    svb, svn, svh = _strides(stride_vb, stride_vn, stride_vh, SU)

    # programs of one (batch, head) are adjacent: they share its K/V in L2
    bh, start_m, b, h = _tile_of(tl.program_id(0), Nq, H, BLOCK_M)
    rows_m = tl.arange(0, BLOCK_M)
    mmask = start_m + rows_m < Nq

    qt = Q + b * sqb + h * sqh + start_m.to(tl.int64) * sqn
    q0, q1, q2 = _ld_chunks(qt, rows_m, sqn, mmask, KD0, KD1, KD2, HEAD_DIM)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc0, acc1, acc2 = _zeros_chunks(BLOCK_M, VD0, VD1, VD2)

    kt = K + b * skb + h * skh
    vt = V + b * svb + h * svh
    n_full = (Nk // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc0, acc1, acc2, m_i, l_i = _fwd_block(
            acc0, acc1, acc2, m_i, l_i, q0, q1, q2, kt, vt, start_n, Nk, skn, svn, qk_scale,
            HEAD_DIM, KD0, KD1, KD2, VD0, VD1, VD2, BLOCK_N, False, SCALE_NEG, DOT_PREC)
        kt += BLOCK_N * skn
        vt += BLOCK_N * svn
    if n_full < Nk:
        acc0, acc1, acc2, m_i, l_i = _fwd_block(
            acc0, acc1, acc2, m_i, l_i, q0, q1, q2, kt, vt, n_full, Nk, skn, svn, qk_scale,
            HEAD_DIM, KD0, KD1, KD2, VD0, VD1, VD2, BLOCK_N, True, SCALE_NEG, DOT_PREC)

    # o: contiguous [B, Nq, H, Dh]; lse: contiguous [B, H, Nq]
    son = H * HEAD_DIM
    ot = O + (b * Nq + start_m) * son + h * HEAD_DIM
    l_rcp = 1.0 / l_i
    dt = O.dtype.element_ty
    _st_chunks(ot, rows_m, son, mmask, (acc0 * l_rcp[:, None]).to(dt), (acc1 * l_rcp[:, None]).to(dt),
               (acc2 * l_rcp[:, None]).to(dt), VD0, VD1, VD2, HEAD_DIM)
    lse = (m_i + tl.math.log2(l_i)) * LN2
    tl.store(LSE + bh.to(tl.int64) * Nq + start_m + rows_m, lse, mask=mmask)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _attention_fwd_short_kernel(Q, K, V, O, LSE, qk_scale, Nq, Nk, H, BH,
                    stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh,
                    stride_vb, stride_vn, stride_vh,
                    HEAD_DIM: tl.constexpr, KD0: tl.constexpr, KD1: tl.constexpr, KD2: tl.constexpr,
                    VD0: tl.constexpr, VD1: tl.constexpr, VD2: tl.constexpr,
                    G: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, SU: tl.constexpr,
                    DOT_PREC: tl.constexpr):
    sqb, sqn, sqh = _strides(stride_qb, stride_qn, stride_qh, SU)
    skb, skn, skh = _strides(stride_kb, stride_kn, stride_kh, SU)
    svb, svn, svh = _strides(stride_vb, stride_vn, stride_vh, SU)

    pairs = tl.program_id(0) * G + tl.arange(0, G)  # (batch, head) pairs of this program
    pmask = pairs < BH
    b = (pairs // H).to(tl.int64)
    h = (pairs % H).to(tl.int64)
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    qo = b * sqb + h * sqh
    ko = b * skb + h * skh
    vo = b * svb + h * svh

    # every load first (q, k, v: ~7 KB a pair at Dh 72), so the whole tile is in
    # flight at once; this kernel is bound by memory bandwidth, not math
    q0 = _ld3(Q, qo, pmask, rm, sqn, Nq, 0, KD0, HEAD_DIM)
    k0 = _ld3(K, ko, pmask, rn, skn, Nk, 0, KD0, HEAD_DIM)
    v0 = _ld3(V, vo, pmask, rn, svn, Nk, 0, VD0, HEAD_DIM)
    q1 = q0
    k1 = k0
    v1 = v0
    q2 = q0
    k2 = k0
    v2 = v0
    if KD1 > 0:
        q1 = _ld3(Q, qo, pmask, rm, sqn, Nq, KD0, KD1, HEAD_DIM)
        k1 = _ld3(K, ko, pmask, rn, skn, Nk, KD0, KD1, HEAD_DIM)
    if KD2 > 0:
        q2 = _ld3(Q, qo, pmask, rm, sqn, Nq, KD0 + KD1, KD2, HEAD_DIM)
        k2 = _ld3(K, ko, pmask, rn, skn, Nk, KD0 + KD1, KD2, HEAD_DIM)
    if VD1 > 0:
        v1 = _ld3(V, vo, pmask, rn, svn, Nk, VD0, VD1, HEAD_DIM)
    if VD2 > 0:
        v2 = _ld3(V, vo, pmask, rn, svn, Nk, VD0 + VD1, VD2, HEAD_DIM)

    s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PREC)
    if KD1 > 0:
        s = tl.dot(q1, tl.trans(k1), s, input_precision=DOT_PREC)
    if KD2 > 0:
        s = tl.dot(q2, tl.trans(k2), s, input_precision=DOT_PREC)
    s = tl.where((rn < Nk)[None, None, :], s * qk_scale, float("-inf"))
    m = tl.max(s, 2)
    p = tl.math.exp2(s - m[:, :, None])
    l_i = tl.sum(p, 2)
    l_rcp = 1.0 / l_i
    p = p.to(V.dtype.element_ty)

    son = H * HEAD_DIM
    oo = b * Nq * son + h * HEAD_DIM
    o = tl.dot(p, v0, input_precision=DOT_PREC) * l_rcp[:, :, None]
    _st3(O, oo, pmask, rm, son, Nq, o.to(O.dtype.element_ty), 0, VD0, HEAD_DIM)
    if VD1 > 0:
        o = tl.dot(p, v1, input_precision=DOT_PREC) * l_rcp[:, :, None]
        _st3(O, oo, pmask, rm, son, Nq, o.to(O.dtype.element_ty), VD0, VD1, HEAD_DIM)
    if VD2 > 0:
        o = tl.dot(p, v2, input_precision=DOT_PREC) * l_rcp[:, :, None]
        _st3(O, oo, pmask, rm, son, Nq, o.to(O.dtype.element_ty), VD0 + VD1, VD2, HEAD_DIM)
    lse = (m + tl.math.log2(l_i)) * LN2
    lptr = LSE + pairs.to(tl.int64)[:, None] * Nq + rm[None, :]
    tl.store(lptr, lse, mask=pmask[:, None] & (rm < Nq)[None, :])


# ---------------------------------------------------------------------------
# backward

@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _attention_bwd_delta_kernel(O, DO, DELTA, Nq, H, stride_ob, stride_on, stride_oh,
                    stride_db, stride_dn, stride_dh,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                    SU: tl.constexpr):
    """delta[b, h, n] = sum_d dO[b, n, h, d] * O[b, n, h, d] in fp32."""
    sob, son, soh = _strides(stride_ob, stride_on, stride_oh, SU)
    sdb, sdn, sdh = _strides(stride_db, stride_dn, stride_dh, SU)
    bh, start_m, b, h = _tile_of(tl.program_id(0), Nq, H, BLOCK_M)
    rows = tl.arange(0, BLOCK_M)
    rmask = start_m + rows < Nq
    ot = O + b * sob + h * soh + start_m.to(tl.int64) * son
    dt = DO + b * sdb + h * sdh + start_m.to(tl.int64) * sdn
    o = _ld(ot, rows, son, rmask, 0, BLOCK_D, HEAD_DIM, True).to(tl.float32)
    do = _ld(dt, rows, sdn, rmask, 0, BLOCK_D, HEAD_DIM, True).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * Nq + start_m + rows, tl.sum(o * do, 1), mask=rmask)


# The backward is flash-attention 2's split: _attn_bwd_dkdv walks all query blocks
# for one key block, _attn_bwd_dq all key blocks for one query block (the *_short
# kernels do both for whole short sequences). Their pid -> (batch, head, block)
# decomposition and their loads of the D0 / D1 / D2 head-dim chunks read alike on
# purpose: each keeps its own set of chunked accumulators live in registers across its
# loop (dK and dV here, dQ there), which a shared @triton.jit helper would have to take
# and return as tuples of up to nine tensors; the strides are shared (_strides).
@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _attention_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, qk_scale, sm_scale, Nq, Nk, H,
                   stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh,
                   stride_vb, stride_vn, stride_vh, stride_db, stride_dn, stride_dh,
                   HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SU: tl.constexpr,
                   DOT_PREC: tl.constexpr):
    """dK, dV of one block of BLOCK_N keys, looping over all query blocks:
    P^T = exp2(K Q^T * c - lse2), dV += P^T dO, dP^T = V dO^T,
    dS^T = P^T (dP^T - delta), dK += dS^T Q; dK *= scale at the end."""
    sqb, sqn, sqh = _strides(stride_qb, stride_qn, stride_qh, SU)
    skb, skn, skh = _strides(stride_kb, stride_kn, stride_kh, SU)
    svb, svn, svh = _strides(stride_vb, stride_vn, stride_vh, SU)
    sdb, sdn, sdh = _strides(stride_db, stride_dn, stride_dh, SU)
    bh, start_n, b, h = _tile_of(tl.program_id(0), Nk, H, BLOCK_N)
    rn = tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    nmask = start_n + rn < Nk
    dtype = Q.dtype.element_ty

    kt = K + b * skb + h * skh + start_n.to(tl.int64) * skn
    vt = V + b * svb + h * svh + start_n.to(tl.int64) * svn
    k0, k1, k2 = _ld_chunks(kt, rn, skn, nmask, D0, D1, D2, HEAD_DIM)
    v0, v1, v2 = _ld_chunks(vt, rn, svn, nmask, D0, D1, D2, HEAD_DIM)
    dk0, dk1, dk2 = _zeros_chunks(BLOCK_N, D0, D1, D2)
    dv0, dv1, dv2 = _zeros_chunks(BLOCK_N, D0, D1, D2)

    qt = Q + b * sqb + h * sqh
    dt = DO + b * sdb + h * sdh
    lt = LSE + bh.to(tl.int64) * Nq
    deltat = DELTA + bh.to(tl.int64) * Nq
    for start_m in range(0, Nq, BLOCK_M):
        mmask = start_m + rm < Nq
        # rows past Nq: lse = +inf makes their P^T column exactly 0
        lse2 = tl.load(lt + rm, mask=mmask, other=float("inf")) * LOG2E
        dl = tl.load(deltat + rm, mask=mmask, other=0.0)
        q0, q1, q2 = _ld_chunks(qt, rm, sqn, mmask, D0, D1, D2, HEAD_DIM)
        do0, do1, do2 = _ld_chunks(dt, rm, sdn, mmask, D0, D1, D2, HEAD_DIM)
        st = tl.dot(k0, tl.trans(q0), input_precision=DOT_PREC)
        dpt = tl.dot(v0, tl.trans(do0), input_precision=DOT_PREC)
        if D1 > 0:
            st = tl.dot(k1, tl.trans(q1), st, input_precision=DOT_PREC)
            dpt = tl.dot(v1, tl.trans(do1), dpt, input_precision=DOT_PREC)
        if D2 > 0:
            st = tl.dot(k2, tl.trans(q2), st, input_precision=DOT_PREC)
            dpt = tl.dot(v2, tl.trans(do2), dpt, input_precision=DOT_PREC)
        pt = tl.math.exp2(st * qk_scale - lse2[None, :])
        dst = (pt * (dpt - dl[None, :])).to(dtype)
        pt = pt.to(dtype)
        dv0 = tl.dot(pt, do0, dv0, input_precision=DOT_PREC)
        dk0 = tl.dot(dst, q0, dk0, input_precision=DOT_PREC)
        if D1 > 0:
            dv1 = tl.dot(pt, do1, dv1, input_precision=DOT_PREC)
            dk1 = tl.dot(dst, q1, dk1, input_precision=DOT_PREC)
        if D2 > 0:
            dv2 = tl.dot(pt, do2, dv2, input_precision=DOT_PREC)
            dk2 = tl.dot(dst, q2, dk2, input_precision=DOT_PREC)
        qt += BLOCK_M * sqn
        dt += BLOCK_M * sdn
        lt += BLOCK_M
        deltat += BLOCK_M

    # dk, dv: contiguous [B, Nk, H, Dh]
    sn = H * HEAD_DIM
    off = (b * Nk + start_n) * sn + h * HEAD_DIM
    _st_chunks(DK + off, rn, sn, nmask, (dk0 * sm_scale).to(dtype), (dk1 * sm_scale).to(dtype),
               (dk2 * sm_scale).to(dtype), D0, D1, D2, HEAD_DIM)
    _st_chunks(DV + off, rn, sn, nmask, dv0.to(dtype), dv1.to(dtype), dv2.to(dtype), D0, D1, D2, HEAD_DIM)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _attention_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, qk_scale, sm_scale, Nq, Nk, H,
                 stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh,
                 stride_vb, stride_vn, stride_vh, stride_db, stride_dn, stride_dh,
                 HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SU: tl.constexpr,
                 DOT_PREC: tl.constexpr):
    """dQ of one block of BLOCK_M queries, looping over all key blocks:
    P = exp2(Q K^T * c - lse2), dP = dO V^T, dS = P (dP - delta), dQ += dS K."""
    sqb, sqn, sqh = _strides(stride_qb, stride_qn, stride_qh, SU)
    skb, skn, skh = _strides(stride_kb, stride_kn, stride_kh, SU)
    svb, svn, svh = _strides(stride_vb, stride_vn, stride_vh, SU)
    sdb, sdn, sdh = _strides(stride_db, stride_dn, stride_dh, SU)
    bh, start_m, b, h = _tile_of(tl.program_id(0), Nq, H, BLOCK_M)
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    mmask = start_m + rm < Nq
    dtype = Q.dtype.element_ty

    qt = Q + b * sqb + h * sqh + start_m.to(tl.int64) * sqn
    dt = DO + b * sdb + h * sdh + start_m.to(tl.int64) * sdn
    q0, q1, q2 = _ld_chunks(qt, rm, sqn, mmask, D0, D1, D2, HEAD_DIM)
    do0, do1, do2 = _ld_chunks(dt, rm, sdn, mmask, D0, D1, D2, HEAD_DIM)
    dq0, dq1, dq2 = _zeros_chunks(BLOCK_M, D0, D1, D2)
    loff = bh.to(tl.int64) * Nq + start_m + rm
    lse2 = tl.load(LSE + loff, mask=mmask, other=0.0) * LOG2E
    dl = tl.load(DELTA + loff, mask=mmask, other=0.0)

    kt = K + b * skb + h * skh
    vt = V + b * svb + h * svh
    for start_n in range(0, Nk, BLOCK_N):
        nmask = start_n + rn < Nk
        k0, k1, k2 = _ld_chunks(kt, rn, skn, nmask, D0, D1, D2, HEAD_DIM)
        v0, v1, v2 = _ld_chunks(vt, rn, svn, nmask, D0, D1, D2, HEAD_DIM)
        s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PREC)
        dp = tl.dot(do0, tl.trans(v0), input_precision=DOT_PREC)
        if D1 > 0:
            s = tl.dot(q1, tl.trans(k1), s, input_precision=DOT_PREC)
            dp = tl.dot(do1, tl.trans(v1), dp, input_precision=DOT_PREC)
        if D2 > 0:
            s = tl.dot(q2, tl.trans(k2), s, input_precision=DOT_PREC)
            dp = tl.dot(do2, tl.trans(v2), dp, input_precision=DOT_PREC)
        p = tl.where(nmask[None, :], tl.math.exp2(s * qk_scale - lse2[:, None]), 0.0)
        ds = (p * (dp - dl[:, None])).to(dtype)
        dq0 = tl.dot(ds, k0, dq0, input_precision=DOT_PREC)
        if D1 > 0:
            dq1 = tl.dot(ds, k1, dq1, input_precision=DOT_PREC)
        if D2 > 0:
            dq2 = tl.dot(ds, k2, dq2, input_precision=DOT_PREC)
        kt += BLOCK_N * skn
        vt += BLOCK_N * svn

    sn = H * HEAD_DIM
    off = (b * Nq + start_m) * sn + h * HEAD_DIM
    _st_chunks(DQ + off, rm, sn, mmask, (dq0 * sm_scale).to(dtype), (dq1 * sm_scale).to(dtype),
               (dq2 * sm_scale).to(dtype), D0, D1, D2, HEAD_DIM)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _attention_bwd_short_kernel(Q, K, V, O, DO, LSE, DQ, DK, DV, qk_scale, sm_scale, Nq, Nk, H, BH,
                    stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh,
                    stride_vb, stride_vn, stride_vh, stride_ob, stride_on, stride_oh,
                    stride_db, stride_dn, stride_dh,
                    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
                    G: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, SU: tl.constexpr,
                    DOT_PREC: tl.constexpr):
    """N <= 64: dQ, dK, dV of G (batch, head) pairs, whole sequences in registers."""
    sqb, sqn, sqh = _strides(stride_qb, stride_qn, stride_qh, SU)
    skb, skn, skh = _strides(stride_kb, stride_kn, stride_kh, SU)
    svb, svn, svh = _strides(stride_vb, stride_vn, stride_vh, SU)
    sob, son, soh = _strides(stride_ob, stride_on, stride_oh, SU)
    sdb, sdn, sdh = _strides(stride_db, stride_dn, stride_dh, SU)

    pairs = tl.program_id(0) * G + tl.arange(0, G)
    pmask = pairs < BH
    b = (pairs // H).to(tl.int64)
    h = (pairs % H).to(tl.int64)
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    qo = b * sqb + h * sqh
    ko = b * skb + h * skh
    vo = b * svb + h * svh
    oo = b * sob + h * soh
    do_o = b * sdb + h * sdh
    dtype = Q.dtype.element_ty

    q0 = _ld3(Q, qo, pmask, rm, sqn, Nq, 0, D0, HEAD_DIM)
    k0 = _ld3(K, ko, pmask, rn, skn, Nk, 0, D0, HEAD_DIM)
    v0 = _ld3(V, vo, pmask, rn, svn, Nk, 0, D0, HEAD_DIM)
    do0 = _ld3(DO, do_o, pmask, rm, sdn, Nq, 0, D0, HEAD_DIM)
    delta = tl.sum(_ld3(O, oo, pmask, rm, son, Nq, 0, D0, HEAD_DIM).to(tl.float32) * do0.to(tl.float32), 2)
    s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PREC)
    dp = tl.dot(do0, tl.trans(v0), input_precision=DOT_PREC)
    q1 = q0
    k1 = k0
    v1 = v0
    do1 = do0
    q2 = q0
    k2 = k0
    v2 = v0
    do2 = do0
    if D1 > 0:
        q1 = _ld3(Q, qo, pmask, rm, sqn, Nq, D0, D1, HEAD_DIM)
        k1 = _ld3(K, ko, pmask, rn, skn, Nk, D0, D1, HEAD_DIM)
        v1 = _ld3(V, vo, pmask, rn, svn, Nk, D0, D1, HEAD_DIM)
        do1 = _ld3(DO, do_o, pmask, rm, sdn, Nq, D0, D1, HEAD_DIM)
        delta += tl.sum(_ld3(O, oo, pmask, rm, son, Nq, D0, D1, HEAD_DIM).to(tl.float32)
                        * do1.to(tl.float32), 2)
        s = tl.dot(q1, tl.trans(k1), s, input_precision=DOT_PREC)
        dp = tl.dot(do1, tl.trans(v1), dp, input_precision=DOT_PREC)
    if D2 > 0:
        q2 = _ld3(Q, qo, pmask, rm, sqn, Nq, D0 + D1, D2, HEAD_DIM)
        k2 = _ld3(K, ko, pmask, rn, skn, Nk, D0 + D1, D2, HEAD_DIM)
        v2 = _ld3(V, vo, pmask, rn, svn, Nk, D0 + D1, D2, HEAD_DIM)
        do2 = _ld3(DO, do_o, pmask, rm, sdn, Nq, D0 + D1, D2, HEAD_DIM)
        delta += tl.sum(_ld3(O, oo, pmask, rm, son, Nq, D0 + D1, D2, HEAD_DIM).to(tl.float32)
                        * do2.to(tl.float32), 2)
        s = tl.dot(q2, tl.trans(k2), s, input_precision=DOT_PREC)
        dp = tl.dot(do2, tl.trans(v2), dp, input_precision=DOT_PREC)

    lmask = pmask[:, None] & (rm < Nq)[None, :]
    lse2 = tl.load(LSE + pairs.to(tl.int64)[:, None] * Nq + rm[None, :], mask=lmask, other=0.0) * LOG2E
    valid = lmask[:, :, None] & (rn < Nk)[None, None, :]
    p = tl.where(valid, tl.math.exp2(s * qk_scale - lse2[:, :, None]), 0.0)
    ds = (p * (dp - delta[:, :, None])).to(dtype)
    pt = tl.trans(p.to(dtype))
    dst = tl.trans(ds)

    sn = H * HEAD_DIM
    qout = b * Nq * sn + h * HEAD_DIM
    kout = b * Nk * sn + h * HEAD_DIM
    _st3(DQ, qout, pmask, rm, sn, Nq, (tl.dot(ds, k0, input_precision=DOT_PREC) * sm_scale).to(dtype),
         0, D0, HEAD_DIM)
    _st3(DK, kout, pmask, rn, sn, Nk, (tl.dot(dst, q0, input_precision=DOT_PREC) * sm_scale).to(dtype),
         0, D0, HEAD_DIM)
    _st3(DV, kout, pmask, rn, sn, Nk, tl.dot(pt, do0, input_precision=DOT_PREC).to(dtype), 0, D0, HEAD_DIM)
    if D1 > 0:
        _st3(DQ, qout, pmask, rm, sn, Nq, (tl.dot(ds, k1, input_precision=DOT_PREC) * sm_scale).to(dtype),
             D0, D1, HEAD_DIM)
        _st3(DK, kout, pmask, rn, sn, Nk, (tl.dot(dst, q1, input_precision=DOT_PREC) * sm_scale).to(dtype),
             D0, D1, HEAD_DIM)
        _st3(DV, kout, pmask, rn, sn, Nk, tl.dot(pt, do1, input_precision=DOT_PREC).to(dtype),
             D0, D1, HEAD_DIM)
    if D2 > 0:
        _st3(DQ, qout, pmask, rm, sn, Nq, (tl.dot(ds, k2, input_precision=DOT_PREC) * sm_scale).to(dtype),
             D0 + D1, D2, HEAD_DIM)
        _st3(DK, kout, pmask, rn, sn, Nk, (tl.dot(dst, q2, input_precision=DOT_PREC) * sm_scale).to(dtype),
             D0 + D1, D2, HEAD_DIM)
        _st3(DV, kout, pmask, rn, sn, Nk, tl.dot(pt, do2, input_precision=DOT_PREC).to(dtype),
             D0 + D1, D2, HEAD_DIM)



# ---------------------------------------------------------------------------
# launchers

def _bsh_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, seq, head) strides; a size-1 dim's stride is never used, it reads 0."""
    return tuple(0 if t.shape[i] == 1 else t.stride(i) for i in range(3))


def _stride_args(*tensors: torch.Tensor) -> tuple[int, tuple[int, ...]]:
    """(SU, strides // SU) of the tensors' (batch, seq, head) dims. The kernels
    multiply each stride by the constexpr SU, so with SU = 8 the compiler knows every
    row start is 16-byte aligned (16-bit dtypes) and issues 16-byte vector loads /
    cp.async; Triton's own specialization only marks multiples of 16 and misses head
    strides such as Dh = 72, and tl.multiple_of hints on scalar arguments are dropped."""
    strides = tuple(st for t in tensors for st in _bsh_strides(t))
    su = 8 if all(st % 8 == 0 for st in strides) else 1
    return su, tuple(st // su for st in strides)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # ignored for 16-bit operands


def _check_dtype(op: str, q: torch.Tensor) -> None:
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{op}: the Triton kernels take float16, bfloat16 or float32, got {q.dtype}")
    why = limits.attention(q.device.type, q.dtype, q.shape[-1])
    if why:
        raise ValueError(f"{op}: {why}")


class _on_device:
    """Makes t's CUDA device current for the launch (Triton launches on the current one)."""

    def __init__(self, t: torch.Tensor):
        self.ctx = torch.cuda.device(t.device) if t.is_cuda and t.device.index != torch.cuda.current_device() \
            else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def is_short(nq: int, nk: int) -> bool:
    return nq <= SHORT_MAX_N and nk <= SHORT_MAX_N


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """(out [B, Nq, H, Dh] contiguous, lse [B, H, Nq] fp32)."""
    op = "skipdit::attention_forward_triton"
    s = check_attention(op, q, k, v, scale)
    _check_dtype(op, q)
    B, Nq, H, Dh = q.shape
    Nk = k.shape[1]
    out = new_output(q.shape, dtype=q.dtype, device=q.device)
    lse = new_output((B, H, Nq), dtype=acc_dtype(q.dtype), device=q.device)
    kd, vd = contraction_chunks(Dh), output_chunks(Dh)
    su, strides = _stride_args(q, k, v)
    arch = _arch(q.device)
    common = dict(HEAD_DIM=Dh, KD0=kd[0], KD1=kd[1], KD2=kd[2], VD0=vd[0], VD1=vd[1], VD2=vd[2],
                  SU=su, DOT_PREC=_dot_precision(q.dtype))
    qk_scale = s * LOG2E.value
    with _on_device(q):
        if is_short(Nq, Nk):
            bm, bn = max(16, triton.next_power_of_2(Nq)), max(16, triton.next_power_of_2(Nk))

            def launch(c: Cfg):
                _attention_fwd_short_kernel[(triton.cdiv(B * H, c.pairs),)](
                    q, k, v, out, lse, qk_scale, Nq, Nk, H, B * H, *strides, **common,
                    G=c.pairs, BM=bm, BN=bn, num_warps=c.num_warps, num_stages=c.num_stages)

            cands = fwd_short_configs(arch, q.dtype, sum(kd), max(bm, bn))
            cfg = _choose(("fwd_short", arch, q.dtype, Dh, bm, bn), cands, launch)
        else:
            n_prog = B * H * triton.cdiv(Nq, 128)

            def launch(c: Cfg):
                _attention_fwd_kernel[(B * H * triton.cdiv(Nq, c.block_m),)](
                    q, k, v, out, lse, qk_scale, Nq, Nk, H, *strides, **common,
                    BLOCK_M=c.block_m, BLOCK_N=c.block_n, SCALE_NEG=s < 0,
                    num_warps=c.num_warps, num_stages=c.num_stages)

            cands = fwd_configs(arch, q.dtype, sum(kd))
            if arch and cands[0].block_m == 128 and n_prog < _sm_count(q.device):
                # fewer 128-row tiles than SMs: halve the tile for parallelism
                cands = tuple(c for c in cands if c.block_m == 64) + tuple(c for c in cands if c.block_m != 64)
            cfg = _choose(("fwd", arch, q.dtype, Dh, _n_bucket(Nk), n_prog < 264), cands, launch)
        launch(cfg)
    return out, lse


def attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, scale: float):
    """(grad_q, grad_k, grad_v), contiguous, with the shapes of q, k, v."""
    op = "skipdit::attention_backward_triton"
    s = check_attention_backward(op, grad_out, q, k, v, out, lse, scale)
    _check_dtype(op, q)
    B, Nq, H, Dh = q.shape
    Nk = k.shape[1]
    # autograd may hand in an expanded (stride-0) gradient: the kernels need stride-1 rows
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    if out.stride(-1) != 1:
        out = out.contiguous()
    lse = lse.to(torch.float32).contiguous()
    dq = new_output(q.shape, dtype=q.dtype, device=q.device)
    dk = new_output(k.shape, dtype=k.dtype, device=k.device)
    dv = new_output(v.shape, dtype=v.dtype, device=v.device)
    d = backward_chunks(Dh)
    arch = _arch(q.device)
    common = dict(HEAD_DIM=Dh, D0=d[0], D1=d[1], D2=d[2], DOT_PREC=_dot_precision(q.dtype))
    qk_scale = s * LOG2E.value
    with _on_device(q):
        if is_short(Nq, Nk):
            bm, bn = max(16, triton.next_power_of_2(Nq)), max(16, triton.next_power_of_2(Nk))
            su, strides = _stride_args(q, k, v, out, grad_out)

            def launch(c: Cfg):
                _attention_bwd_short_kernel[(triton.cdiv(B * H, c.pairs),)](
                    q, k, v, out, grad_out, lse, dq, dk, dv, qk_scale, s, Nq, Nk, H, B * H,
                    *strides, **common, SU=su, G=c.pairs, BM=bm, BN=bn,
                    num_warps=c.num_warps, num_stages=c.num_stages)

            cands = bwd_short_configs(arch, q.dtype, sum(d), max(bm, bn))
            launch(_choose(("bwd_short", arch, q.dtype, Dh, bm, bn), cands, launch))
            return dq, dk, dv

        delta = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
        dm = 64 if Dh <= 128 else 32
        su, strides = _stride_args(out, grad_out)
        _attention_bwd_delta_kernel[(B * H * triton.cdiv(Nq, dm),)](
            out, grad_out, delta, Nq, H, *strides, HEAD_DIM=Dh, BLOCK_M=dm, SU=su,
            BLOCK_D=triton.next_power_of_2(Dh), num_warps=4)
        su, strides = _stride_args(q, k, v, grad_out)
        common["SU"] = su
        args = (q, k, v, grad_out, lse, delta)

        def launch_dkdv(c: Cfg):
            _attention_bwd_dkdv_kernel[(B * H * triton.cdiv(Nk, c.block_n),)](
                *args, dk, dv, qk_scale, s, Nq, Nk, H, *strides, **common,
                BLOCK_M=c.block_m, BLOCK_N=c.block_n, num_warps=c.num_warps, num_stages=c.num_stages)

        def launch_dq(c: Cfg):
            # the dQ kernel loops over keys: its resident tile is the query block
            _attention_bwd_dq_kernel[(B * H * triton.cdiv(Nq, c.block_n),)](
                *args, dq, qk_scale, s, Nq, Nk, H, *strides, **common,
                BLOCK_M=c.block_n, BLOCK_N=c.block_m, num_warps=c.num_warps, num_stages=c.num_stages)

        cands = bwd_configs(arch, q.dtype, sum(d))
        key = (arch, q.dtype, Dh, _n_bucket(max(Nq, Nk)))
        launch_dkdv(_choose(("bwd_dkdv",) + key, cands, launch_dkdv))
        launch_dq(_choose(("bwd_dq",) + key, cands, launch_dq))
    return dq, dk, dv


# ---------------------------------------------------------------------------
# ahead-of-time compilation specs (kernels/aot.py)

_PTR_ARGS = ("Q", "K", "V", "O", "DO", "LSE", "DELTA", "DQ", "DK", "DV")


def _signature(fn, dt: str) -> dict:
    sig = {}
    for a in fn.arg_names:
        if a in ("LSE", "DELTA"):
            sig[a] = "*fp32"
        elif a in _PTR_ARGS:
            sig[a] = f"*{dt}"
        elif a in ("qk_scale", "sm_scale"):
            sig[a] = "fp32"
        elif a.isupper() and a not in ("H", "BH"):
            continue  # constexpr
        else:
            sig[a] = "i32"
    return sig


def _spec(fn, dt: str, constexprs: dict, cfg: Cfg, name: str):
    from .aot import AotSpec

    arch = int(name.rsplit("_sm", 1)[1].split("_")[0])
    return AotSpec(fn, _signature(fn, dt), constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                   name=name, archs=(arch,), divisibility={a: 16 for a in fn.arg_names if a in _PTR_ARGS},
                   ci=_in_ci_subset(name))


def _in_ci_subset(name: str) -> bool:
    """CI compiles the main kernels at Dh 72 (chunked q/k 64+16 and v/o 64+8) in bf16
    for both archs and the Dh 88 forward (64+32 / 64+16+8) in fp16 for sm_90; the full
    sweep (fp16 + bf16, Dh 64/72/88/96/128, every kernel) runs in `make gpu-check`
    and with SKIPDIT_FULL_AOT=1."""
    if "_m64" in name or "delta" in name:
        return False
    if "_bf16_d72_" in name:
        return True
    return name.startswith("attn_fwd_fp16_d88_sm90")


FAST_HEAD_DIMS = (64, 72, 88, 96, 128)
_TORCH_DT = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _specs(dtypes=("fp16", "bf16"), head_dims=FAST_HEAD_DIMS, archs=(80, 90), all_candidates=False):
    """The launch configurations the launchers pick on sm_80 / sm_90 for the given
    head dims and dtypes: forward (blocked, short N = 16), backward (delta, dK/dV,
    dQ, short N = 16). With all_candidates, every autotuning candidate too."""
    specs = []
    for arch in archs:
        for dt in dtypes:
            tdt = _TORCH_DT[dt]
            prec = _dot_precision(tdt)
            for dh in head_dims:
                kd, vd = contraction_chunks(dh), output_chunks(dh)
                fwd_ce = dict(HEAD_DIM=dh, KD0=kd[0], KD1=kd[1], KD2=kd[2], VD0=vd[0], VD1=vd[1],
                              VD2=vd[2], SU=8, DOT_PREC=prec)
                bd = backward_chunks(dh)
                bwd_ce = dict(HEAD_DIM=dh, D0=bd[0], D1=bd[1], D2=bd[2], SU=8, DOT_PREC=prec)
                tag = f"{dt}_d{dh}_sm{arch}"
                fwd = fwd_configs(arch, tdt, sum(kd))
                # the small-grid variant (BLOCK_M = 64) the launcher may move first
                fwd_used = fwd if all_candidates else (fwd[0],) + tuple(c for c in fwd if c.block_m == 64)[:1]
                for c in fwd_used:
                    specs.append(_spec(_attention_fwd_kernel, dt, dict(fwd_ce, BLOCK_M=c.block_m, BLOCK_N=c.block_n,
                                                           SCALE_NEG=False), c,
                                       f"attn_fwd_{tag}_m{c.block_m}n{c.block_n}w{c.num_warps}s{c.num_stages}"))
                sc = fwd_short_configs(arch, tdt, sum(kd), 16)
                for c in (sc if all_candidates else sc[:1]):
                    specs.append(_spec(_attention_fwd_short_kernel, dt, dict(fwd_ce, G=c.pairs, BM=16, BN=16), c,
                                       f"attn_fwd_short_{tag}_n16g{c.pairs}w{c.num_warps}"))
                bc = bwd_configs(arch, tdt, sum(bd))
                for c in (bc if all_candidates else bc[:1]):
                    specs.append(_spec(_attention_bwd_dkdv_kernel, dt, dict(bwd_ce, BLOCK_M=c.block_m, BLOCK_N=c.block_n), c,
                                       f"attn_bwd_dkdv_{tag}_m{c.block_m}n{c.block_n}w{c.num_warps}"))
                    specs.append(_spec(_attention_bwd_dq_kernel, dt, dict(bwd_ce, BLOCK_M=c.block_n, BLOCK_N=c.block_m), c,
                                       f"attn_bwd_dq_{tag}_m{c.block_n}n{c.block_m}w{c.num_warps}"))
                bs = bwd_short_configs(arch, tdt, sum(bd), 16)
                for c in (bs if all_candidates else bs[:1]):
                    specs.append(_spec(_attention_bwd_short_kernel, dt, dict(bwd_ce, G=c.pairs, BM=16, BN=16), c,
                                       f"attn_bwd_short_{tag}_n16g{c.pairs}w{c.num_warps}"))
                specs.append(_spec(_attention_bwd_delta_kernel, dt, dict(HEAD_DIM=dh, BLOCK_M=64 if dh <= 128 else 32, SU=8,
                                                             BLOCK_D=triton.next_power_of_2(dh)),
                                   Cfg(64, 0, 4, 1), f"attn_bwd_delta_{tag}"))
    return specs


AOT_SPECS = _specs
