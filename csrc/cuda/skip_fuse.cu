// skip_fuse on CUDA: y = linear(layer_norm(cat([x, skip])), weight, bias), fused.
//
// Forward (bf16 / fp16, and fp32 with TF32 allowed):
//   1. row_stats_kernel: one warp per row reads x and skip (16-byte vector loads) and
//      writes (mean, rstd) in fp32. Each lane summarizes its 16-byte chunks exactly
//      (chunk mean, centered sum of squares) and merges them with Chan's formula, then
//      the warp merges the lanes the same way: stable for rows with a large offset.
//   2. skip_fuse_fwd_kernel: a GEMM y = h @ W^T (tile geometry in skip_fuse_tile.h) whose
//      A operand h is never in global memory. cp.async brings raw x / skip chunks (two
//      base pointers, row strides, no concatenation) and weight chunks into a 3-stage
//      shared-memory ring. Each thread then normalizes the A chunks it copied itself,
//      in place: fp32 (z - mean) * rstd * gamma + beta, rounded to the operand dtype
//      (bf16 / fp16, or tf32 with round-to-nearest). After one barrier per k-tile the
//      warps read fragments with ldmatrix and run mma.sync (m16n8k16 bf16/fp16, m16n8k8
//      tf32) with fp32 accumulators; the epilogue adds the bias and stores y.
//   The normalization is applied to the operand before the MMA, never folded into the
//   epilogue (DESIGN.md section 2: folding fails bf16 rows with large offsets).
// fp32 without TF32 (torch.backends.cuda.matmul.allow_tf32 off): exact path, rows are
//   normalized in bounded chunks into a buffer and cuBLAS (fp32) does the GEMM.
//
// Backward: dh = dy @ W (cuBLAS through ATen); ln_bwd_kernel recomputes nothing but reads
// dh, x, skip and the row statistics and writes grad_x and grad_skip directly, plus
// per-CTA partial sums of grad_norm_weight / grad_norm_bias (each column owned by one
// thread, no atomics) that reduce_partials_kernel adds in a fixed order. grad_weight =
// dy^T @ h with h normalized in bounded row chunks; grad_bias = dy summed over rows.
//
// Limits (declared in skipdit_fast/backends.py LIMITS): D and D_out multiples of 8,
// D <= 8192; float16, bfloat16, float32. Inputs whose rows are not 16-byte aligned are
// copied to a contiguous buffer first (a view at a 16-byte multiple offset, e.g. a slice
// of a fused projection, is used in place).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "common.h"
#include "ops.h"
#include "skip_fuse_tile.h"

namespace skipdit {
namespace {

// ---------------------------------------------------------------------------
// PTX wrappers

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
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
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
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
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
    asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
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

constexpr int kStatsThreads = 256;

// Chan et al.: merge (nb, mb, qb) into (n, mean, m2); (count, mean, centered sum of squares).
__device__ __forceinline__ void chan_merge(float& n, float& mean, float& m2, float nb, float mb,
                                           float qb) {
  const float nn = n + nb;
  if (nn > 0.f) {
    const float d = mb - mean;
    const float w = nb / nn;
    mean += d * w;
    m2 += qb + d * d * n * w;
    n = nn;
  }
}

template <typename T>
__global__ void __launch_bounds__(kStatsThreads)
    row_stats_kernel(const T* __restrict__ x, int64_t ldx, const T* __restrict__ skip,
                     int64_t lds, int64_t M, int D, float eps, float2* __restrict__ stats) {
  using V = Vec<T>;
  constexpr int CE = V::N;
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kStatsThreads / 32) + (threadIdx.x >> 5);
  if (row >= M) return;
  const int half = D / CE;  // chunks per half row
  const T* xr = x + row * ldx;
  const T* sr = skip + row * lds;
  float n = 0.f, mean = 0.f, m2 = 0.f;
  for (int c = lane; c < 2 * half; c += 32) {
    const T* src = c < half ? xr + c * CE : sr + (c - half) * CE;
    float f[CE];
    V::load(ldg16(src), f);
    float s = 0.f;
#pragma unroll
    for (int e = 0; e < CE; ++e) s += f[e];
    const float cm = s * (1.f / CE);
    float q = 0.f;
#pragma unroll
    for (int e = 0; e < CE; ++e) {
      const float d = f[e] - cm;
      q += d * d;
    }
    chan_merge(n, mean, m2, static_cast<float>(CE), cm, q);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float nb = __shfl_xor_sync(0xffffffffu, n, o);
    const float mb = __shfl_xor_sync(0xffffffffu, mean, o);
    const float qb = __shfl_xor_sync(0xffffffffu, m2, o);
    chan_merge(n, mean, m2, nb, mb, qb);
  }
  if (lane == 0) {
    const float var = fmaxf(m2 / n, 0.f);
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
  extern __shared__ __align__(128) unsigned char smem[];
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
  extern __shared__ float colacc[];  // [2][CE][nchunks]: grad_gamma, grad_beta partials
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

// ---------------------------------------------------------------------------
// Host side

template <typename T>
constexpr int chunk_elems() {
  return 16 / static_cast<int>(sizeof(T));
}

int sm_count(int device) {
  static int cached[64] = {0};
  if (device >= 0 && device < 64 && cached[device]) return cached[device];
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  if (device >= 0 && device < 64) cached[device] = n;
  return n;
}

// Opts a kernel into `bytes` of dynamic shared memory (once per device), after checking
// the device has that much per block.
template <typename Kernel>
void set_smem(Kernel kernel, int bytes, int device, bool (&done)[64]) {
  if (bytes <= 48 * 1024) return;
  if (device >= 0 && device < 64 && done[device]) return;
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(optin >= bytes, "skipdit::skip_fuse (cuda): needs ", bytes,
              " bytes of shared memory per block, the device allows ", optin);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  if (device >= 0 && device < 64) done[device] = true;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// t ([..., D], last dim contiguous) as M rows of D with one row stride, every row
// 16-byte aligned; a copy only when the view cannot be expressed that way.
struct RowView {
  at::Tensor t;
  int64_t ld;
};

RowView as_rows(const at::Tensor& t, int64_t M, int64_t D, int ce) {
  at::Tensor r = t.reshape({M, D});  // a view whenever the leading dims collapse
  const bool ok = r.stride(1) == 1 && aligned16(r.const_data_ptr()) &&
                  (M == 1 || r.stride(0) % ce == 0);
  if (!ok) r = r.clone(at::MemoryFormat::Contiguous);
  return {r, M == 1 ? D : r.stride(0)};
}

// fp32, contiguous, 16-byte aligned copy of a norm parameter (no copy when it already is).
at::Tensor f32_param(const at::Tensor& p) {
  at::Tensor r = p.to(at::kFloat).contiguous();
  if (!aligned16(r.const_data_ptr())) r = r.clone();
  return r;
}

// Rows per chunk of the bounded [rows, 2D] buffers (h for grad_weight / fp32 forward).
int64_t chunk_rows(int64_t M, int64_t K, int64_t elem_size) {
  constexpr int64_t kChunkBytes = 64ll << 20;
  return std::min<int64_t>(std::max<int64_t>(kChunkBytes / (K * elem_size), 128), M);
}

template <typename T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};

template <typename T>
const T* cptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}
template <typename T>
T* mptr(at::Tensor& t) {
  return reinterpret_cast<T*>(t.mutable_data_ptr());
}

void check_cuda_shapes(const char* op, const at::Tensor& x, const SkipFuseShape& s) {
  const auto dt = x.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat, op,
                   " (cuda): supports float16, bfloat16 and float32, got ", dt);
  TORCH_CHECK_VALUE(s.D % 8 == 0 && s.D <= 8192, op,
                    " (cuda): D must be a multiple of 8 and at most 8192, got ", s.D);
  TORCH_CHECK_VALUE(s.D_out % 8 == 0, op, " (cuda): D_out must be a multiple of 8, got ", s.D_out);
  TORCH_CHECK_VALUE(s.M < (int64_t{1} << 31), op, " (cuda): at most 2^31 - 1 rows, got ", s.M);
}

// Shared inputs of forward and backward, in the layout the kernels read.
struct Prepared {
  RowView x, skip;
  at::Tensor gamma, beta;  // fp32
  at::Tensor stats;        // [M, 2] fp32
};

template <typename T>
Prepared prepare(const at::Tensor& x, const at::Tensor& skip, const at::Tensor& nw,
                 const at::Tensor& nb, const SkipFuseShape& s, double eps, cudaStream_t stream) {
  constexpr int CE = chunk_elems<T>();
  Prepared p{as_rows(x, s.M, s.D, CE), as_rows(skip, s.M, s.D, CE), f32_param(nw), f32_param(nb),
             at::empty({s.M, 2}, x.options().dtype(at::kFloat))};
  const int64_t blocks = (s.M + kStatsThreads / 32 - 1) / (kStatsThreads / 32);
  row_stats_kernel<T><<<static_cast<unsigned>(blocks), kStatsThreads, 0, stream>>>(
      cptr<T>(p.x.t), p.x.ld, cptr<T>(p.skip.t), p.skip.ld, s.M, static_cast<int>(s.D),
      static_cast<float>(eps), reinterpret_cast<float2*>(p.stats.mutable_data_ptr<float>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return p;
}

template <typename T>
void launch_normalize_rows(const Prepared& p, int64_t r0, int64_t rows, int D, at::Tensor& h,
                           int device, cudaStream_t stream) {
  constexpr int CE = chunk_elems<T>();
  const int64_t total = rows * (2 * D / CE);
  const int64_t blocks = std::min<int64_t>((total + kEltThreads - 1) / kEltThreads,
                                           int64_t{16} * sm_count(device));
  normalize_rows_kernel<T><<<static_cast<unsigned>(std::max<int64_t>(blocks, 1)), kEltThreads, 0,
                             stream>>>(
      cptr<T>(p.x.t), p.x.ld, cptr<T>(p.skip.t), p.skip.ld,
      reinterpret_cast<const float2*>(p.stats.const_data_ptr<float>()),
      p.gamma.const_data_ptr<float>(), p.beta.const_data_ptr<float>(), r0, rows, D, mptr<T>(h));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_fwd_gemm(const Prepared& p, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                     const SkipFuseShape& s, at::Tensor& y, int device, cudaStream_t stream) {
  constexpr int CE = chunk_elems<T>();
  at::Tensor w2 = w;
  if (!aligned16(w2.const_data_ptr()) || (s.D_out > 1 && w2.stride(0) % CE != 0)) {
    w2 = w.clone(at::MemoryFormat::Contiguous);
  }
  at::Tensor b2;
  if (bias.has_value()) b2 = bias->contiguous();
  FwdArgs<T> a;
  a.x = cptr<T>(p.x.t);
  a.skip = cptr<T>(p.skip.t);
  a.w = cptr<T>(w2);
  a.bias = bias.has_value() ? cptr<T>(b2) : nullptr;
  a.gamma = p.gamma.const_data_ptr<float>();
  a.beta = p.beta.const_data_ptr<float>();
  a.stats = reinterpret_cast<const float2*>(p.stats.const_data_ptr<float>());
  a.y = mptr<T>(y);
  a.ldx = p.x.ld;
  a.lds = p.skip.ld;
  a.ldw = s.D_out > 1 ? w2.stride(0) : 2 * s.D;
  a.M = s.M;
  a.N = static_cast<int>(s.D_out);
  a.D = static_cast<int>(s.D);
  a.K = static_cast<int>(2 * s.D);
  constexpr int smem = kFwdStages * sf::kStageBytes;
  auto kernel = skip_fuse_fwd_kernel<T, kFwdStages>;
  static bool done[64] = {};
  set_smem(kernel, smem, device, done);
  const int64_t n_tiles = (s.D_out + sf::kBN - 1) / sf::kBN;
  const int64_t m_tiles = (s.M + sf::kBM - 1) / sf::kBM;
  const int64_t grid = n_tiles * m_tiles;
  TORCH_CHECK(grid < (int64_t{1} << 31), "skipdit::skip_fuse (cuda): too many tiles (", grid, ")");
  kernel<<<static_cast<unsigned>(grid), sf::kThreads, smem, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void skip_fuse_fwd_typed(const at::Tensor& x, const at::Tensor& skip, const at::Tensor& nw,
                         const at::Tensor& nb, const at::Tensor& w,
                         const std::optional<at::Tensor>& bias, double eps,
                         const SkipFuseShape& s, at::Tensor& y) {
  const int device = x.get_device();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  Prepared p = prepare<T>(x, skip, nw, nb, s, eps, stream);
  if (!std::is_same_v<T, float> || at::globalContext().allowTF32CuBLAS()) {
    launch_fwd_gemm<T>(p, w, bias, s, y, device, stream);
    return;
  }
  // fp32 without TF32: exact fp32 GEMM (cuBLAS) over normalized row chunks.
  const int64_t K = 2 * s.D;
  const int64_t chunk = chunk_rows(s.M, K, sizeof(float));
  at::Tensor h = at::empty({std::min(chunk, s.M), K}, x.options());
  at::Tensor wt = w.t();
  for (int64_t r0 = 0; r0 < s.M; r0 += chunk) {
    const int64_t rows = std::min(chunk, s.M - r0);
    launch_normalize_rows<T>(p, r0, rows, static_cast<int>(s.D), h, device, stream);
    at::Tensor hv = h.narrow(0, 0, rows);
    at::Tensor yv = y.narrow(0, r0, rows);
    if (bias.has_value()) {
      at::addmm_out(yv, *bias, hv, wt);
    } else {
      at::mm_out(yv, hv, wt);
    }
  }
}

at::Tensor skip_fuse_cuda(const at::Tensor& x, const at::Tensor& skip,
                          const at::Tensor& norm_weight, const at::Tensor& norm_bias,
                          const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          double eps) {
  const char* op = "skipdit::skip_fuse";
  const auto s = check_skip_fuse(op, x, skip, norm_weight, norm_bias, weight, bias, eps);
  check_cuda_shapes(op, x, s);
  c10::cuda::CUDAGuard guard(x.device());
  auto y = new_output({s.M, s.D_out}, x.options());
  switch (x.scalar_type()) {
    case at::kBFloat16:
      skip_fuse_fwd_typed<__nv_bfloat16>(x, skip, norm_weight, norm_bias, weight, bias, eps, s, y);
      break;
    case at::kHalf:
      skip_fuse_fwd_typed<__half>(x, skip, norm_weight, norm_bias, weight, bias, eps, s, y);
      break;
    default:
      skip_fuse_fwd_typed<float>(x, skip, norm_weight, norm_bias, weight, bias, eps, s, y);
      break;
  }
  return y.view(skip_fuse_out_shape(x, s.D_out));
}

// ---------------------------------------------------------------------------
// Backward

template <typename T>
void skip_fuse_bwd_typed(const at::Tensor& g, const at::Tensor& x, const at::Tensor& skip,
                         const at::Tensor& nw, const at::Tensor& nb, const at::Tensor& w,
                         double eps, const SkipFuseShape& s, at::Tensor& dx, at::Tensor& dskip,
                         at::Tensor& dnw, at::Tensor& dnb, at::Tensor& dw, at::Tensor& db) {
  const int device = x.get_device();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const int64_t K = 2 * s.D;
  Prepared p = prepare<T>(x, skip, nw, nb, s, eps, stream);
  at::Tensor dy = g.reshape({s.M, s.D_out});

  if (db.numel() > 0) db.copy_(dy.sum({0}, /*keepdim=*/false, at::kFloat));

  // Gradient of h (the rounded, normalized operand); same dtype as the activations.
  at::Tensor dh = at::mm(dy, w).contiguous();
  TORCH_INTERNAL_ASSERT(aligned16(dh.const_data_ptr()));

  // LayerNorm backward into grad_x / grad_skip, partial affine gradients per CTA.
  const int grid = static_cast<int>(std::min<int64_t>(s.M, int64_t{4} * sm_count(device)));
  const int smem = static_cast<int>(2 * K * sizeof(float));
  static bool done[64] = {};
  auto kernel = ln_bwd_kernel<T>;
  set_smem(kernel, smem, device, done);
  at::Tensor partial = at::empty({grid, 2 * K}, x.options().dtype(at::kFloat));
  kernel<<<grid, kLnThreads, smem, stream>>>(
      cptr<T>(dh), cptr<T>(p.x.t), p.x.ld, cptr<T>(p.skip.t), p.skip.ld,
      reinterpret_cast<const float2*>(p.stats.const_data_ptr<float>()),
      p.gamma.const_data_ptr<float>(), s.M, static_cast<int>(s.D), mptr<T>(dx), mptr<T>(dskip),
      partial.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const unsigned rblocks = static_cast<unsigned>((2 * K + kEltThreads - 1) / kEltThreads);
  if (dnw.scalar_type() == at::kFloat) {
    reduce_partials_kernel<float><<<rblocks, kEltThreads, 0, stream>>>(
        partial.const_data_ptr<float>(), grid, static_cast<int>(K), mptr<float>(dnw),
        mptr<float>(dnb));
  } else {
    reduce_partials_kernel<T><<<rblocks, kEltThreads, 0, stream>>>(
        partial.const_data_ptr<float>(), grid, static_cast<int>(K), mptr<T>(dnw), mptr<T>(dnb));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // grad_weight = dy^T @ h over bounded row chunks of h.
  const int64_t chunk = chunk_rows(s.M, K, sizeof(T));
  at::Tensor h = at::empty({std::min(chunk, s.M), K}, x.options());
  if (chunk >= s.M) {
    launch_normalize_rows<T>(p, 0, s.M, static_cast<int>(s.D), h, device, stream);
    at::mm_out(dw, dy.t(), h);
    return;
  }
  at::Tensor dw_acc = at::zeros({s.D_out, K}, x.options().dtype(at::kFloat));
  for (int64_t r0 = 0; r0 < s.M; r0 += chunk) {
    const int64_t rows = std::min(chunk, s.M - r0);
    launch_normalize_rows<T>(p, r0, rows, static_cast<int>(s.D), h, device, stream);
    at::Tensor dyc = dy.narrow(0, r0, rows).t();
    at::Tensor hv = h.narrow(0, 0, rows);
    if constexpr (std::is_same_v<T, float>) {
      dw_acc.addmm_(dyc, hv);
    } else {
      dw_acc.add_(at::mm(dyc, hv));
    }
  }
  dw.copy_(dw_acc);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
skip_fuse_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& skip,
                        const at::Tensor& norm_weight, const at::Tensor& norm_bias,
                        const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        double eps) {
  const char* op = "skipdit::skip_fuse_backward";
  const auto s = check_skip_fuse(op, x, skip, norm_weight, norm_bias, weight, bias, eps);
  check_cuda_shapes(op, x, s);
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(skip_fuse_out_shape(x, s.D_out)), op,
                    ": grad_out must have shape ", at::IntArrayRef(skip_fuse_out_shape(x, s.D_out)),
                    ", got ", grad_out.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type(), op, ": grad_out dtype ",
                   grad_out.scalar_type(), " differs from x dtype ", x.scalar_type());
  check_same_device(op, x, "grad_out", grad_out);
  c10::cuda::CUDAGuard guard(x.device());
  auto dx = new_output(x.sizes(), x.options());
  auto dskip = new_output(x.sizes(), x.options());
  auto dnw = new_output(norm_weight.sizes(), norm_weight.options());
  auto dnb = new_output(norm_bias.sizes(), norm_bias.options());
  auto dw = new_output(weight.sizes(), weight.options());
  auto db = bias.has_value() ? new_output(bias->sizes(), bias->options())
                             : at::empty({0}, weight.options());
  switch (x.scalar_type()) {
    case at::kBFloat16:
      skip_fuse_bwd_typed<__nv_bfloat16>(grad_out, x, skip, norm_weight, norm_bias, weight, eps, s,
                                         dx, dskip, dnw, dnb, dw, db);
      break;
    case at::kHalf:
      skip_fuse_bwd_typed<__half>(grad_out, x, skip, norm_weight, norm_bias, weight, eps, s, dx,
                                  dskip, dnw, dnb, dw, db);
      break;
    default:
      skip_fuse_bwd_typed<float>(grad_out, x, skip, norm_weight, norm_bias, weight, eps, s, dx,
                                 dskip, dnw, dnb, dw, db);
      break;
  }
  return {dx, dskip, dnw, dnb, dw, db};
}

}  // namespace
}  // namespace skipdit

TORCH_LIBRARY_IMPL(skipdit, CUDA, m) {
  m.impl("skip_fuse", &skipdit::skip_fuse_cuda);
  m.impl("skip_fuse_backward", &skipdit::skip_fuse_backward_cuda);
}
