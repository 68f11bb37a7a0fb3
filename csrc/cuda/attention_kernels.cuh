// Flash-attention forward for DiT shapes: the kernels (tile configurations and the
// choice among them: attention_tiles.h). Written against csrc/cuda/ptx.cuh only, so
// that the CPU harness tests/emu/attention_kernels.cpp compiles these kernels unchanged
// with SKIPDIT_EMULATE and runs them on the emulator's model of a CTA; included by
// csrc/cuda/attention.cu for the GPU.
//
// Layout and math (DESIGN.md section 2): q [B, Nq, H, Dh], k/v [B, Nk, H, Dh] with
// arbitrary element strides for B, N and H (views of one fused qkv tensor are read in
// place) and a contiguous head dim; out [B, Nq, H, Dh] contiguous; lse [B, H, Nq] fp32,
// natural log. softmax is computed online in the log2 domain: with sl2 = scale*log2(e),
// x = s*sl2, m = running max of x, p = exp2(x - m), so exp2 (one MUFU op) replaces exp
// and lse = (m + log2(l)) * ln(2).
//
// Tensor cores: mma.sync m16n8k16 (fp16 or bf16 in, fp32 accumulate) fed by ldmatrix.
// The head dim is tiled by 8 and 16 only, so no power-of-two padding is paid:
//   S = Q K^T  the head dim is the k dim: Dh/16 k16 steps + one m16n8k8 step when
//              Dh % 16 == 8 (72 = 4x16 + 8, 88 = 5x16 + 8);
//   O += P V   the head dim is the n dim: Dh/8 n8 tiles (72 = 9 tiles, 88 = 11).
// Shared memory rows are padded to an odd number of 16-byte chunks (72 and 88 already
// are), which makes every ldmatrix and the epilogue's staging stores bank-conflict free
// without a swizzle.
//
// Two kernels:
//   attention_fwd_kernel        one CTA = kBM query rows of one (batch, head); each warp
//                               owns 16*kMT rows and keeps Q (as MMA fragments), the
//                               running max/sum and O in registers; K/V tiles of kBN
//                               keys stream through a kStages-deep cp.async ring.
//   attention_fwd_short_kernel  Nq, Nk <= 64 (Latte temporal attention, N = 16 with B*H
//                               in the 10^4s): every warp handles a whole (batch, head)
//                               on its own: one cp.async burst brings its Q, K and V
//                               into shared memory, then 16 query rows at a time go
//                               through QK^T, softmax and PV in registers. No
//                               block-wide barrier, so many independent warps per SM
//                               keep the loads in flight.
// Ragged tiles: rows past Nq/Nk and columns past the real head dim are zero-filled by
// cp.async (src-size 0; nothing out of bounds is read), keys past Nk get -inf scores,
// rows past Nq are not stored.
#pragma once

#include <cmath>
#include <cstdint>

#include "cuda/attention_tiles.h"
#include "cuda/ptx.cuh"

namespace skipdit::attention {

constexpr float kLn2 = 0.693147180559945309f;

// ---------------------------------------------------------------------------------
// Loading tiles

// cp.async of rows [row0, row0 + kRows) of a (batch, head) slice g (row stride
// `stride` elements) into shared memory s (row stride kLd), all threads of the CTA
// (kThreads) sharing the 16-byte chunks. Rows >= nrows and chunks past dh: zero-fill.
template <int kRows, int kDh, int kThreads>
SKIPDIT_DEV void load_rows_cta(uint16_t* s, const uint16_t* g, int64_t stride, int row0,
                               int nrows, int dh, int tid) {
  constexpr int kChunks = kDh / 8, kLd = smem_ld(kDh), kTotal = kRows * kChunks;
  // Recompute the chunk addresses for every tile instead of letting the compiler hoist
  // them out of the K/V loop, where they would hold ~2 registers per chunk for good.
  opaque(stride);
#pragma unroll
  for (int i = 0; i < (kTotal + kThreads - 1) / kThreads; ++i) {
    const int c = tid + i * kThreads;
    if (kTotal % kThreads == 0 || c < kTotal) {
      const int r = c / kChunks, ch = c % kChunks;
      const bool ok = row0 + r < nrows && ch * 8 < dh;
      const uint16_t* src = ok ? g + static_cast<int64_t>(row0 + r) * stride + ch * 8 : g;
      cp_async16(smem_u32(s + r * kLd + ch * 8), src, ok);
    }
  }
}

// The same for one warp and a run-time number of rows (attention_fwd_short_kernel).
template <int kDh>
SKIPDIT_DEV void load_rows_warp(uint16_t* s, const uint16_t* g, int64_t stride, int rows,
                                int nrows, int dh, int lane) {
  constexpr int kChunks = kDh / 8, kLd = smem_ld(kDh);
  for (int c = lane; c < rows * kChunks; c += 32) {
    const int r = c / kChunks, ch = c % kChunks;
    const bool ok = r < nrows && ch * 8 < dh;
    const uint16_t* src = ok ? g + static_cast<int64_t>(r) * stride + ch * 8 : g;
    cp_async16(smem_u32(s + r * kLd + ch * 8), src, ok);
  }
}

// ---------------------------------------------------------------------------------
// Warp-level building blocks. A warp computes kMT m16 tiles of query rows; lane l
// holds rows g = l/4 and g + 8 of each tile, columns 2*(l%4) + {0, 1} of each n8 tile
// (the mma accumulator layout).

// Q as A fragments of the warp's rows, kept in registers (kQRegs) or re-read from
// shared memory at every use.
template <int kDh, int kMT, bool kQRegs>
struct QFrags {
  static constexpr int kK16 = kDh / 16;
  uint32_t a[kMT][kK16 > 0 ? kK16 : 1][4];
  uint32_t a8[kMT][2];
};
template <int kDh, int kMT>
struct QFrags<kDh, kMT, false> {};

// Address of lane's row for an x4 A-fragment load of a 16x16 block at (row0, col0):
// lanes 0-15 rows 0-15 at col0, lanes 16-31 rows 0-15 at col0 + 8 (matrices: rows 0-7
// | rows 8-15 | rows 0-7 cols +8 | rows 8-15 cols +8 = registers a0..a3).
template <int kLd>
SKIPDIT_DEV const uint16_t* a_x4_addr(const uint16_t* s, int lane, int col0) {
  return s + (lane & 15) * kLd + col0 + (lane >> 4) * 8;
}

template <int kDh, int kMT, class E>
SKIPDIT_DEV void load_q_frags(QFrags<kDh, kMT, true>& qf, const uint16_t* sQw, int lane) {
  constexpr int kLd = smem_ld(kDh), kK16 = kDh / 16;
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int kk = 0; kk < kK16; ++kk) {
      ldsm_x4(qf.a[mt][kk], smem_u32(a_x4_addr<kLd>(sQw + mt * 16 * kLd, lane, kk * 16)));
    }
    if constexpr (kDh % 16 != 0) {
      // k8 tail: matrices rows 0-7 | rows 8-15 at col kK16*16 (lanes 0-15 give rows).
      ldsm_x2(qf.a8[mt], smem_u32(sQw + (mt * 16 + (lane & 15)) * kLd + kK16 * 16));
    }
  }
}

// s[mt][nt] += Q[rows of tile mt] . K[keys 8nt .. 8nt+7]^T for the key n8 tiles
// nt < 2*n16 (n16 <= kN16 sixteen-key blocks are valid; the rest is skipped).
// sQw: the warp's first Q row in shared memory; sK: the tile's first key row.
template <int kDh, int kMT, int kN16, bool kQRegs, class E>
SKIPDIT_DEV void qk(float (&s)[kMT][2 * kN16][4], const QFrags<kDh, kMT, kQRegs>& qf,
                    const uint16_t* sQw, const uint16_t* sK, int n16, int lane) {
  constexpr int kLd = smem_ld(kDh), kK16 = kDh / 16;
  // B fragments of K for keys n0..n0+15, k16 step at col0: matrices (keys 0-7, col0) |
  // (keys 0-7, col0+8) | (keys 8-15, col0) | (keys 8-15, col0+8), i.e. b0 b1 of n-tile
  // 2j, then b0 b1 of n-tile 2j+1. ldmatrix without .trans: lane gets K[key g][col 2t..]
  // = B[k = 2t..][n = g], the col-major B layout.
  const int krow = (lane & 7) + (lane >> 4) * 8, kcol = ((lane >> 3) & 1) * 8;
#pragma unroll
  for (int kk = 0; kk < kK16; ++kk) {
    uint32_t a[kMT][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
      if constexpr (kQRegs) {
#pragma unroll
        for (int i = 0; i < 4; ++i) a[mt][i] = qf.a[mt][kk][i];
      } else {
        ldsm_x4(a[mt], smem_u32(a_x4_addr<smem_ld(kDh)>(sQw + mt * 16 * kLd, lane, kk * 16)));
      }
    }
#pragma unroll
    for (int j = 0; j < kN16; ++j) {
      if (j < n16) {
        uint32_t b[4];
        ldsm_x4(b, smem_u32(sK + (j * 16 + krow) * kLd + kk * 16 + kcol));
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          mma_m16n8k16<E>(s[mt][2 * j], a[mt], b[0], b[1]);
          mma_m16n8k16<E>(s[mt][2 * j + 1], a[mt], b[2], b[3]);
        }
      }
    }
  }
  if constexpr (kDh % 16 != 0) {
    uint32_t a8[kMT][2];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
      if constexpr (kQRegs) {
        a8[mt][0] = qf.a8[mt][0];
        a8[mt][1] = qf.a8[mt][1];
      } else {
        ldsm_x2(a8[mt], smem_u32(sQw + (mt * 16 + (lane & 15)) * kLd + kK16 * 16));
      }
    }
#pragma unroll
    for (int j = 0; j < kN16; ++j) {
      if (j < n16) {
        // keys 0-7 | keys 8-15 at the last 8 columns: b0 of n-tiles 2j and 2j+1.
        uint32_t b[2];
        ldsm_x2(b, smem_u32(sK + (j * 16 + (lane & 15)) * kLd + kK16 * 16));
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          mma_m16n8k8<E>(s[mt][2 * j], a8[mt][0], a8[mt][1], b[0]);
          mma_m16n8k8<E>(s[mt][2 * j + 1], a8[mt][0], a8[mt][1], b[1]);
        }
      }
    }
  }
}

// Scales the scores into the log2 domain and gives keys >= nk (key index key0 + column)
// a score of -inf, over the first nvalid n-tiles.
template <int kMT, int kNT>
SKIPDIT_DEV void scale_mask(float (&s)[kMT][kNT][4], float sl2, bool mask, int key0, int nk,
                            int nvalid, int lane) {
  const int c0 = key0 + 2 * (lane & 3);
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
      if (nt < nvalid) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const bool out = mask && c0 + nt * 8 + (i & 1) >= nk;
          s[mt][nt][i] = out ? -INFINITY : s[mt][nt][i] * sl2;
        }
      }
    }
  }
}

// Online softmax step over the first nvalid n-tiles of s (already in the log2 domain):
// new running max m, rescales the partial sums l (lane-partial: the 4 lanes of a row
// each sum their own columns) and O by exp2(m_old - m_new), replaces s by p.
// Every row must have at least one finite score in the tile.
template <int kMT, int kNT, int kDT>
SKIPDIT_DEV void softmax_update(float (&s)[kMT][kNT][4], float (&m)[kMT][2], float (&l)[kMT][2],
                                float (&o)[kMT][kDT][4], int nvalid) {
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = m[mt][r];
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        if (nt < nvalid) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * r], s[mt][nt][2 * r + 1]));
      }
      mx = fmaxf(mx, shfl_xor(mx, 1));
      mx = fmaxf(mx, shfl_xor(mx, 2));
      const float alpha = fast_exp2(m[mt][r] - mx);  // 0 on the first tile (m = -inf)
      m[mt][r] = mx;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        if (nt < nvalid) {
          const float p0 = fast_exp2(s[mt][nt][2 * r] - mx);
          const float p1 = fast_exp2(s[mt][nt][2 * r + 1] - mx);
          s[mt][nt][2 * r] = p0;
          s[mt][nt][2 * r + 1] = p1;
          sum += p0 + p1;
        }
      }
      l[mt][r] = l[mt][r] * alpha + sum;
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt) {
        o[mt][dt][2 * r] *= alpha;
        o[mt][dt][2 * r + 1] *= alpha;
      }
    }
  }
}

// o[mt] += P[mt] . V over the key blocks kk < n16 of the tile; P is s rounded to the
// input format. P's A fragment for keys 16kk.. is the accumulator layout of n-tiles
// 2kk, 2kk+1: a0 = (row g, n-tile 2kk), a1 = (row g+8, 2kk), a2 = (g, 2kk+1),
// a3 = (g+8, 2kk+1).
template <int kDh, int kMT, int kN16, class E>
SKIPDIT_DEV void pv(float (&o)[kMT][kDh / 8][4], const float (&s)[kMT][2 * kN16][4],
                    const uint16_t* sV, int n16, int lane) {
  constexpr int kLd = smem_ld(kDh), kDT = kDh / 8;
  // B fragments of V (keys = k dim, head dim = n dim) with ldmatrix.trans: matrices
  // (keys 0-7, cols n0) | (keys 8-15, n0) | (keys 0-7, n0+8) | (keys 8-15, n0+8) give
  // b0 b1 of n-tile n0/8, then of n-tile n0/8 + 1. .trans: lane gets V[key 2t..][col g].
  const int vrow = (lane & 7) + ((lane >> 3) & 1) * 8, vcol = (lane >> 4) * 8;
#pragma unroll
  for (int kk = 0; kk < kN16; ++kk) {
    if (kk < n16) {
      uint32_t a[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        a[mt][0] = pack2<E>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        a[mt][1] = pack2<E>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        a[mt][2] = pack2<E>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        a[mt][3] = pack2<E>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
      const uint16_t* vk = sV + (kk * 16 + vrow) * kLd;
#pragma unroll
      for (int dp = 0; dp < kDT / 2; ++dp) {
        uint32_t b[4];
        ldsm_x4_trans(b, smem_u32(vk + dp * 16 + vcol));
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          mma_m16n8k16<E>(o[mt][2 * dp], a[mt], b[0], b[1]);
          mma_m16n8k16<E>(o[mt][2 * dp + 1], a[mt], b[2], b[3]);
        }
      }
      if constexpr (kDT % 2 != 0) {
        // Odd number of n8 tiles (72 -> 9, 88 -> 11): the last one alone, matrices
        // (keys 0-7 | keys 8-15) at its 8 columns, addressed by lanes 0-15.
        uint32_t b[2];
        ldsm_x2_trans(b, smem_u32(vk + (kDT - 1) * 8));
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) mma_m16n8k16<E>(o[mt][kDT - 1], a[mt], b[0], b[1]);
      }
    }
  }
}

// Epilogue of a warp's kMT*16 rows (global query rows row0..): O / l rounded to the
// input format, staged through the warp's own rows of shared memory (sStage, row stride
// smem_ld(kDh)) so that each row goes out as 16-byte stores; lse for rows < Nq.
template <int kDh, int kMT, class E>
SKIPDIT_DEV void store_rows(float (&o)[kMT][kDh / 8][4], const float (&m)[kMT][2],
                            float (&l)[kMT][2], uint16_t* sStage, const FwdParams& p,
                            int64_t bh, int64_t b, int h, int row0, int lane) {
  constexpr int kLd = smem_ld(kDh), kDT = kDh / 8, kChunks = kDh / 8;
  const int g = lane >> 2, t = lane & 3;
  warp_sync();  // all lanes are done reading these rows (Q fragments)
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float sum = l[mt][r];
      sum += shfl_xor(sum, 1);
      sum += shfl_xor(sum, 2);
      const float inv = 1.f / sum;
      const int row = mt * 16 + g + 8 * r;
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt) {
        st_shared_u32(sStage + row * kLd + dt * 8 + 2 * t,
                      pack2<E>(o[mt][dt][2 * r] * inv, o[mt][dt][2 * r + 1] * inv));
      }
      const int q = row0 + row;
      if (t == 0 && q < p.Nq) {
        st_global_f32(p.lse + bh * p.Nq + q, (m[mt][r] + fast_log2(sum)) * kLn2);
      }
    }
  }
  warp_sync();
  for (int c = lane; c < kMT * 16 * kChunks; c += 32) {
    const int r = c / kChunks, ch = c % kChunks;
    const int q = row0 + r;
    if (q < p.Nq && ch * 8 < p.dh) {
      uint16_t* dst = p.out + ((b * p.Nq + q) * p.H + h) * p.dh + ch * 8;
      st_global_v4(dst, ld_shared_v4(sStage + r * kLd + ch * 8));
    }
  }
}

// ---------------------------------------------------------------------------------
// The kernels

template <class C, class E>
__global__ void __launch_bounds__(C::kThreads) attention_fwd_kernel(const FwdParams p) {
  SKIPDIT_DYNAMIC_SMEM(char, smem);
  const int tid = threadIdx.x;
  const int64_t block = blockIdx.x;
  constexpr int kDh = C::kDh, kMT = C::kMT, kBN = C::kBN, kN16 = kBN / 16, kNT = kBN / 8;
  constexpr int kDT = kDh / 8, kLd = C::kLd, kStages = C::kStages;
  const int warp = tid >> 5, lane = tid & 31;
  const int64_t bh = block / p.q_tiles;
  const int q0 = static_cast<int>(block - bh * p.q_tiles) * C::kBM;
  const int64_t b = bh / p.H;
  const int h = static_cast<int>(bh - b * p.H);
  const uint16_t* qg = p.q + b * p.q_sb + h * p.q_sh;
  const uint16_t* kg = p.k + b * p.k_sb + h * p.k_sh;
  const uint16_t* vg = p.v + b * p.v_sb + h * p.v_sh;

  uint16_t* sQ = reinterpret_cast<uint16_t*>(smem);
  uint16_t* sKV = sQ + C::kBM * kLd;  // stage s: K at sKV + s*2*kBN*kLd, V right after
  const int nkt = (p.Nk + kBN - 1) / kBN;

  auto load_kv = [&](int j) {
    uint16_t* sK = sKV + (j % kStages) * 2 * kBN * kLd;
    load_rows_cta<kBN, kDh, C::kThreads>(sK, kg, p.k_sn, j * kBN, p.Nk, p.dh, tid);
    load_rows_cta<kBN, kDh, C::kThreads>(sK + kBN * kLd, vg, p.v_sn, j * kBN, p.Nk, p.dh, tid);
  };

  // Prologue: group 0 = Q + K/V tile 0, then tiles 1 .. kStages-2, one group each
  // (empty groups past the last tile keep the group count uniform).
  load_rows_cta<C::kBM, kDh, C::kThreads>(sQ, qg, p.q_sn, q0, p.Nq, p.dh, tid);
#pragma unroll
  for (int j = 0; j < kStages - 1; ++j) {
    if (j < nkt) load_kv(j);
    cp_async_commit();
  }

  uint16_t* sQw = sQ + warp * 16 * kMT * kLd;  // this warp's rows (Q, then the output)
  QFrags<kDh, kMT, C::kQRegs> qf;
  if constexpr (C::kQRegs) {
    cp_async_wait<kStages - 2>();
    block_sync();
    load_q_frags<kDh, kMT, E>(qf, sQw, lane);
  }

  float o[kMT][kDT][4];
  float m[kMT][2], l[kMT][2];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) o[mt][dt][i] = 0.f;
    }
    m[mt][0] = m[mt][1] = -INFINITY;
    l[mt][0] = l[mt][1] = 0.f;
  }

  for (int j = 0; j < nkt; ++j) {
    // Tile j has landed (this thread's copies; the barrier publishes everyone's), and
    // every warp is done with tile j-1, whose stage the next load reuses.
    cp_async_wait<kStages - 2>();
    block_sync();
    if (j + kStages - 1 < nkt) load_kv(j + kStages - 1);
    cp_async_commit();

    const uint16_t* sK = sKV + (j % kStages) * 2 * kBN * kLd;
    float s[kMT][kNT][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
        for (int i = 0; i < 4; ++i) s[mt][nt][i] = 0.f;
      }
    }
    qk<kDh, kMT, kN16, C::kQRegs, E>(s, qf, sQw, sK, kN16, lane);
    scale_mask<kMT, kNT>(s, p.scale_log2, (j + 1) * kBN > p.Nk, j * kBN, p.Nk, kNT, lane);
    softmax_update<kMT, kNT, kDT>(s, m, l, o, kNT);
    pv<kDh, kMT, kN16, E>(o, s, sK + kBN * kLd, kN16, lane);
  }

  store_rows<kDh, kMT, E>(o, m, l, sQw, p, bh, b, h, q0 + warp * 16 * kMT, lane);
}

template <class C, class E>
__global__ void __launch_bounds__(32 * C::kMaxWarps, 1)
    attention_fwd_short_kernel(const FwdParams p) {
  SKIPDIT_DYNAMIC_SMEM(char, smem);
  const int tid = threadIdx.x, nwarps = blockDim.x / 32;
  const int64_t block = blockIdx.x;
  constexpr int kDh = C::kDh, kLd = C::kLd, kN16 = C::kN16, kNT = 2 * kN16, kDT = kDh / 8;
  const int warp = tid >> 5, lane = tid & 31;
  const int64_t bh = block * nwarps + warp;
  if (bh >= p.BH) return;  // whole warps only; nothing below synchronizes across warps
  const int64_t b = bh / p.H;
  const int h = static_cast<int>(bh - b * p.H);
  const int n16 = p.n16, rows = 16 * n16;
  uint16_t* sQ = reinterpret_cast<uint16_t*>(smem + warp * C::warp_bytes(n16));
  uint16_t* sK = sQ + rows * kLd;
  uint16_t* sV = sK + rows * kLd;
  load_rows_warp<kDh>(sQ, p.q + b * p.q_sb + h * p.q_sh, p.q_sn, rows, p.Nq, p.dh, lane);
  load_rows_warp<kDh>(sK, p.k + b * p.k_sb + h * p.k_sh, p.k_sn, rows, p.Nk, p.dh, lane);
  load_rows_warp<kDh>(sV, p.v + b * p.v_sb + h * p.v_sh, p.v_sn, rows, p.Nk, p.dh, lane);
  cp_async_commit();
  cp_async_wait<0>();
  warp_sync();

  const QFrags<kDh, 1, false> qf;
  for (int r0 = 0; r0 < p.Nq; r0 += 16) {
    float s[1][kNT][4];
    float o[1][kDT][4];
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) s[0][nt][i] = 0.f;
    }
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) o[0][dt][i] = 0.f;
    }
    float m[1][2] = {{-INFINITY, -INFINITY}}, l[1][2] = {{0.f, 0.f}};
    qk<kDh, 1, kN16, false, E>(s, qf, sQ + r0 * kLd, sK, n16, lane);
    scale_mask<1, kNT>(s, p.scale_log2, true, 0, p.Nk, 2 * n16, lane);
    softmax_update<1, kNT, kDT>(s, m, l, o, 2 * n16);
    pv<kDh, 1, kN16, E>(o, s, sV, n16, lane);
    store_rows<kDh, 1, E>(o, m, l, sQ + r0 * kLd, p, bh, b, h, r0, lane);
  }
}

}  // namespace skipdit::attention
