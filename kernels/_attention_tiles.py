"""Head-dim chunking and the Triton tile helpers of the attention kernels
(kernels/attention.py): loads, stores and accumulators of a head dim split into at
most three power-of-two chunks, stride and tile decoding. Imports no package module."""

from __future__ import annotations

import functools

import triton
import triton.language as tl

# ---------------------------------------------------------------------------
# head-dim chunking

def _pow2_chunks(width: int, minimum: int) -> tuple[int, int, int]:
    """At most three powers of two, each >= minimum, largest first: the smallest
    total >= width that such a split reaches, and among those the fewest chunks."""
    best = None
    t = -(-width // minimum) * minimum
    while best is None or t <= best[0]:
        bits = [1 << i for i in range(t.bit_length() - 1, -1, -1) if (t >> i) & 1]
        if len(bits) <= 3 and (best is None or len(bits) < len(best[1])):
            best = (t, bits)
        t += minimum
    return tuple(best[1] + [0] * (3 - len(best[1])))


@functools.lru_cache(maxsize=None)
def contraction_chunks(dh: int) -> tuple[int, int, int]:
    """Chunks of the head dim where it is the tl.dot contraction dim (>= 16 each)."""
    return _pow2_chunks(dh, 16)


@functools.lru_cache(maxsize=None)
def output_chunks(dh: int) -> tuple[int, int, int]:
    """Chunks of the head dim where it is a tl.dot output width (>= 8 each)."""
    return _pow2_chunks(dh, 8)


@functools.lru_cache(maxsize=None)
def backward_chunks(dh: int) -> tuple[int, int, int]:
    """Chunks of the head dim in the backward kernels: the contraction chunks up to
    128; above, one 256-wide chunk (several chunks there keep 4-6 fp32 accumulators
    and their operands live at once and spill; Dh > 128 is not a fast path)."""
    return contraction_chunks(dh) if dh <= 128 else (256, 0, 0)


# ---------------------------------------------------------------------------
# tile helpers

@triton.jit
def _strides(sb, sn, sh, SU: tl.constexpr):
    """A [B, N, H, Dh] view's batch / token / head strides as int64 element counts (the
    launcher passes them divided by SU, the row alignment the compiler may assume)."""
    return sb.to(tl.int64) * SU, sn.to(tl.int64) * SU, sh.to(tl.int64) * SU


@triton.jit
def _ld(base, rows, stride, rmask, DOFF: tl.constexpr, DC: tl.constexpr, HEAD_DIM: tl.constexpr,
        MASK_ROWS: tl.constexpr):
    """[len(rows), DC] tile of columns DOFF.. of a row-major matrix at base (row
    stride `stride`); columns >= HEAD_DIM, and rows where rmask is false when
    MASK_ROWS, read as 0."""
    cols = DOFF + tl.arange(0, DC)
    ptrs = base + rows.to(tl.int64)[:, None] * stride + cols[None, :]
    if DOFF + DC > HEAD_DIM:
        if MASK_ROWS:
            x = tl.load(ptrs, mask=rmask[:, None] & (cols < HEAD_DIM)[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=(cols < HEAD_DIM)[None, :], other=0.0)
    else:
        if MASK_ROWS:
            x = tl.load(ptrs, mask=rmask[:, None], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _st(base, rows, stride, rmask, x, DOFF: tl.constexpr, DC: tl.constexpr, HEAD_DIM: tl.constexpr):
    cols = DOFF + tl.arange(0, DC)
    ptrs = base + rows.to(tl.int64)[:, None] * stride + cols[None, :]
    if DOFF + DC > HEAD_DIM:
        tl.store(ptrs, x, mask=rmask[:, None] & (cols < HEAD_DIM)[None, :])
    else:
        tl.store(ptrs, x, mask=rmask[:, None])


@triton.jit
def _tile_of(pid, N, H, BLOCK: tl.constexpr):
    """(bh, start, b, h): the (batch * head) pair and the first row of program pid in a
    grid of (B * H) x cdiv(N, BLOCK) row tiles."""
    n_blocks = tl.cdiv(N, BLOCK)
    bh = pid // n_blocks
    start = (pid - bh * n_blocks) * BLOCK
    return bh, start, (bh // H).to(tl.int64), (bh % H).to(tl.int64)


@triton.jit
def _ld_chunks(base, rows, stride, rmask, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
               HEAD_DIM: tl.constexpr):
    """The head dim in its (up to three) power-of-two column chunks: (x0, x1, x2), each
    [len(rows), Di]; an empty chunk repeats x0 (never used, not loaded)."""
    x0 = _ld(base, rows, stride, rmask, 0, D0, HEAD_DIM, True)
    x1 = x0
    x2 = x0
    if D1 > 0:
        x1 = _ld(base, rows, stride, rmask, D0, D1, HEAD_DIM, True)
    if D2 > 0:
        x2 = _ld(base, rows, stride, rmask, D0 + D1, D2, HEAD_DIM, True)
    return x0, x1, x2


@triton.jit
def _zeros_chunks(ROWS: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr):
    """fp32 accumulators shaped like _ld_chunks' tiles."""
    z0 = tl.zeros([ROWS, D0], tl.float32)
    z1 = z0
    z2 = z0
    if D1 > 0:
        z1 = tl.zeros([ROWS, D1], tl.float32)
    if D2 > 0:
        z2 = tl.zeros([ROWS, D2], tl.float32)
    return z0, z1, z2


@triton.jit
def _st_chunks(base, rows, stride, rmask, x0, x1, x2, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
               HEAD_DIM: tl.constexpr):
    _st(base, rows, stride, rmask, x0, 0, D0, HEAD_DIM)
    if D1 > 0:
        _st(base, rows, stride, rmask, x1, D0, D1, HEAD_DIM)
    if D2 > 0:
        _st(base, rows, stride, rmask, x2, D0 + D1, D2, HEAD_DIM)


@triton.jit
def _ld3(base, pair_off, pmask, rows, stride, n_rows, DOFF: tl.constexpr, DC: tl.constexpr,
         HEAD_DIM: tl.constexpr):
    """[G, len(rows), DC] tile: per pair g the rows of a row-major matrix at
    base + pair_off[g]; rows >= n_rows, masked pairs and columns >= HEAD_DIM read 0."""
    cols = DOFF + tl.arange(0, DC)
    ptrs = base + pair_off[:, None, None] + (rows.to(tl.int64) * stride)[None, :, None] + cols[None, None, :]
    mask = pmask[:, None, None] & (rows < n_rows)[None, :, None]
    if DOFF + DC > HEAD_DIM:
        mask = mask & (cols < HEAD_DIM)[None, None, :]
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _st3(base, pair_off, pmask, rows, stride, n_rows, x, DOFF: tl.constexpr, DC: tl.constexpr,
         HEAD_DIM: tl.constexpr):
    cols = DOFF + tl.arange(0, DC)
    ptrs = base + pair_off[:, None, None] + (rows.to(tl.int64) * stride)[None, :, None] + cols[None, None, :]
    mask = pmask[:, None, None] & (rows < n_rows)[None, :, None]
    if DOFF + DC > HEAD_DIM:
        mask = mask & (cols < HEAD_DIM)[None, None, :]
    tl.store(ptrs, x, mask=mask)
