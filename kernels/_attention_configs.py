"""Launch configurations of the attention kernels (kernels/attention.py): the
candidate tiles per kernel, arch and dtype, and the choice among them (the first
candidate, or with SKIPDIT_FAST_TILE_AUTOTUNE=1 the fastest, timed once per key)."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
from triton.runtime.errors import OutOfResources

# ---------------------------------------------------------------------------
# launch configurations

@dataclass(frozen=True)
class Cfg:
    """Tile shape and launch parameters of one kernel. For the blocked kernels
    block_m/block_n are the query/key tile rows; for the short kernels block_m is
    unused there and `pairs` is G, the (batch, head) pairs per program."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    pairs: int = 1


@functools.lru_cache(maxsize=None)
def _arch(device: torch.device) -> int:
    """Compute capability as 80, 90, ...; 0 for the interpreter (CPU tensors)."""
    if device.type != "cuda":
        return 0
    major, minor = torch.cuda.get_device_capability(device.index)
    return 10 * major + minor


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device.index).multi_processor_count


@functools.lru_cache(maxsize=None)
def fwd_configs(arch: int, dtype: torch.dtype, kdim: int) -> tuple[Cfg, ...]:
    """Forward tile candidates, best guess first, for head dims whose contraction
    chunks sum to kdim (72 -> 80, 88 -> 96). The first is used unless autotuning;
    the launcher moves a 64-row candidate first when 128-row tiles would leave SMs
    idle (B * H * Nq / 128 < #SMs, e.g. DiT-XL/2 at batch 1 + CFG: 2 x 16 x 2 tiles).

    Hopper (sm_90): 8 warps = two warpgroups, each a 64-row wgmma slice of a
    128-row query tile (Triton's own H100 tuning keeps 8-warp tiles at 128 x 128).
    BLOCK_N = 128 for kdim <= 96 halves the per-block overhead of the online softmax
    (row max/sum shuffles, the acc rescale: 72 FMAs a row per block): S is 128 x 128
    fp32 = 64 registers a thread, 234 in all at Dh 72 (ptxas, 0 spills), and K + V
    stages of 128 x (80 + 72) x 2 B = 38 KB, x 3 stages + Q 20 KB = 134 KB of smem:
    one program an SM, 512 programs for each benchmark shape (Dh 72, N = 256 / 1024 /
    4096 at B x H = 256 / 64 / 16), 3.9 waves on 132 SMs. kdim 128 takes
    BLOCK_N = 64 (smem 3 x 32 KB + 32 KB). Ampere (sm_80): mma.sync reads both
    operands from registers, 8 warps share the 128 x 64 tile (255 registers at
    Dh 72-128, 0 spills)."""
    if arch == 0:  # interpreter: few large programs run fastest
        return (Cfg(64, 64, 4, 1),)
    if dtype == torch.float32:
        # IEEE fp32 dots run on FMA units and spill at any tile size; correct, slow,
        # and refused by the backend registry (backends.LIMITS) for CUDA tensors
        return (Cfg(64, 32, 4, 2),) if kdim <= 128 else (Cfg(32, 32, 4, 2),)
    if arch >= 90:
        if kdim <= 64:
            return (Cfg(128, 128, 8, 3), Cfg(128, 64, 4, 3), Cfg(64, 128, 4, 3))
        if kdim <= 96:
            return (Cfg(128, 128, 8, 3), Cfg(128, 64, 8, 3), Cfg(64, 64, 4, 3), Cfg(128, 64, 4, 3))
        if kdim <= 128:
            return (Cfg(128, 64, 8, 3), Cfg(128, 128, 8, 2), Cfg(64, 64, 4, 3))
        return (Cfg(128, 32, 8, 2), Cfg(64, 32, 4, 2))
    if kdim <= 64:
        return (Cfg(128, 64, 8, 3), Cfg(64, 64, 4, 3), Cfg(128, 64, 4, 3))
    if kdim <= 96:
        return (Cfg(128, 64, 8, 3), Cfg(64, 32, 4, 3), Cfg(128, 32, 8, 3))
    if kdim <= 128:
        return (Cfg(128, 64, 8, 3), Cfg(128, 32, 8, 3))
    return (Cfg(32, 32, 8, 2), Cfg(16, 32, 4, 1))


@functools.lru_cache(maxsize=None)
def fwd_short_configs(arch: int, dtype: torch.dtype, kdim: int, bm: int) -> tuple[Cfg, ...]:
    """Short-sequence forward: G pairs of bm rows per program. The temporal shape
    (N = 16, Dh = 72, B x H = 16384) is memory bound: q, k, v, o = 4 x 16 x 72 x 2 B
    = 9 KB a pair, 151 MB in all, ~50 us at 3 TB/s, against 1.2 GFLOP. G = 8 pairs
    (128 rows) per 8-warp program is one pair per warp in each mma.sync; the program
    issues all its q/k/v loads (55 KB) before any math, needs 64-80 registers a
    thread (ptxas, Dh 64-96) and 40 KB of smem, so 3-4 programs share an SM and
    ~200 KB of loads are in flight per SM. 2048 programs for the temporal shape."""
    if arch == 0:
        return (Cfg(bm, bm, 4, 1, pairs=max(1, 256 // bm)),)
    rows = 128 if kdim <= 128 else 32
    if dtype == torch.float32:
        rows //= 2
    g = max(1, rows // bm)
    return (Cfg(bm, bm, 8 if g * bm >= 128 else 4, 1, pairs=g),
            Cfg(bm, bm, 4, 1, pairs=max(1, g // 2)),
            Cfg(bm, bm, 8, 1, pairs=2 * g))


@functools.lru_cache(maxsize=None)
def bwd_configs(arch: int, dtype: torch.dtype, kdim: int) -> tuple[Cfg, ...]:
    """Backward tiles, shared by the dK/dV kernel (block_n keys resident, loop over
    block_m queries) and the dQ kernel (block_m queries resident, loop over block_n
    keys). Each keeps two (dK, dV) or one (dQ) fp32 accumulator of kdim columns plus
    two score tiles live, hence smaller tiles than the forward."""
    if arch == 0:
        return (Cfg(64, 64, 4, 1),)
    if dtype == torch.float32:
        return (Cfg(32, 32, 4, 1),) if kdim > 128 else (Cfg(64, 32, 4, 2),)
    if kdim <= 128 and arch >= 90:
        # wgmma wants the resident tile at 128 rows (two warpgroups); the streamed one small
        return (Cfg(32, 128, 8, 2), Cfg(32, 64, 4, 2), Cfg(64, 64, 8, 2))
    if kdim <= 128:
        # mma.sync keeps both operands in registers: 64 resident rows, 32 streamed, over
        # 8 warps (ptxas: 160-244 registers; 64 x 64 spills at Dh 88)
        return (Cfg(32, 64, 8, 2), Cfg(32, 64, 4, 2))
    return (Cfg(32, 32, 8, 1), Cfg(32, 32, 4, 1))


@functools.lru_cache(maxsize=None)
def bwd_short_configs(arch: int, dtype: torch.dtype, kdim: int, bm: int) -> tuple[Cfg, ...]:
    """Short-sequence backward: q, k, v, dO (+ O for delta) and three fp32 gradient
    tiles of G pairs live at once, so half the forward's rows per program."""
    if arch == 0:
        return (Cfg(bm, bm, 4, 1, pairs=max(1, 256 // bm)),)
    rows = 64 if kdim <= 128 else 16
    if dtype == torch.float32:
        rows //= 2
    g = max(1, rows // bm)
    return (Cfg(bm, bm, 4, 1, pairs=g), Cfg(bm, bm, 8, 1, pairs=2 * g))


# Set SKIPDIT_FAST_TILE_AUTOTUNE=1 to time every candidate of a (kernel, arch, dtype,
# head dim, N bucket) once on first use and keep the fastest; by default the first
# candidate of each list runs (no timing runs during tests or the first call). This is
# not SKIPDIT_FAST_AUTOTUNE, which switches the `auto` backend's measuring
# (ops/autotune.py) and is on unless set to 0.
_AUTOTUNE = os.environ.get("SKIPDIT_FAST_TILE_AUTOTUNE", "0") == "1"
_TUNED: dict[tuple, Cfg] = {}


def _choose(key: tuple, candidates: tuple[Cfg, ...], launch) -> Cfg:
    """The first candidate, or with autotuning the fastest (timed by do_bench on
    the real arguments; every kernel here is a pure function of its inputs, so
    repeated launches are harmless)."""
    if not _AUTOTUNE or len(candidates) == 1:
        return candidates[0]
    cfg = _TUNED.get(key)
    if cfg is None:
        times = []
        for c in candidates:
            try:
                times.append((triton.testing.do_bench(lambda: launch(c), warmup=5, rep=20), c))
            except OutOfResources:  # shared memory or registers: not a candidate here
                continue
        cfg = _TUNED[key] = min(times, key=lambda x: x[0])[1] if times else candidates[0]
    return cfg


def _n_bucket(n: int) -> int:
    return min(triton.next_power_of_2(n), 8192)
