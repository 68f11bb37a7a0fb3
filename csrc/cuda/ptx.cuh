// The hardware the CUDA kernels are written against: one wrapper per PTX instruction
// (sm_80 and later), the element formats, and the memory accesses the CPU emulator
// checks. The skip_fuse and attention kernels use nothing else of the GPU for
// tensor-core, shared-memory, asynchronous-copy and warp-collective work.
//
// One signature per instruction, declared once here. In the GPU build (nvcc) each
// declaration carries its inline-PTX body. With SKIPDIT_EMULATE defined (the CPU
// harnesses under tests/emu, compiled by g++) the same declarations have no body:
// tests/emu/ptx_emu.h defines them from the PTX ISA on a model of a CTA, so the kernel
// code the emulator runs is the code nvcc compiles.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "macros.h"

#if !defined(SKIPDIT_EMULATE)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define SKIPDIT_PTX(...) { __VA_ARGS__ }
// The kernel's dynamic shared memory, as an array of `type`.
#define SKIPDIT_DYNAMIC_SMEM(type, name) extern __shared__ __align__(128) type name[]
#else
#define SKIPDIT_PTX(...) ;
#define SKIPDIT_DYNAMIC_SMEM(type, name) \
  type* name = reinterpret_cast<type*>(::skipdit::emu::dynamic_smem())
#endif

namespace skipdit {

#if defined(SKIPDIT_EMULATE)
namespace emu {
unsigned char* dynamic_smem();  // tests/emu/cta.h
}
#endif

// ---------------------------------------------------------------------------------
// Element formats: tags for the kernels' templates.
struct F16 {};   // float16 in memory and in the MMA
struct BF16 {};  // bfloat16 in memory and in the MMA
struct F32 {};   // float32 in memory, tf32 in the MMA (m16n8k8)

template <class E>
struct Elem {
  using storage = uint16_t;  // the raw bits of a 16-bit element
};
template <>
struct Elem<F32> {
  using storage = float;
};

// 16 bytes: the unit of cp.async, of the 16-byte loads and stores, and of ldmatrix rows.
struct alignas(16) U128 {
  uint32_t w[4];
};

SKIPDIT_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}
SKIPDIT_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

// The 32-bit address of p (a pointer into shared memory) in the .shared window. The
// instructions that address shared memory (cp.async, ldmatrix) take these: kernels keep
// their shared-memory offsets in 32-bit registers, not in 64-bit generic pointers
// (measured: the generic form costs the skip_fuse forward GEMM spills at its 128-register
// budget on sm_90a).
SKIPDIT_DEV uint32_t smem_u32(const void* p) SKIPDIT_PTX(
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));)

// ---------------------------------------------------------------------------------
// Asynchronous copies (cp.async, L2 only)

// 16 bytes global -> shared (smem_dst: a .shared address, 16-byte aligned); when !valid
// nothing is read and the 16 destination bytes are zero-filled (src-size 0).
SKIPDIT_DEV void cp_async16(uint32_t smem_dst, const void* gmem_src, bool valid) SKIPDIT_PTX(
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_dst),
                 "l"(gmem_src), "r"(valid ? 16 : 0)
                 : "memory");)

// Closes this thread's group of copies issued since the last commit.
SKIPDIT_DEV void cp_async_commit() SKIPDIT_PTX(
    asm volatile("cp.async.commit_group;\n" ::: "memory");)

// Waits until at most N of this thread's committed groups are pending.
template <int N>
SKIPDIT_DEV void cp_async_wait() SKIPDIT_PTX(
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");)

// ---------------------------------------------------------------------------------
// ldmatrix (.m8n8 .b16): lane 8*i + r gives the .shared address of row r of 8x8 matrix i
// (16 bytes, 16-byte aligned); register i of lane l receives row l/4, elements
// 2*(l%4) and 2*(l%4)+1 of matrix i, low half first (.trans: column l/4, rows 2*(l%4)
// and 2*(l%4)+1). x2 reads matrices 0 and 1 (addresses from lanes 0-15).

SKIPDIT_DEV void ldsm_x4(uint32_t (&r)[4], uint32_t addr) SKIPDIT_PTX(
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));)
SKIPDIT_DEV void ldsm_x2(uint32_t (&r)[2], uint32_t addr) SKIPDIT_PTX(
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(addr));)
SKIPDIT_DEV void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) SKIPDIT_PTX(
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));)
SKIPDIT_DEV void ldsm_x2_trans(uint32_t (&r)[2], uint32_t addr) SKIPDIT_PTX(
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(addr));)

// ---------------------------------------------------------------------------------
// mma.sync, fp32 accumulators, d += A * B for one m16n8 tile (A row-major, B col-major;
// fragment layouts: PTX ISA, "Matrix Fragments for mma.m16n8k16 / m16n8k8").

// m16n8k16, E = F16 or BF16.
template <class E>
SKIPDIT_DEV void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1)
    SKIPDIT_PTX(
        if constexpr (std::is_same_v<E, F16>) {
          asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
              "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
              : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
              : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
        } else {
          static_assert(std::is_same_v<E, BF16>, "mma_m16n8k16: F16 or BF16");
          asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
              "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
              : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
              : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
        })

// m16n8k8, E = F16 or BF16: the k8 step that lets head dims 72 and 88 avoid padding
// the k dimension of Q K^T to a multiple of 16.
template <class E>
SKIPDIT_DEV void mma_m16n8k8(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t b0) SKIPDIT_PTX(
    if constexpr (std::is_same_v<E, F16>) {
      asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, "
          "{%0, %1, %2, %3};\n"
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
          : "r"(a0), "r"(a1), "r"(b0));
    } else {
      static_assert(std::is_same_v<E, BF16>, "mma_m16n8k8: F16 or BF16");
      asm("mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, "
          "{%0, %1, %2, %3};\n"
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
          : "r"(a0), "r"(a1), "r"(b0));
    })

// m16n8k8 with tf32 operands (the top 19 bits of each fp32 register).
SKIPDIT_DEV void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1)
    SKIPDIT_PTX(
        asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, "
            "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));)

// ---------------------------------------------------------------------------------
// Conversions

// cvt.rna.tf32.f32: round to nearest (ties away from zero) to tf32, as fp32 bits.
SKIPDIT_DEV uint32_t to_tf32(float f) SKIPDIT_PTX(
    uint32_t r;
    asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(f));
    return r;)

// Two fp32 values rounded to nearest even into one register of E (F16 / BF16): lo in
// bits 0..15 (cvt.rn.f16x2.f32 / cvt.rn.bf16x2.f32).
template <class E>
SKIPDIT_DEV uint32_t pack2(float lo, float hi) SKIPDIT_PTX(
    if constexpr (std::is_same_v<E, F16>) {
      __half2 h = __floats2half2_rn(lo, hi);
      return *reinterpret_cast<uint32_t*>(&h);
    } else {
      static_assert(std::is_same_v<E, BF16>, "pack2: F16 or BF16");
      __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
      return *reinterpret_cast<uint32_t*>(&h);
    })

// One fp32 value rounded to nearest even to E (F16 / BF16), as its bits.
template <class E>
SKIPDIT_DEV uint16_t from_float(float f) SKIPDIT_PTX(
    if constexpr (std::is_same_v<E, F16>) {
      return __half_as_ushort(__float2half_rn(f));
    } else {
      static_assert(std::is_same_v<E, BF16>, "from_float: F16 or BF16");
      return __bfloat16_as_ushort(__float2bfloat16_rn(f));
    })

// The fp32 value of an E (F16 / BF16) element (exact).
template <class E>
SKIPDIT_DEV float to_float(uint16_t h) SKIPDIT_PTX(
    if constexpr (std::is_same_v<E, F16>) {
      return __half2float(__ushort_as_half(h));
    } else {
      static_assert(std::is_same_v<E, BF16>, "to_float: F16 or BF16");
      return __uint_as_float(static_cast<uint32_t>(h) << 16);
    })

// ---------------------------------------------------------------------------------
// Warp and CTA

// shfl.sync.bfly over the full warp: v of lane (lane ^ mask).
SKIPDIT_DEV float shfl_xor(float v, int mask) SKIPDIT_PTX(
    return __shfl_xor_sync(0xffffffffu, v, mask);)
SKIPDIT_DEV void warp_sync() SKIPDIT_PTX(__syncwarp();)
SKIPDIT_DEV void block_sync() SKIPDIT_PTX(__syncthreads();)

// ---------------------------------------------------------------------------------
// Math (fast approximations; the emulator computes them exactly)

SKIPDIT_DEV float fast_exp2(float x) SKIPDIT_PTX(
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;)
SKIPDIT_DEV float fast_log2(float x) SKIPDIT_PTX(
    float y;
    asm("lg2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;)
// 1 / sqrt(x) (rsqrtf: rsqrt.approx.ftz.f32 under --use_fast_math).
SKIPDIT_DEV float rsqrt_approx(float x) SKIPDIT_PTX(return rsqrtf(x);)

// Makes v opaque to the optimizer (an empty asm that "changes" it), so that values
// derived from it are recomputed where they are used rather than hoisted out of loops.
SKIPDIT_DEV void opaque(int64_t& v) SKIPDIT_PTX(asm volatile("" : "+l"(v));)

// ---------------------------------------------------------------------------------
// Memory accesses the emulator checks (bounds and alignment: shared memory against the
// CTA's allocation, global reads against the input tensors, writes against the outputs).

SKIPDIT_DEV U128 ld_shared_v4(const void* p) SKIPDIT_PTX(return *reinterpret_cast<const U128*>(p);)
SKIPDIT_DEV void st_shared_v4(void* p, const U128& v) SKIPDIT_PTX(*reinterpret_cast<U128*>(p) = v;)
SKIPDIT_DEV void st_shared_u32(void* p, uint32_t v) SKIPDIT_PTX(*reinterpret_cast<uint32_t*>(p) = v;)
// 16 bytes of read-only global data (ld.global.nc).
SKIPDIT_DEV U128 ldg_v4(const void* p) SKIPDIT_PTX(
    const uint4 t = __ldg(reinterpret_cast<const uint4*>(p));
    return U128{{t.x, t.y, t.z, t.w}};)
// Global stores (st.global, default caching). The narrow ones go through the __stwb
// intrinsics, the same instruction: a plain store through these wrappers made ptxas
// spill in the skip_fuse LayerNorm backward on sm_80, while __stwb for the 16-byte store
// changed the register allocation of the attention kernels (both measured, nvcc 13.0).
SKIPDIT_DEV void st_global_v4(void* p, const U128& v) SKIPDIT_PTX(*reinterpret_cast<U128*>(p) = v;)
SKIPDIT_DEV void st_global_v2(void* p, uint32_t lo, uint32_t hi) SKIPDIT_PTX(
    __stwb(reinterpret_cast<uint2*>(p), make_uint2(lo, hi));)
SKIPDIT_DEV void st_global_u32(void* p, uint32_t v) SKIPDIT_PTX(
    __stwb(reinterpret_cast<unsigned*>(p), v);)
SKIPDIT_DEV void st_global_u16(void* p, uint16_t v) SKIPDIT_PTX(
    __stwb(reinterpret_cast<unsigned short*>(p), v);)
SKIPDIT_DEV void st_global_f32(float* p, float v) SKIPDIT_PTX(__stwb(p, v);)

}  // namespace skipdit
