// The PTX semantics of the CPU emulator, written from the PTX ISA independently of the
// kernels: the definitions of the functions csrc/cuda/ptx.cuh declares under
// SKIPDIT_EMULATE, on the CTA model of cta.h, plus the CUDA language the kernels use as
// host C++ (keywords, threadIdx & co.).
//
//   - ldmatrix and mma.m16n8k16 / m16n8k8 rebuild the matrices from the per-lane
//     fragments with the PTX ISA's layouts (groupID = lane >> 2, threadID_in_group =
//     lane % 4) and compute from exact products summed in double, rounded once into the
//     fp32 accumulator; tf32 operands are the top 19 bits of their registers. The pure
//     warp-level functions (ldmatrix_warp, mma_warp) are what the collectives compute,
//     and what the tile-math harness (skip_fuse_tiles.cpp) calls directly;
//   - cp.async copies are queued per thread and performed at cp.async.wait_group (mode
//     bit 0 set, "deferred": the destination is poisoned with 0xff bytes, NaN in every
//     format, when the copy is issued, so reading it before the wait, or refilling a
//     slot another warp still reads, shows up) or at issue;
//   - every shared-memory access is checked for bounds and alignment, every global read
//     against the launch's readable ranges, every global write against its writable
//     ones; ldmatrix / mma / shfl must be executed by all 32 lanes together.
//
// Include this before the kernel headers. Build flags: g++ -std=c++20 -ffp-contract=off.
#pragma once

#define SKIPDIT_EMULATE 1

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cta.h"
#include "cuda/ptx.cuh"

// ---- The CUDA language as host C++ ------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static  // one CTA runs at a time: a static is the CTA's copy
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define threadIdx (::skipdit::emu::thread_idx())
#define blockIdx (::skipdit::emu::M.block_idx)
#define blockDim (::skipdit::emu::M.block)
#define gridDim (::skipdit::emu::M.grid)

namespace skipdit::emu {

inline Dim3 thread_idx() { return {static_cast<unsigned>(M.cur), 0, 0}; }

// ---------------------------------------------------------------------------------
// 16-bit formats (IEEE rounding rules; checked bit for bit against torch)

inline float f16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: man * 2^-24
    const float f = std::ldexp(static_cast<float>(man), -24);
    return sign ? -f : f;
  }
  if (exp == 31) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf, nan
  return bits_to_float(sign | ((exp + 112) << 23) | (man << 13));
}
inline uint16_t float_to_f16(float f) {  // round to nearest even
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a >= 0x7f800000u) return sign | (a > 0x7f800000u ? 0x7e00 : 0x7c00);
  if (a >= 0x477ff000u) return sign | 0x7c00;  // >= 65520 rounds to inf
  if (a < 0x38800000u) {                        // below 2^-14: a multiple of 2^-24
    return sign | static_cast<uint16_t>(std::nearbyint(bits_to_float(a) * 16777216.0f));
  }
  uint32_t r = a - 0x38000000u;  // rebias the exponent (127 -> 15)
  r += 0xfffu + ((r >> 13) & 1u);
  return sign | static_cast<uint16_t>(r >> 13);
}
inline float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }
inline uint16_t float_to_bf16(float f) {  // round to nearest even
  if (std::isnan(f)) return 0x7fc0;
  uint32_t u = float_to_bits(f);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline uint16_t lo16(uint32_t r) { return static_cast<uint16_t>(r & 0xffffu); }
inline uint16_t hi16(uint32_t r) { return static_cast<uint16_t>(r >> 16); }

// An element of register `reg` as a float: half `hi` of a 16-bit pair, or (F32) the
// tf32 value of the register.
template <class E>
float element(uint32_t reg, int hi) {
  if constexpr (std::is_same_v<E, F16>) {
    return f16_to_float(hi ? hi16(reg) : lo16(reg));
  } else if constexpr (std::is_same_v<E, BF16>) {
    return bf16_to_float(hi ? hi16(reg) : lo16(reg));
  } else {
    return bits_to_float(reg & 0xffffe000u);  // tf32: the top 19 bits
  }
}

// ---------------------------------------------------------------------------------
// Warp-level semantics, on all 32 lanes' registers at once

// ldmatrix .m8n8 .x{N} [.trans] .b16 from the 8*N row addresses of lanes 0 .. 8N-1.
template <int N, bool kTrans>
void ldmatrix_warp(const uint16_t* const (&row)[32], uint32_t (&out)[32][4]) {
  for (int l = 0; l < 32; ++l) {
    for (int i = 0; i < N; ++i) {
      uint16_t e0, e1;
      if (!kTrans) {
        e0 = row[8 * i + l / 4][2 * (l % 4)];
        e1 = row[8 * i + l / 4][2 * (l % 4) + 1];
      } else {
        e0 = row[8 * i + 2 * (l % 4)][l / 4];
        e1 = row[8 * i + 2 * (l % 4) + 1][l / 4];
      }
      out[l][i] = static_cast<uint32_t>(e0) | (static_cast<uint32_t>(e1) << 16);
    }
  }
}

// mma.m16n8k{K}.row.col.f32.{E}.{E}.f32: c[lane][i] += (A B)[row, col] of lane's
// accumulator element i, the products of the K terms summed exactly (in double) and
// added to c once (Acc = float: one rounding, as an fp32 accumulator; Acc = double: no
// rounding). Fragment layouts, g = lane >> 2, t = lane % 4:
//   16-bit, K = 16: A a0,a1: (g, 2t+i)  a2,a3: (g+8, 2t+i)  a4,a5: (g, 2t+8+i)
//                   a6,a7: (g+8, 2t+8+i) (a_j in register j / 2, half j % 2);
//                   B b0,b1: (2t+i, g)  b2,b3: (2t+8+i, g)
//   16-bit, K = 8:  A a0,a1: (g, 2t+i)  a2,a3: (g+8, 2t+i);  B b0,b1: (2t+i, g)
//   tf32, K = 8:    A a0: (g, t)  a1: (g+8, t)  a2: (g, t+4)  a3: (g+8, t+4);
//                   B b0: (t, g)  b1: (t+4, g)
//   C/D:            c0,c1: (g, 2t+i)  c2,c3: (g+8, 2t+i)
template <class E, int K, class Acc>
void mma_warp(const uint32_t (&a)[32][4], const uint32_t (&b)[32][2], Acc (&c)[32][4]) {
  double A[16][16] = {}, B[16][8] = {};
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, t = l & 3;
    if constexpr (std::is_same_v<E, F32>) {
      static_assert(K == 8, "tf32 mma is m16n8k8");
      A[g][t] = element<E>(a[l][0], 0);
      A[g + 8][t] = element<E>(a[l][1], 0);
      A[g][t + 4] = element<E>(a[l][2], 0);
      A[g + 8][t + 4] = element<E>(a[l][3], 0);
      B[t][g] = element<E>(b[l][0], 0);
      B[t + 4][g] = element<E>(b[l][1], 0);
    } else {
      for (int i = 0; i < 2; ++i) {
        A[g][2 * t + i] = element<E>(a[l][0], i);
        A[g + 8][2 * t + i] = element<E>(a[l][1], i);
        B[2 * t + i][g] = element<E>(b[l][0], i);
        if (K == 16) {
          A[g][2 * t + 8 + i] = element<E>(a[l][2], i);
          A[g + 8][2 * t + 8 + i] = element<E>(a[l][3], i);
          B[2 * t + 8 + i][g] = element<E>(b[l][1], i);
        }
      }
    }
  }
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, t = l & 3;
    for (int q = 0; q < 4; ++q) {
      const int row = g + 8 * (q >> 1), col = 2 * t + (q & 1);
      double s = 0;
      for (int k = 0; k < K; ++k) s += A[row][k] * B[k][col];
      c[l][q] = static_cast<Acc>(c[l][q] + s);
    }
  }
}

// ---------------------------------------------------------------------------------
// The collectives

enum Kind { kLdsmX4 = 1, kLdsmX2, kLdsmX4T, kLdsmX2T, kMmaF16K16, kMmaBF16K16, kMmaF16K8,
            kMmaBF16K8, kMmaTF32K8, kShfl, kSyncWarp };

// A .shared address of n bytes, aligned to n (16 for ldmatrix rows and cp.async).
inline bool smem_addr_ok(uint32_t addr, size_t n) {
  return addr % n == 0 && static_cast<size_t>(addr) + n <= M.smem_bytes;
}

template <int N, bool kTrans>
void ldsm(uint32_t* r, uint32_t addr, int kind) {
  Slot in{};
  in.w[0] = addr;
  Slot out = collective(kind, in, [](const Slot* ins, Slot* outs) {
    const uint16_t* row[32] = {};
    for (int l = 0; l < 8 * N; ++l) {
      row[l] = reinterpret_cast<const uint16_t*>(M.smem + ins[l].w[0]);
      if (!smem_addr_ok(ins[l].w[0], 16)) {
        fail("ldmatrix row address out of shared memory or not 16-byte aligned (lane " +
             std::to_string(l) + ", offset " + std::to_string(ins[l].w[0]) + ")" + where());
        for (int k = 0; k < 32; ++k) std::memset(&outs[k], 0, sizeof(Slot));
        return;
      }
    }
    uint32_t regs[32][4];
    ldmatrix_warp<N, kTrans>(row, regs);
    for (int l = 0; l < 32; ++l) {
      for (int i = 0; i < N; ++i) outs[l].w[i] = regs[l][i];
    }
  });
  for (int i = 0; i < N; ++i) r[i] = out.w[i];
}

// One lane's part of an mma: na A registers, nb B registers.
template <class E, int K>
void mma(float (&d)[4], const uint32_t* a, int na, const uint32_t* b, int nb, int kind) {
  Slot in{};
  for (int i = 0; i < na; ++i) in.w[i] = a[i];
  for (int i = 0; i < nb; ++i) in.w[4 + i] = b[i];
  for (int i = 0; i < 4; ++i) in.w[8 + i] = float_to_bits(d[i]);
  Slot out = collective(kind, in, [](const Slot* ins, Slot* outs) {
    uint32_t A[32][4], B[32][2];
    float C[32][4];
    for (int l = 0; l < 32; ++l) {
      for (int i = 0; i < 4; ++i) A[l][i] = ins[l].w[i];
      for (int i = 0; i < 2; ++i) B[l][i] = ins[l].w[4 + i];
      for (int i = 0; i < 4; ++i) C[l][i] = bits_to_float(ins[l].w[8 + i]);
    }
    mma_warp<E, K, float>(A, B, C);
    for (int l = 0; l < 32; ++l) {
      for (int i = 0; i < 4; ++i) outs[l].w[i] = float_to_bits(C[l][i]);
    }
  });
  for (int i = 0; i < 4; ++i) d[i] = bits_to_float(out.w[i]);
}

inline void perform(const Copy& c) {
  if (c.valid) {
    std::memcpy(c.dst, c.src, 16);
  } else {
    std::memset(c.dst, 0, 16);
  }
}

inline void check_shared(const void* p, size_t n, const char* what) {
  if (!in_smem(p, n, n)) fail(std::string(what) + " out of shared memory or misaligned" + where());
}
inline bool check_global_read(const void* p, size_t n, const char* what) {
  if (in_ranges(M.readable, p, n, n)) return true;
  fail(std::string(what) + " reads outside the input tensors or misaligned" + where());
  return false;
}
inline bool check_global_write(const void* p, size_t n, const char* what) {
  if (in_ranges(M.writable, p, n, n)) return true;
  fail(std::string(what) + " writes outside the outputs or misaligned" + where());
  return false;
}

}  // namespace skipdit::emu

// ---------------------------------------------------------------------------------
// The definitions of csrc/cuda/ptx.cuh

namespace skipdit {

inline uint32_t smem_u32(const void* p) {
  using namespace emu;
  const char* c = static_cast<const char*>(p);
  if (c < M.smem || c > M.smem + M.smem_bytes) {
    fail("smem_u32 of a pointer outside shared memory" + where());
    return 0xffffff00u;  // fails every later bounds check
  }
  return static_cast<uint32_t>(c - M.smem);
}

inline void cp_async16(uint32_t smem_dst, const void* gmem_src, bool valid) {
  using namespace emu;
  if (!smem_addr_ok(smem_dst, 16)) {
    fail("cp.async destination out of shared memory or misaligned (offset " +
         std::to_string(smem_dst) + ")" + where());
    return;
  }
  if (valid && !in_ranges(M.readable, gmem_src, 16, 16)) {
    fail("cp.async reads outside the input tensors or misaligned" + where());
    valid = false;
  }
  const Copy c{M.smem + smem_dst, static_cast<const char*>(gmem_src), valid};
  if ((M.mode & 1) == 0) {
    perform(c);
  } else {
    std::memset(c.dst, 0xff, 16);  // lands at the wait
    me().open.push_back(c);
  }
}

inline void cp_async_commit() {
  auto& t = emu::me();
  t.groups.push_back(std::move(t.open));
  t.open.clear();
}

template <int N>
inline void cp_async_wait() {
  auto& t = emu::me();
  while (static_cast<int>(t.groups.size()) > N) {
    for (const auto& c : t.groups.front()) emu::perform(c);
    t.groups.pop_front();
  }
}

inline void ldsm_x4(uint32_t (&r)[4], uint32_t a) { emu::ldsm<4, false>(r, a, emu::kLdsmX4); }
inline void ldsm_x2(uint32_t (&r)[2], uint32_t a) { emu::ldsm<2, false>(r, a, emu::kLdsmX2); }
inline void ldsm_x4_trans(uint32_t (&r)[4], uint32_t a) { emu::ldsm<4, true>(r, a, emu::kLdsmX4T); }
inline void ldsm_x2_trans(uint32_t (&r)[2], uint32_t a) { emu::ldsm<2, true>(r, a, emu::kLdsmX2T); }

template <class E>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const uint32_t b[2] = {b0, b1};
  emu::mma<E, 16>(d, a, 4, b, 2, std::is_same_v<E, F16> ? emu::kMmaF16K16 : emu::kMmaBF16K16);
}
template <class E>
inline void mma_m16n8k8(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t b0) {
  const uint32_t a[2] = {a0, a1};
  emu::mma<E, 8>(d, a, 2, &b0, 1, std::is_same_v<E, F16> ? emu::kMmaF16K8 : emu::kMmaBF16K8);
}
inline void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const uint32_t b[2] = {b0, b1};
  emu::mma<F32, 8>(d, a, 4, b, 2, emu::kMmaTF32K8);
}

inline uint32_t to_tf32(float f) {  // round to nearest, ties away from zero (finite f)
  return (float_to_bits(f) + 0x1000u) & 0xffffe000u;
}

template <class E>
inline uint16_t from_float(float f) {
  if constexpr (std::is_same_v<E, F16>) {
    return emu::float_to_f16(f);
  } else {
    return emu::float_to_bf16(f);
  }
}
template <class E>
inline uint32_t pack2(float lo, float hi) {
  return from_float<E>(lo) | (static_cast<uint32_t>(from_float<E>(hi)) << 16);
}
template <class E>
inline float to_float(uint16_t h) {
  if constexpr (std::is_same_v<E, F16>) {
    return emu::f16_to_float(h);
  } else {
    return emu::bf16_to_float(h);
  }
}

inline float shfl_xor(float v, int mask) {
  using namespace emu;
  Slot in{};
  in.w[0] = float_to_bits(v);
  in.w[1] = static_cast<uint32_t>(mask);
  Slot out = collective(kShfl, in, [](const Slot* ins, Slot* outs) {
    for (int l = 0; l < 32; ++l) {
      if (ins[l].w[1] != ins[0].w[1]) fail("shfl_xor with different masks across lanes" + where());
      outs[l].w[0] = ins[l ^ (ins[0].w[1] & 31)].w[0];
    }
  });
  return bits_to_float(out.w[0]);
}

inline void warp_sync() {
  emu::collective(emu::kSyncWarp, emu::Slot{}, [](const emu::Slot*, emu::Slot*) {});
}
inline void block_sync() { emu::cta_barrier(); }

inline float fast_exp2(float x) { return std::exp2(x); }
inline float fast_log2(float x) { return std::log2(x); }
inline float rsqrt_approx(float x) { return 1.f / std::sqrt(x); }
inline void opaque(int64_t&) {}

inline U128 ld_shared_v4(const void* p) {
  U128 v{};
  emu::check_shared(p, 16, "shared 16-byte load");
  if (!emu::failed()) std::memcpy(&v, p, 16);
  return v;
}
inline void st_shared_v4(void* p, const U128& v) {
  emu::check_shared(p, 16, "shared 16-byte store");
  if (!emu::failed()) std::memcpy(p, &v, 16);
}
inline void st_shared_u32(void* p, uint32_t v) {
  emu::check_shared(p, 4, "shared 4-byte store");
  if (!emu::failed()) std::memcpy(p, &v, 4);
}
inline U128 ldg_v4(const void* p) {
  U128 v{};
  if (emu::check_global_read(p, 16, "global 16-byte load")) std::memcpy(&v, p, 16);
  return v;
}
inline void st_global_v4(void* p, const U128& v) {
  if (emu::check_global_write(p, 16, "global 16-byte store")) std::memcpy(p, &v, 16);
}
inline void st_global_v2(void* p, uint32_t lo, uint32_t hi) {
  const uint32_t v[2] = {lo, hi};
  if (emu::check_global_write(p, 8, "global 8-byte store")) std::memcpy(p, v, 8);
}
inline void st_global_u32(void* p, uint32_t v) {
  if (emu::check_global_write(p, 4, "global 4-byte store")) std::memcpy(p, &v, 4);
}
inline void st_global_u16(void* p, uint16_t v) {
  if (emu::check_global_write(p, 2, "global 2-byte store")) std::memcpy(p, &v, 2);
}
inline void st_global_f32(float* p, float v) {
  if (emu::check_global_write(p, 4, "global fp32 store")) *p = v;
}

}  // namespace skipdit
