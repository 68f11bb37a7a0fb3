// Device code of skip_fuse on CUDA (see skip_fuse.cu for the design and the host side;
// tile geometry in skip_fuse_tiles.h).
//
// Written against csrc/cuda/ptx.cuh only (elements are raw bits: uint16_t for float16
// and bfloat16, float for float32), so that the CPU harness tests/emu/skip_fuse_kernels.cpp
// compiles these kernel bodies unchanged with SKIPDIT_EMULATE and runs them on the
// emulator's model of a CTA (tests/emu/cta.h, ptx_emu.h).
#pragma once

#include <cmath>
#include <cstdint>

#include "cuda/ptx.cuh"
#include "cuda/skip_fuse_tiles.h"

namespace skipdit::skip_fuse {

// ---------------------------------------------------------------------------
// Per-format pieces: a 16-byte chunk of elements <-> floats, the MMA operands, stores.

// float16 / bfloat16 activations: m16n8k16 MMA on the 16-bit operands.
template <class E>
struct Vec {
  using S = uint16_t;
  static constexpr int N = 8;  // elements per 16-byte chunk
  SKIPDIT_DEV static void load(const U128& v, float (&f)[N]) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = to_float<E>(static_cast<uint16_t>(v.w[i] & 0xffffu));
      f[2 * i + 1] = to_float<E>(static_cast<uint16_t>(v.w[i] >> 16));
    }
  }
  SKIPDIT_DEV static U128 store(const float (&f)[N]) {
    return U128{{pack2<E>(f[0], f[1]), pack2<E>(f[2], f[3]), pack2<E>(f[4], f[5]),
                 pack2<E>(f[6], f[7])}};
  }
  SKIPDIT_DEV static U128 store_operand(const float (&f)[N]) { return store(f); }
  SKIPDIT_DEV static uint32_t b_operand(uint32_t r) { return r; }
  SKIPDIT_DEV static float load1(S v) { return to_float<E>(v); }
  SKIPDIT_DEV static void store_pair(S* p, float a, float b) { st_global_u32(p, pack2<E>(a, b)); }
  SKIPDIT_DEV static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    mma_m16n8k16<E>(d, a, b0, b1);
  }
};

// float32 activations: the GEMM operands are tf32 (rounded to nearest), accumulation fp32.
template <>
struct Vec<F32> {
  using S = float;
  static constexpr int N = 4;
  SKIPDIT_DEV static void load(const U128& v, float (&f)[N]) {
#pragma unroll
    for (int i = 0; i < 4; ++i) f[i] = bits_to_float(v.w[i]);
  }
  SKIPDIT_DEV static U128 store(const float (&f)[N]) {
    return U128{
        {float_to_bits(f[0]), float_to_bits(f[1]), float_to_bits(f[2]), float_to_bits(f[3])}};
  }
  SKIPDIT_DEV static U128 store_operand(const float (&f)[N]) {
    return U128{{to_tf32(f[0]), to_tf32(f[1]), to_tf32(f[2]), to_tf32(f[3])}};
  }
  SKIPDIT_DEV static uint32_t b_operand(uint32_t r) { return to_tf32(bits_to_float(r)); }
  SKIPDIT_DEV static float load1(S v) { return v; }
  SKIPDIT_DEV static void store_pair(S* p, float a, float b) {
    st_global_v2(p, float_to_bits(a), float_to_bits(b));
  }
  SKIPDIT_DEV static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    mma_m16n8k8_tf32(d, a, b0, b1);
  }
};

// Mean and 1 / std of one row z = [x_row | skip_row].
struct alignas(8) RowStats {
  float mean, rstd;
};

// CE floats of an fp32 vector (gamma, beta) starting at p (16-byte aligned).
template <int CE>
SKIPDIT_DEV void load_f32(const float* __restrict__ p, float (&f)[CE]) {
#pragma unroll
  for (int v = 0; v < CE / 4; ++v) {
    const U128 t = ldg_v4(p + 4 * v);
#pragma unroll
    for (int e = 0; e < 4; ++e) f[4 * v + e] = bits_to_float(t.w[e]);
  }
}

// ---------------------------------------------------------------------------
// Row statistics: mean and rstd of z = [x_row | skip_row] (width 2D), fp32.
//
// One warp per row, corrected two-pass: the mean first, then M2 = sum(d^2) - sum(d)^2 / n
// with d = z - mean (the second pass re-reads the row from L1). Its error is O(n u) and,
// unlike E[z^2] - E[z]^2 or one-pass updating (Welford / Chan merges), does not grow with
// |mean| / std, the ratio that rows with a large offset make 1000.

constexpr int kStatsThreads = 256;

SKIPDIT_DEV float warp_allsum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += shfl_xor(v, o);
  return v;  // the same value in every lane (fp32 addition is commutative)
}

template <class E, class S = typename Vec<E>::S>
__global__ void __launch_bounds__(kStatsThreads)
    skip_fuse_row_stats_kernel(const S* __restrict__ x, int64_t ldx, const S* __restrict__ skip,
                               int64_t lds, int64_t M, int D, float eps,
                               RowStats* __restrict__ stats) {
  using V = Vec<E>;
  constexpr int CE = V::N;
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kStatsThreads / 32) + (threadIdx.x >> 5);
  if (row >= M) return;  // whole warps
  const int half = D / CE;  // chunks per half row
  const S* xr = x + row * ldx;
  const S* sr = skip + row * lds;
  const float inv_n = 1.f / static_cast<float>(2 * D);
  float s = 0.f;
  for (int c = lane; c < 2 * half; c += 32) {
    float f[CE];
    V::load(ldg_v4(c < half ? xr + c * CE : sr + (c - half) * CE), f);
#pragma unroll
    for (int e = 0; e < CE; ++e) s += f[e];
  }
  const float mean = warp_allsum(s) * inv_n;
  float q = 0.f, c1 = 0.f;
  for (int c = lane; c < 2 * half; c += 32) {
    float f[CE];
    V::load(ldg_v4(c < half ? xr + c * CE : sr + (c - half) * CE), f);
#pragma unroll
    for (int e = 0; e < CE; ++e) {
      const float d = f[e] - mean;
      c1 += d;
      q += d * d;
    }
  }
  q = warp_allsum(q);
  c1 = warp_allsum(c1);
  if (lane == 0) {
    const float var = fmaxf((q - c1 * c1 * inv_n) * inv_n, 0.f);
    st_global_v2(stats + row, float_to_bits(mean), float_to_bits(rsqrt_approx(var + eps)));
  }
}

// ---------------------------------------------------------------------------
// Forward GEMM with the normalizing prologue.

template <class E, class S = typename Vec<E>::S>
struct FwdArgs {
  const S* x;
  const S* skip;
  const S* w;
  const S* bias;          // nullptr: no bias
  const float* gamma;     // [K] fp32
  const float* beta;      // [K] fp32
  const RowStats* stats;  // [M]
  S* y;                   // [M, N] contiguous
  int64_t ldx, lds, ldw;  // row strides in elements
  int64_t M;
  int N, D, K;
};

// CTAs per SM the register budget is sized for: on sm_90 two CTAs (2 x 108 KiB of the
// 228 KiB shared memory, <= 128 registers per thread); on sm_80 the 164 KiB of shared
// memory hold one CTA anyway, so the kernel may use up to 255 registers.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
constexpr int kFwdMinBlocks = 2;
#else
constexpr int kFwdMinBlocks = 1;
#endif

template <class E, int kStages>
__global__ void __launch_bounds__(kThreads, kFwdMinBlocks)
    skip_fuse_fwd_kernel(const FwdArgs<E> a) {
  using V = Vec<E>;
  using S = typename V::S;
  constexpr int CE = V::N;                        // elements per 16-byte chunk
  constexpr int BK = kTileKBytes / sizeof(S);     // K elements per k-tile
  SKIPDIT_DYNAMIC_SMEM(unsigned char, smem);
  const uint32_t sbase = smem_u32(smem);
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int n_tiles = (a.N + kBN - 1) / kBN;
  const int64_t m0 = cta_m0(blockIdx.x, n_tiles);
  const int n0 = cta_n0(blockIdx.x, n_tiles);
  const int chunk = copy_chunk(tid);

  // Statistics of the A rows this thread copies and normalizes; rows past M get
  // (0, 0) so their (discarded) operand values stay finite.
  float mu[kCopyIters], rs[kCopyIters];
#pragma unroll
  for (int i = 0; i < kCopyIters; ++i) {
    const int64_t r = m0 + copy_row(tid, i);
    const RowStats st = r < a.M ? a.stats[r] : RowStats{0.f, 0.f};
    mu[i] = st.mean;
    rs[i] = st.rstd;
  }

  // Issue the copies of k-tile kt into ring slot `slot`. Chunks past M, N or K are
  // zero-filled (no global read).
  auto issue = [&](int kt, int slot) {
    const int kk = kt * BK + chunk * CE;
    const bool kok = kk < a.K;
    const bool in_skip = k_in_skip(kk, a.D);
    const int col = k_src_col(kk, a.D);
    const S* abase = in_skip ? a.skip : a.x;
    const int64_t ald = in_skip ? a.lds : a.ldx;
    const uint32_t sa = sbase + slot * kStageBytes;
    const uint32_t sb = sa + kTileBytes;
#pragma unroll
    for (int i = 0; i < kCopyIters; ++i) {
      const int row = copy_row(tid, i);
      const int64_t r = m0 + row;
      const bool ok = kok && r < a.M;
      const S* src = ok ? abase + r * ald + col : a.x;
      cp_async16(sa + tile_offset(row, chunk), src, ok);
    }
#pragma unroll
    for (int i = 0; i < kCopyIters; ++i) {
      const int row = copy_row(tid, i);
      const int n = n0 + row;
      const bool ok = kok && n < a.N;
      const S* src = ok ? a.w + static_cast<int64_t>(n) * a.ldw + kk : a.w;
      cp_async16(sb + tile_offset(row, chunk), src, ok);
    }
  };

  // gamma / beta of this thread's chunk column in k-tile kt (zero past K, which keeps
  // the zero-filled tail of the last k-tile at zero after normalization).
  auto load_affine = [&](int kt, float (&g)[CE], float (&b)[CE]) {
    const int kk = kt * BK + chunk * CE;
    if (kk < a.K) {
      load_f32<CE>(a.gamma + kk, g);
      load_f32<CE>(a.beta + kk, b);
    } else {
#pragma unroll
      for (int e = 0; e < CE; ++e) g[e] = b[e] = 0.f;
    }
  };

  float acc[kMTiles][kNTiles][4];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[mt][nt][r] = 0.f;

  const int KT = (a.K + BK - 1) / BK;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < KT) issue(s, s);
    cp_async_commit();
  }
  float g[CE], b[CE];
  load_affine(0, g, b);

  for (int kt = 0; kt < KT; ++kt) {
    const int slot = kt % kStages;
    // This thread's copies of k-tile kt have landed (groups complete in order).
    cp_async_wait<kStages - 2>();
    // Normalize, in place, the A chunks this thread copied: h = (z - mean) * rstd *
    // gamma + beta in fp32, rounded to the operand dtype.
    {
      unsigned char* tile = smem + slot * kStageBytes;
#pragma unroll
      for (int i = 0; i < kCopyIters; ++i) {
        unsigned char* p = tile + tile_offset(copy_row(tid, i), chunk);
        float f[CE];
        V::load(ld_shared_v4(p), f);
#pragma unroll
        for (int e = 0; e < CE; ++e) f[e] = fmaf((f[e] - mu[i]) * rs[i], g[e], b[e]);
        st_shared_v4(p, V::store_operand(f));
      }
    }
    if (kt + 1 < KT) load_affine(kt + 1, g, b);
    // Every thread's normalized chunks and B copies of k-tile kt are visible, and every
    // warp is done with the MMAs of k-tile kt - 1, whose slot is refilled next.
    block_sync();
    if (kt + kStages - 1 < KT) issue(kt + kStages - 1, (kt + kStages - 1) % kStages);
    cp_async_commit();

    const uint32_t ta = sbase + slot * kStageBytes;
    const uint32_t tb = ta + kTileBytes;
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
      uint32_t af[kMTiles][4];
      uint32_t bf[kNTiles][2];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) ldsm_x4(af[mt], ta + a_ldsm_offset(warp, lane, mt, ks));
#pragma unroll
      for (int np = 0; np < kNTiles / 2; ++np) {
        uint32_t r[4];
        ldsm_x4(r, tb + b_ldsm_offset(warp, lane, np, ks));
        bf[2 * np][0] = V::b_operand(r[0]);
        bf[2 * np][1] = V::b_operand(r[1]);
        bf[2 * np + 1][0] = V::b_operand(r[2]);
        bf[2 * np + 1][1] = V::b_operand(r[3]);
      }
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) V::mma(acc[mt][nt], af[mt], bf[nt][0], bf[nt][1]);
    }
  }
  cp_async_wait<0>();  // only empty groups can be pending here

  // Epilogue: bias, round, store. Columns come in even pairs and N is a multiple of 8.
#pragma unroll
  for (int nt = 0; nt < kNTiles; ++nt) {
    const int col = n0 + acc_col(warp, lane, nt, 0);
    if (col >= a.N) continue;
    float b0 = 0.f, b1 = 0.f;
    if (a.bias != nullptr) {
      b0 = V::load1(a.bias[col]);
      b1 = V::load1(a.bias[col + 1]);
    }
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const int64_t row = m0 + acc_row(warp, lane, mt, 2 * hr);
        if (row < a.M) {
          V::store_pair(a.y + row * a.N + col, acc[mt][nt][2 * hr] + b0, acc[mt][nt][2 * hr + 1] + b1);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------
// h rows [r0, r0 + rows) into a [rows, 2D] buffer (exact rounding to T; used by the
// fp32 no-TF32 forward and by grad_weight).

constexpr int kEltThreads = 256;

template <class E, class S = typename Vec<E>::S>
__global__ void __launch_bounds__(kEltThreads)
    skip_fuse_normalize_rows_kernel(const S* __restrict__ x, int64_t ldx,
                                    const S* __restrict__ skip, int64_t lds,
                                    const RowStats* __restrict__ stats,
                                    const float* __restrict__ gamma,
                                    const float* __restrict__ beta, int64_t r0, int64_t rows,
                                    int D, S* __restrict__ h) {
  using V = Vec<E>;
  constexpr int CE = V::N;
  const int half = D / CE;
  const int nchunks = 2 * half;
  const int64_t total = rows * nchunks;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kEltThreads + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * kEltThreads) {
    const int64_t i = idx / nchunks;
    const int j = static_cast<int>(idx - i * nchunks);
    const int64_t r = r0 + i;
    const S* src = j < half ? x + r * ldx + j * CE : skip + r * lds + (j - half) * CE;
    float f[CE], g[CE], b[CE];
    V::load(ldg_v4(src), f);
    load_f32<CE>(gamma + j * CE, g);
    load_f32<CE>(beta + j * CE, b);
    const RowStats st = stats[r];
#pragma unroll
    for (int e = 0; e < CE; ++e) f[e] = fmaf((f[e] - st.mean) * st.rstd, g[e], b[e]);
    st_global_v4(h + i * (2 * static_cast<int64_t>(D)) + j * CE, V::store(f));
  }
}

// ---------------------------------------------------------------------------
// LayerNorm backward, split into grad_x / grad_skip, with per-CTA partial sums of the
// affine-parameter gradients.
//
// A CTA walks rows blockIdx.x, blockIdx.x + gridDim.x, ...; for each row all its
// threads share the row: thread t handles the 16-byte chunks t, t + 256, ... (so each
// column always belongs to the same thread, which accumulates its grad_norm_weight /
// grad_norm_bias partials in shared memory without atomics). Per row:
//   xhat = (z - mean) * rstd, g = dh * gamma, c1 = mean(g), c2 = mean(g * xhat),
//   dz = rstd * (g - c1 - xhat * c2).

constexpr int kLnThreads = 256;

template <class E, class S = typename Vec<E>::S>
__global__ void __launch_bounds__(kLnThreads)
    skip_fuse_ln_bwd_kernel(const S* __restrict__ dh, const S* __restrict__ x, int64_t ldx,
                            const S* __restrict__ skip, int64_t lds,
                            const RowStats* __restrict__ stats, const float* __restrict__ gamma,
                            int64_t M, int D, S* __restrict__ gx, S* __restrict__ gs,
                            float* __restrict__ partial) {
  using V = Vec<E>;
  constexpr int CE = V::N;
  SKIPDIT_DYNAMIC_SMEM(float, colacc);  // [2][CE][nchunks]: grad_gamma, grad_beta partials
  __shared__ float red[2][kLnThreads / 32][2];
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int half = D / CE;
  const int nchunks = 2 * half;
  const int K = 2 * D;
  for (int j = tid; j < nchunks; j += kLnThreads) {
#pragma unroll
    for (int e = 0; e < CE; ++e) {
      colacc[e * nchunks + j] = 0.f;
      colacc[K + e * nchunks + j] = 0.f;
    }
  }
  int parity = 0;
  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const RowStats st = stats[row];
    const float mu = st.mean, rs = st.rstd;
    const S* dhr = dh + row * K;
    const S* xr = x + row * ldx;
    const S* sr = skip + row * lds;
    // chunk j of dh, of z = [x | skip] and of gamma (the row is read twice, from L1)
    auto load_chunk = [&](int j, float (&d)[CE], float (&z)[CE], float (&g)[CE]) {
      V::load(ldg_v4(dhr + j * CE), d);
      V::load(ldg_v4(j < half ? xr + j * CE : sr + (j - half) * CE), z);
      load_f32<CE>(gamma + j * CE, g);
    };
    float s1 = 0.f, s2 = 0.f;
    for (int j = tid; j < nchunks; j += kLnThreads) {
      float d[CE], z[CE], g[CE];
      load_chunk(j, d, z, g);
#pragma unroll
      for (int e = 0; e < CE; ++e) {
        const float xh = (z[e] - mu) * rs;
        const float dg = d[e] * g[e];
        s1 += dg;
        s2 += dg * xh;
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      s1 += shfl_xor(s1, o);
      s2 += shfl_xor(s2, o);
    }
    if (lane == 0) {
      red[parity][warp][0] = s1;
      red[parity][warp][1] = s2;
    }
    // One barrier per row: the two reduction slots alternate, and a slot is written
    // again only after the next row's barrier, which every reader has passed.
    block_sync();
    float t1 = 0.f, t2 = 0.f;
#pragma unroll
    for (int w = 0; w < kLnThreads / 32; ++w) {
      t1 += red[parity][w][0];
      t2 += red[parity][w][1];
    }
    parity ^= 1;
    const float c1 = t1 / K, c2 = t2 / K;
    for (int j = tid; j < nchunks; j += kLnThreads) {
      float d[CE], z[CE], g[CE], o[CE];
      load_chunk(j, d, z, g);
#pragma unroll
      for (int e = 0; e < CE; ++e) {
        const float xh = (z[e] - mu) * rs;
        o[e] = rs * (d[e] * g[e] - c1 - xh * c2);
        colacc[e * nchunks + j] += d[e] * xh;
        colacc[K + e * nchunks + j] += d[e];
      }
      S* dst = j < half ? gx + row * D + j * CE : gs + row * D + (j - half) * CE;
      st_global_v4(dst, V::store(o));
    }
  }
  float* out = partial + static_cast<int64_t>(blockIdx.x) * 2 * K;
  for (int j = tid; j < nchunks; j += kLnThreads) {
#pragma unroll
    for (int e = 0; e < CE; ++e) {
      st_global_f32(out + j * CE + e, colacc[e * nchunks + j]);
      st_global_f32(out + K + j * CE + e, colacc[K + e * nchunks + j]);
    }
  }
}

// Column sums of partial[P, 2K] in a fixed order -> grad_gamma [K], grad_beta [K] in
// the format O of the norm parameters (F32, or the activations' F16 / BF16).
template <class O, class S = typename Vec<O>::S>
__global__ void __launch_bounds__(kEltThreads)
    skip_fuse_col_sums_kernel(const float* __restrict__ partial, int P, int K,
                              S* __restrict__ dg, S* __restrict__ db) {
  const int j = blockIdx.x * kEltThreads + threadIdx.x;
  if (j >= 2 * K) return;
  float s = 0.f;
  for (int p = 0; p < P; ++p) s += partial[static_cast<int64_t>(p) * 2 * K + j];
  S* dst = j < K ? dg + j : db + (j - K);
  if constexpr (std::is_same_v<O, F32>) {
    st_global_f32(dst, s);
  } else {
    st_global_u16(dst, from_float<O>(s));
  }
}

}  // namespace skipdit::skip_fuse
