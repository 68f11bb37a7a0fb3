// Device code of skip_fuse on CUDA (see skip_fuse.cu for the design and the host side).
//
// Included by skip_fuse.cu, and by the CPU harness tests/cpp/skip_fuse_kernel_emu.cpp
// with SKIPDIT_SF_EMULATE defined: the harness runs these kernel bodies on CPU threads
// (one per CUDA thread, real barriers) and supplies the PTX instructions (cp.async,
// ldmatrix, mma.sync, cvt.rna.tf32) and the CUDA built-ins from emulations written from
// the PTX ISA. Only the small wrappers below differ between the two builds.
#pragma once

#include <cstdint>

#include "skip_fuse_tile.h"

#if defined(SKIPDIT_SF_EMULATE)
#define SKIPDIT_SF_DYN_SMEM(type, name) type* name = reinterpret_cast<type*>(skipdit_emu::dynamic_smem())
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define SKIPDIT_SF_DYN_SMEM(type, name) extern __shared__ __align__(128) type name[]
#endif

namespace skipdit {
namespace {

enum : int { kMmaBf16 = 0, kMmaF16 = 1, kMmaTf32 = 2 };

// ---------------------------------------------------------------------------
// PTX wrappers

#if defined(SKIPDIT_SF_EMULATE)
// CPU harness: the instructions below are replaced by skipdit_emu:: functions with the
// semantics of the PTX ISA (tests/cpp/skip_fuse_kernel_emu.cpp).
__device__ __forceinline__ uint32_t smem_u32(const void* p) { return skipdit_emu::smem_u32(p); }
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  skipdit_emu::cp_async16(dst, src, src_bytes);
}
__device__ __forceinline__ void cp_async_commit() { skipdit_emu::cp_async_commit(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  skipdit_emu::cp_async_wait(N);
}
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) { skipdit_emu::ldsm_x4(r, addr); }
__device__ __forceinline__ uint32_t to_tf32(float f) { return skipdit_emu::to_tf32(f); }
template <int kKind>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  skipdit_emu::mma<kKind>(d, a, b0, b1);
}
#else
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; src_bytes = 0 writes zeros and reads nothing.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

__device__ __forceinline__ uint32_t to_tf32(float f) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(f));
  return r;
}

// d += a * b for one m16n8 tile: kMmaBf16 / kMmaF16 (m16n8k16), kMmaTf32 (m16n8k8).
template <int kKind>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  if constexpr (kKind == kMmaBf16) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else if constexpr (kKind == kMmaF16) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}
#endif

__device__ __forceinline__ uint4 ldg16(const void* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

// ---------------------------------------------------------------------------
// Per-dtype pieces: a 16-byte chunk of elements <-> floats, the MMA, output stores.

template <typename T>
struct Vec;

template <>
struct Vec<__nv_bfloat16> {
  static constexpr int N = 8;
  __device__ static void load(const uint4& v, float (&f)[N]) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      // bf16 -> fp32 is a shift of the bit pattern.
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
  __device__ static uint32_t pack2(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);  // a in the low half
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ static uint4 store(const float (&f)[N]) {
    return make_uint4(pack2(f[0], f[1]), pack2(f[2], f[3]), pack2(f[4], f[5]), pack2(f[6], f[7]));
  }
  __device__ static uint4 store_operand(const float (&f)[N]) { return store(f); }
  __device__ static uint32_t b_operand(uint32_t r) { return r; }
  __device__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  __device__ static void store_pair(__nv_bfloat16* p, float a, float b) {
    *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
  }
  __device__ static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    mma_16816<kMmaBf16>(d, a, b0, b1);
  }
};

template <>
struct Vec<__half> {
  static constexpr int N = 8;
  __device__ static void load(const uint4& v, float (&f)[N]) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      __half2 h = *reinterpret_cast<const __half2*>(&w[i]);
      const float2 t = __half22float2(h);
      f[2 * i] = t.x;
      f[2 * i + 1] = t.y;
    }
  }
  __device__ static uint32_t pack2(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ static uint4 store(const float (&f)[N]) {
    return make_uint4(pack2(f[0], f[1]), pack2(f[2], f[3]), pack2(f[4], f[5]), pack2(f[6], f[7]));
  }
  __device__ static uint4 store_operand(const float (&f)[N]) { return store(f); }
  __device__ static uint32_t b_operand(uint32_t r) { return r; }
  __device__ static float to_float(__half v) { return __half2float(v); }
  __device__ static __half from_float(float v) { return __float2half_rn(v); }
  __device__ static void store_pair(__half* p, float a, float b) {
    *reinterpret_cast<__half2*>(p) = __floats2half2_rn(a, b);
  }
  __device__ static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    mma_16816<kMmaF16>(d, a, b0, b1);
  }
};

// fp32 activations: the GEMM operands are tf32 (rounded to nearest), accumulation fp32.
template <>
struct Vec<float> {
  static constexpr int N = 4;
  __device__ static void load(const uint4& v, float (&f)[N]) {
    f[0] = __uint_as_float(v.x);
    f[1] = __uint_as_float(v.y);
    f[2] = __uint_as_float(v.z);
    f[3] = __uint_as_float(v.w);
  }
  __device__ static uint4 store(const float (&f)[N]) {
    return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]),
                      __float_as_uint(f[3]));
  }
  __device__ static uint4 store_operand(const float (&f)[N]) {
    return make_uint4(to_tf32(f[0]), to_tf32(f[1]), to_tf32(f[2]), to_tf32(f[3]));
  }
  __device__ static uint32_t b_operand(uint32_t r) { return to_tf32(__uint_as_float(r)); }
  __device__ static float to_float(float v) { return v; }
  __device__ static float from_float(float v) { return v; }
  __device__ static void store_pair(float* p, float a, float b) {
    *reinterpret_cast<float2*>(p) = make_float2(a, b);
  }
  __device__ static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    mma_16816<kMmaTf32>(d, a, b0, b1);
  }
};

// CE floats of an fp32 vector (gamma, beta) starting at p (16-byte aligned).
template <int CE>
__device__ __forceinline__ void load_f32(const float* __restrict__ p, float (&f)[CE]) {
#pragma unroll
  for (int v = 0; v < CE / 4; ++v) {
    const float4 t = __ldg(reinterpret_cast<const float4*>(p) + v);
    f[4 * v] = t.x;
    f[4 * v + 1] = t.y;
    f[4 * v + 2] = t.z;
    f[4 * v + 3] = t.w;
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

__device__ __forceinline__ float warp_allsum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;  // the same value in every lane (fp32 addition is commutative)
}

template <typename T>
__global__ void __launch_bounds__(kStatsThreads)
    row_stats_kernel(const T* __restrict__ x, int64_t ldx, const T* __restrict__ skip,
                     int64_t lds, int64_t M, int D, float eps, float2* __restrict__ stats) {
  using V = Vec<T>;
  constexpr int CE = V::N;
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kStatsThreads / 32) + (threadIdx.x >> 5);
  if (row >= M) return;  // whole warps
  const int half = D / CE;  // chunks per half row
  const T* xr = x + row * ldx;
  const T* sr = skip + row * lds;
  const float inv_n = 1.f / static_cast<float>(2 * D);
  float s = 0.f;
  for (int c = lane; c < 2 * half; c += 32) {
    float f[CE];
    V::load(ldg16(c < half ? xr + c * CE : sr + (c - half) * CE), f);
#pragma unroll
    for (int e = 0; e < CE; ++e) s += f[e];
  }
  const float mean = warp_allsum(s) * inv_n;
  float q = 0.f, c1 = 0.f;
  for (int c = lane; c < 2 * half; c += 32) {
    float f[CE];
    V::load(ldg16(c < half ? xr + c * CE : sr + (c - half) * CE), f);
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
    stats[row] = make_float2(mean, rsqrtf(var + eps));
  }
}

// ---------------------------------------------------------------------------
// Forward GEMM with the normalizing prologue.

template <typename T>
struct FwdArgs {
  const T* x;
  const T* skip;
  const T* w;
  const T* bias;  // nullptr: no bias
  const float* gamma;  // [K] fp32
  const float* beta;   // [K] fp32
  const float2* stats;  // [M] (mean, rstd)
  T* y;                 // [M, N] contiguous
  int64_t ldx, lds, ldw;  // row strides in elements
  int64_t M;
  int N, D, K;
};

constexpr int kFwdStages = 3;

// CTAs per SM the register budget is sized for: on sm_90 two CTAs (2 x 108 KiB of the
// 228 KiB shared memory, <= 128 registers per thread); on sm_80 the 164 KiB of shared
// memory hold one CTA anyway, so the kernel may use up to 255 registers.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define SKIPDIT_SF_MIN_BLOCKS 2
#else
#define SKIPDIT_SF_MIN_BLOCKS 1
#endif

template <typename T, int kStages>
__global__ void __launch_bounds__(sf::kThreads, SKIPDIT_SF_MIN_BLOCKS)
    skip_fuse_fwd_kernel(const FwdArgs<T> a) {
  using V = Vec<T>;
  constexpr int CE = V::N;                             // elements per 16-byte chunk
  constexpr int BK = sf::kTileKBytes / sizeof(T);      // K elements per k-tile
  SKIPDIT_SF_DYN_SMEM(unsigned char, smem);
  const uint32_t sbase = smem_u32(smem);
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int n_tiles = (a.N + sf::kBN - 1) / sf::kBN;
  const int64_t m0 = sf::cta_m0(blockIdx.x, n_tiles);
  const int n0 = sf::cta_n0(blockIdx.x, n_tiles);
  const int chunk = sf::copy_chunk(tid);

  // Statistics of the A rows this thread copies and normalizes; rows past M get
  // (0, 0) so their (discarded) operand values stay finite.
  float mu[sf::kCopyIters], rs[sf::kCopyIters];
#pragma unroll
  for (int i = 0; i < sf::kCopyIters; ++i) {
    const int64_t r = m0 + sf::copy_row(tid, i);
    const float2 st = r < a.M ? a.stats[r] : make_float2(0.f, 0.f);
    mu[i] = st.x;
    rs[i] = st.y;
  }

  // Issue the copies of k-tile kt into ring slot `slot`. Chunks past M, N or K are
  // zero-filled (no global read).
  auto issue = [&](int kt, int slot) {
    const int kk = kt * BK + chunk * CE;
    const bool kok = kk < a.K;
    const bool in_skip = sf::k_in_skip(kk, a.D);
    const int col = sf::k_src_col(kk, a.D);
    const T* abase = in_skip ? a.skip : a.x;
    const int64_t ald = in_skip ? a.lds : a.ldx;
    const uint32_t sa = sbase + slot * sf::kStageBytes;
    const uint32_t sb = sa + sf::kTileBytes;
#pragma unroll
    for (int i = 0; i < sf::kCopyIters; ++i) {
      const int row = sf::copy_row(tid, i);
      const int64_t r = m0 + row;
      const bool ok = kok && r < a.M;
      const T* src = ok ? abase + r * ald + col : a.x;
      cp_async16(sa + sf::tile_offset(row, chunk), src, ok ? 16 : 0);
    }
#pragma unroll
    for (int i = 0; i < sf::kCopyIters; ++i) {
      const int row = sf::copy_row(tid, i);
      const int n = n0 + row;
      const bool ok = kok && n < a.N;
      const T* src = ok ? a.w + static_cast<int64_t>(n) * a.ldw + kk : a.w;
      cp_async16(sb + sf::tile_offset(row, chunk), src, ok ? 16 : 0);
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

  float acc[sf::kMTiles][sf::kNTiles][4];
#pragma unroll
  for (int mt = 0; mt < sf::kMTiles; ++mt)
#pragma unroll
    for (int nt = 0; nt < sf::kNTiles; ++nt)
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
      unsigned char* tile = smem + slot * sf::kStageBytes;
#pragma unroll
      for (int i = 0; i < sf::kCopyIters; ++i) {
        uint4* p = reinterpret_cast<uint4*>(tile + sf::tile_offset(sf::copy_row(tid, i), chunk));
        float f[CE];
        V::load(*p, f);
#pragma unroll
        for (int e = 0; e < CE; ++e) f[e] = fmaf((f[e] - mu[i]) * rs[i], g[e], b[e]);
        *p = V::store_operand(f);
      }
    }
    if (kt + 1 < KT) load_affine(kt + 1, g, b);
    // Every thread's normalized chunks and B copies of k-tile kt are visible, and every
    // warp is done with the MMAs of k-tile kt - 1, whose slot is refilled next.
    __syncthreads();
    if (kt + kStages - 1 < KT) issue(kt + kStages - 1, (kt + kStages - 1) % kStages);
    cp_async_commit();

    const uint32_t ta = sbase + slot * sf::kStageBytes;
    const uint32_t tb = ta + sf::kTileBytes;
#pragma unroll
    for (int ks = 0; ks < sf::kKSteps; ++ks) {
      uint32_t af[sf::kMTiles][4];
      uint32_t bf[sf::kNTiles][2];
#pragma unroll
      for (int mt = 0; mt < sf::kMTiles; ++mt) ldsm_x4(af[mt], ta + sf::a_ldsm_offset(warp, lane, mt, ks));
#pragma unroll
      for (int np = 0; np < sf::kNTiles / 2; ++np) {
        uint32_t r[4];
        ldsm_x4(r, tb + sf::b_ldsm_offset(warp, lane, np, ks));
        bf[2 * np][0] = V::b_operand(r[0]);
        bf[2 * np][1] = V::b_operand(r[1]);
        bf[2 * np + 1][0] = V::b_operand(r[2]);
        bf[2 * np + 1][1] = V::b_operand(r[3]);
      }
#pragma unroll
      for (int mt = 0; mt < sf::kMTiles; ++mt)
#pragma unroll
        for (int nt = 0; nt < sf::kNTiles; ++nt) V::mma(acc[mt][nt], af[mt], bf[nt][0], bf[nt][1]);
    }
  }
  cp_async_wait<0>();  // only empty groups can be pending here

  // Epilogue: bias, round, store. Columns come in even pairs and N is a multiple of 8.
#pragma unroll
  for (int nt = 0; nt < sf::kNTiles; ++nt) {
    const int col = n0 + sf::acc_col(warp, lane, nt, 0);
    if (col >= a.N) continue;
    float b0 = 0.f, b1 = 0.f;
    if (a.bias != nullptr) {
      b0 = V::to_float(a.bias[col]);
      b1 = V::to_float(a.bias[col + 1]);
    }
#pragma unroll
    for (int mt = 0; mt < sf::kMTiles; ++mt) {
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const int64_t row = m0 + sf::acc_row(warp, lane, mt, 2 * hr);
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

template <typename T>
__global__ void __launch_bounds__(kEltThreads)
    normalize_rows_kernel(const T* __restrict__ x, int64_t ldx, const T* __restrict__ skip,
                          int64_t lds, const float2* __restrict__ stats,
                          const float* __restrict__ gamma, const float* __restrict__ beta,
                          int64_t r0, int64_t rows, int D, T* __restrict__ h) {
  using V = Vec<T>;
  constexpr int CE = V::N;
  const int half = D / CE;
  const int nchunks = 2 * half;
  const int64_t total = rows * nchunks;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kEltThreads + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * kEltThreads) {
    const int64_t i = idx / nchunks;
    const int j = static_cast<int>(idx - i * nchunks);
    const int64_t r = r0 + i;
    const T* src = j < half ? x + r * ldx + j * CE : skip + r * lds + (j - half) * CE;
    float f[CE], g[CE], b[CE];
    V::load(ldg16(src), f);
    load_f32<CE>(gamma + j * CE, g);
    load_f32<CE>(beta + j * CE, b);
    const float2 st = stats[r];
#pragma unroll
    for (int e = 0; e < CE; ++e) f[e] = fmaf((f[e] - st.x) * st.y, g[e], b[e]);
    *reinterpret_cast<uint4*>(h + i * (2 * static_cast<int64_t>(D)) + j * CE) = V::store(f);
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

template <typename T>
__global__ void __launch_bounds__(kLnThreads)
    ln_bwd_kernel(const T* __restrict__ dh, const T* __restrict__ x, int64_t ldx,
                  const T* __restrict__ skip, int64_t lds, const float2* __restrict__ stats,
                  const float* __restrict__ gamma, int64_t M, int D, T* __restrict__ gx,
                  T* __restrict__ gs, float* __restrict__ partial) {
  using V = Vec<T>;
  constexpr int CE = V::N;
  SKIPDIT_SF_DYN_SMEM(float, colacc);  // [2][CE][nchunks]: grad_gamma, grad_beta partials
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
    const float2 st = stats[row];
    const float mu = st.x, rs = st.y;
    const T* dhr = dh + row * K;
    const T* xr = x + row * ldx;
    const T* sr = skip + row * lds;
    float s1 = 0.f, s2 = 0.f;
    for (int j = tid; j < nchunks; j += kLnThreads) {
      float d[CE], z[CE], g[CE];
      V::load(ldg16(dhr + j * CE), d);
      V::load(ldg16(j < half ? xr + j * CE : sr + (j - half) * CE), z);
      load_f32<CE>(gamma + j * CE, g);
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
      s1 += __shfl_xor_sync(0xffffffffu, s1, o);
      s2 += __shfl_xor_sync(0xffffffffu, s2, o);
    }
    if (lane == 0) {
      red[parity][warp][0] = s1;
      red[parity][warp][1] = s2;
    }
    // One barrier per row: the two reduction slots alternate, and a slot is written
    // again only after the next row's barrier, which every reader has passed.
    __syncthreads();
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
      V::load(ldg16(dhr + j * CE), d);
      V::load(ldg16(j < half ? xr + j * CE : sr + (j - half) * CE), z);
      load_f32<CE>(gamma + j * CE, g);
#pragma unroll
      for (int e = 0; e < CE; ++e) {
        const float xh = (z[e] - mu) * rs;
        o[e] = rs * (d[e] * g[e] - c1 - xh * c2);
        colacc[e * nchunks + j] += d[e] * xh;
        colacc[K + e * nchunks + j] += d[e];
      }
      T* dst = j < half ? gx + row * D + j * CE : gs + row * D + (j - half) * CE;
      *reinterpret_cast<uint4*>(dst) = V::store(o);
    }
  }
  float* out = partial + static_cast<int64_t>(blockIdx.x) * 2 * K;
  for (int j = tid; j < nchunks; j += kLnThreads) {
#pragma unroll
    for (int e = 0; e < CE; ++e) {
      out[j * CE + e] = colacc[e * nchunks + j];
      out[K + j * CE + e] = colacc[K + e * nchunks + j];
    }
  }
}

// Column sums of partial[P, 2K] in a fixed order -> grad_gamma [K], grad_beta [K].
template <typename OutT>
__global__ void __launch_bounds__(kEltThreads)
    reduce_partials_kernel(const float* __restrict__ partial, int P, int K, OutT* __restrict__ dg,
                           OutT* __restrict__ db) {
  const int j = blockIdx.x * kEltThreads + threadIdx.x;
  if (j >= 2 * K) return;
  float s = 0.f;
  for (int p = 0; p < P; ++p) s += partial[static_cast<int64_t>(p) * 2 * K + j];
  if (j < K) {
    dg[j] = static_cast<OutT>(s);
  } else {
    db[j - K] = static_cast<OutT>(s);
  }
}

}  // namespace
}  // namespace skipdit
