"""cache_delta in Triton: sum|a - b| / sum|b| in one pass over a and b.

Each program reduces a grid-stride share of row tiles [BLOCK_R, BLOCK_D] into two
partial sums; a second one-program kernel adds the partials in a fixed order
(deterministic) and writes the ratio. The result stays on the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from skipdit_fast.ops.checks import check_cache_delta, new_output


@triton.jit
def _cache_delta_partial_kernel(a_ptr, b_ptr, part_ptr, n_rows, D, stride_a, stride_b,
                         BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC_F64: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    acc_t = tl.float64 if ACC_F64 else tl.float32
    acc_d = tl.zeros([BLOCK_R, BLOCK_D], dtype=acc_t)
    acc_s = tl.zeros([BLOCK_R, BLOCK_D], dtype=acc_t)
    rr = tl.arange(0, BLOCK_R)
    cc = tl.arange(0, BLOCK_D)
    n_tiles = tl.cdiv(n_rows, BLOCK_R)
    for t in range(pid, n_tiles, nprog):
        rows = t * BLOCK_R + rr
        rmask = rows < n_rows
        rows64 = rows.to(tl.int64)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + cc
            m = rmask[:, None] & (cols < D)[None, :]
            a = tl.load(a_ptr + rows64[:, None] * stride_a + cols[None, :], mask=m, other=0.0).to(acc_t)
            b = tl.load(b_ptr + rows64[:, None] * stride_b + cols[None, :], mask=m, other=0.0).to(acc_t)
            acc_d += tl.abs(a - b)
            acc_s += tl.abs(b)
    tl.store(part_ptr + 2 * pid, tl.sum(tl.sum(acc_d, axis=1), axis=0))
    tl.store(part_ptr + 2 * pid + 1, tl.sum(tl.sum(acc_s, axis=1), axis=0))


@triton.jit
def _cache_delta_finish_kernel(part_ptr, out_ptr, n_parts, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    acc_d = tl.zeros([BLOCK], dtype=part_ptr.dtype.element_ty)
    acc_s = tl.zeros([BLOCK], dtype=part_ptr.dtype.element_ty)
    for p0 in range(0, n_parts, BLOCK):
        m = p0 + offs < n_parts
        acc_d += tl.load(part_ptr + 2 * (p0 + offs), mask=m, other=0.0)
        acc_s += tl.load(part_ptr + 2 * (p0 + offs) + 1, mask=m, other=0.0)
    tl.store(out_ptr, tl.sum(acc_d, axis=0) / tl.sum(acc_s, axis=0))


def _rows_view(t: torch.Tensor):
    """(n_rows, D, row_stride) when t's leading dims collapse into one stride."""
    D = t.shape[-1]
    if t.dim() == 1:
        return 1, D, D
    lead = t.reshape(-1, D) if t.is_contiguous() else None
    if lead is not None:
        return lead.shape[0], D, D
    # Leading dims that collapse into one stride (e.g. a slice of a fused tensor).
    sizes = [s for s in t.shape[:-1]]
    strides = [st for s, st in zip(t.shape[:-1], t.stride()[:-1]) if s != 1]
    sizes_nz = [s for s in sizes if s != 1]
    for i in range(len(sizes_nz) - 1):
        if strides[i] != strides[i + 1] * sizes_nz[i + 1]:
            return None
    return t.numel() // D, D, (strides[-1] if strides else D)


def unsupported_reason(a: torch.Tensor, b: torch.Tensor) -> str | None:
    if _rows_view(a) is None or _rows_view(b) is None:
        return "leading dims do not collapse into one row stride"
    return None


def _num_programs(device: torch.device, n_tiles: int) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(n_tiles, 4 * sms))
    return max(1, min(n_tiles, 4))  # interpreter: keep it small


def cache_delta(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    check_cache_delta("skipdit::cache_delta_triton", a, b)
    ra, rb = _rows_view(a), _rows_view(b)
    if ra is None or rb is None:
        raise ValueError("skipdit::cache_delta_triton: " + unsupported_reason(a, b))
    n_rows, D, sa = ra
    sb = rb[2]
    block_d = min(triton.next_power_of_2(D), 1024)
    block_r = max(1, 1024 // block_d)
    n_tiles = triton.cdiv(n_rows, block_r)
    grid = _num_programs(a.device, n_tiles)
    f64 = a.dtype == torch.float64
    acc = torch.float64 if f64 else torch.float32
    parts = torch.empty(2 * grid, device=a.device, dtype=acc)
    out = new_output((), device=a.device, dtype=acc)
    _cache_delta_partial_kernel[(grid,)](a, b, parts, n_rows, D, sa, sb, BLOCK_R=block_r,
                                  BLOCK_D=block_d, ACC_F64=f64, num_warps=4)
    _cache_delta_finish_kernel[(1,)](parts, out, grid, BLOCK=256, num_warps=4)
    return out


def _specs():
    from .aot import AotSpec

    specs = []
    for dt in ("fp16", "bf16", "fp32"):
        for block_d in (128, 1024):
            specs.append(AotSpec(
                _cache_delta_partial_kernel,
                {"a_ptr": f"*{dt}", "b_ptr": f"*{dt}", "part_ptr": "*fp32", "n_rows": "i32",
                 "D": "i32", "stride_a": "i64", "stride_b": "i64"},
                {"BLOCK_R": max(1, 1024 // block_d), "BLOCK_D": block_d, "ACC_F64": False},
                num_warps=4, name=f"cache_delta_partial_{dt}_d{block_d}"))
    specs.append(AotSpec(_cache_delta_finish_kernel, {"part_ptr": "*fp32", "out_ptr": "*fp32", "n_parts": "i32"},
                         {"BLOCK": 256}, num_warps=4, name="cache_delta_finish"))
    return specs


AOT_SPECS = _specs
