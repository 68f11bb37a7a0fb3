// Tile geometry, per-thread index math and limits of the skip_fuse CUDA kernels
// (csrc/cuda/skip_fuse_kernels.cuh, skip_fuse.cu). Plain host + device C++ (no CUDA
// headers), so that the tile-math harness tests/emu/skip_fuse_tiles.cpp runs the same
// index math on the CPU against the PTX ISA fragment tables (tests/emu/ptx_emu.h), and
// ops.cpp exports the constants in build_info.
//
// The GEMM is y[M, N] = h[M, K] @ W[N, K]^T with K = 2D, both operands K-major.
// A CTA computes a BM x BN = 128 x 128 tile of y with 8 warps (2 along M x 4 along N,
// warp tile 64 x 32). One k-tile is 128 bytes of K per row: 64 elements of a 16-bit
// type or 32 fp32 elements, i.e. 8 chunks of 16 bytes. Shared-memory rows are padded
// to 144 bytes, so the 8 row addresses of one ldmatrix 8x8 matrix fall on 8 different
// 16-byte bank groups (no conflicts) and every chunk stays 16-byte aligned for cp.async.
//
// The same byte geometry serves bf16/fp16 (mma.m16n8k16) and tf32 (mma.m16n8k8): one
// "k-step" is 32 bytes of K (16 halves or 8 floats), and ldmatrix on 32-bit data
// delivers exactly the tf32 fragments (each b16 pair is one fp32 element).
#pragma once

#include <cstdint>

#include "macros.h"

namespace skipdit::skip_fuse {

constexpr int kBM = 128;
constexpr int kBN = 128;
constexpr int kThreads = 256;
constexpr int kWarpsN = 4;         // warps along N; 2 along M
constexpr int kWarpM = 64;         // warp tile rows
constexpr int kWarpN = 32;         // warp tile cols
constexpr int kMTiles = kWarpM / 16;  // m16 tiles per warp
constexpr int kNTiles = kWarpN / 8;   // n8 tiles per warp
constexpr int kTileKBytes = 128;   // K bytes per k-tile and row
constexpr int kChunksPerRow = kTileKBytes / 16;
constexpr int kKSteps = kTileKBytes / 32;  // mma k-steps (32 bytes each) per k-tile
constexpr int kRowBytes = kTileKBytes + 16;
constexpr int kTileBytes = kBM * kRowBytes;  // kBM == kBN: A and B tiles have one size
constexpr int kStageBytes = 2 * kTileBytes;  // A tile, then B tile
constexpr int kCopyIters = kBM * kChunksPerRow / kThreads;  // 16-byte chunks per thread per tile
constexpr int kCopyRowStep = kThreads / kChunksPerRow;      // rows between a thread's chunks

constexpr int kFwdStages = 3;                       // depth of the cp.async ring
constexpr int kFwdSmemBytes = kFwdStages * kStageBytes;  // the forward GEMM's shared memory

static_assert(kBM == kBN, "A and B tiles share the copy assignment");
static_assert(kCopyIters * kThreads == kBM * kChunksPerRow, "copy assignment covers the tile");
static_assert(kWarpM * 2 == kBM && kWarpN * kWarpsN == kBN, "8 warps cover the CTA tile");

// ---- global -> shared copy: thread `tid` copies chunk (copy_row(tid, i), copy_chunk(tid))
// of the A tile and the same of the B tile, for i < kCopyIters. A thread's rows and its
// chunk column stay the same for every k-tile (so it keeps the statistics of its rows).
SKIPDIT_HD int copy_row(int tid, int i) { return tid / kChunksPerRow + kCopyRowStep * i; }
SKIPDIT_HD int copy_chunk(int tid) { return tid % kChunksPerRow; }
SKIPDIT_HD uint32_t tile_offset(int row, int chunk) {
  return static_cast<uint32_t>(row * kRowBytes + chunk * 16);
}

// Column k of the concatenated row z = [x_row | skip_row]: which source and which column.
// D is a multiple of the chunk width, so a chunk never straddles the two.
SKIPDIT_HD bool k_in_skip(int k, int D) { return k >= D; }
SKIPDIT_HD int k_src_col(int k, int D) { return k >= D ? k - D : k; }

// ---- CTA and warp placement. Consecutive CTAs share one M tile (n fastest), so the
// x/skip rows of an M tile are read from DRAM once and reused from L2.
SKIPDIT_HD int64_t cta_m0(int64_t cta, int n_tiles) { return (cta / n_tiles) * kBM; }
SKIPDIT_HD int cta_n0(int64_t cta, int n_tiles) { return static_cast<int>(cta % n_tiles) * kBN; }
SKIPDIT_HD int warp_m(int warp) { return warp / kWarpsN; }
SKIPDIT_HD int warp_n(int warp) { return warp % kWarpsN; }

// ---- ldmatrix.x4 row addresses (byte offsets inside a tile) for k-step ks.
// A (m16 x k-step): matrices 0..3 = (rows 0-7, k-lo), (rows 8-15, k-lo), (rows 0-7, k-hi),
// (rows 8-15, k-hi); lane l gives the address of row (l & 15), half (l >> 4). The four
// result registers are then the A fragment registers in PTX order.
SKIPDIT_HD uint32_t a_ldsm_offset(int warp, int lane, int mt, int ks) {
  const int row = warp_m(warp) * kWarpM + mt * 16 + (lane & 15);
  return static_cast<uint32_t>(row * kRowBytes + ks * 32 + (lane >> 4) * 16);
}
// B (two n8 tiles x k-step), stored [n][k]: matrices 0..3 = (n 0-7, k-lo), (n 0-7, k-hi),
// (n 8-15, k-lo), (n 8-15, k-hi); registers 0,1 are the B fragment of n tile 2*np,
// registers 2,3 that of n tile 2*np + 1.
SKIPDIT_HD uint32_t b_ldsm_offset(int warp, int lane, int np, int ks) {
  const int n = warp_n(warp) * kWarpN + np * 16 + (lane & 7) + ((lane >> 4) << 3);
  return static_cast<uint32_t>(n * kRowBytes + ks * 32 + ((lane >> 3) & 1) * 16);
}

// ---- accumulator (C/D fragment) coordinates inside the CTA tile: register r of the
// m16n8 tile (mt, nt) of lane `lane` holds row acc_row, column acc_col.
SKIPDIT_HD int acc_row(int warp, int lane, int mt, int r) {
  return warp_m(warp) * kWarpM + mt * 16 + (lane >> 2) + (r >> 1) * 8;
}
SKIPDIT_HD int acc_col(int warp, int lane, int nt, int r) {
  return warp_n(warp) * kWarpN + nt * 8 + (lane & 3) * 2 + (r & 1);
}

// ---- Limits of the CUDA kernels (checked by skip_fuse.cu, reported by cuda_limits).
// Rows move in 16-byte chunks (8 elements of a 16-bit type), the epilogue stores column
// pairs, and the LayerNorm backward keeps 2 x 2D fp32 column sums of a CTA in shared
// memory.
constexpr int kDMultiple = 8;      // D and D_out
constexpr int64_t kMaxD = 8192;
constexpr int64_t kMaxRows = (int64_t{1} << 31) - 1;
constexpr int kLnBwdSmemBytesPerD = 2 * 2 * 4;  // bytes per unit of D: [2][2D] floats
SKIPDIT_HD int64_t ln_bwd_smem_bytes(int64_t D) { return kLnBwdSmemBytesPerD * D; }
// The backward's grad_weight = dy^T h and the fp32 (no TF32) forward normalize h in row
// chunks of at most this many bytes.
constexpr int64_t kHChunkBytes = int64_t{64} << 20;

}  // namespace skipdit::skip_fuse
