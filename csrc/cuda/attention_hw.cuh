// The warp-level hardware primitives the attention kernels are written against
// (csrc/cuda/attention_fwd.cuh), as inline PTX for sm_80 and later.
//
// The kernels use nothing else of the GPU: every tensor-core, shared-memory and
// asynchronous-copy instruction goes through one of these functions. The CPU emulator
// of the kernels (tests/emu/attention_emu.cpp) implements the same functions from the
// PTX ISA's definitions, so the kernel code it runs is this code.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#define SKIPDIT_DEV __device__ __forceinline__
#define SKIPDIT_HD __host__ __device__

namespace skipdit::attn {

// Element-format tags of the 16-bit inputs.
struct F16 {};
struct BF16 {};

struct alignas(16) U128 {
  uint32_t w[4];
};

SKIPDIT_DEV uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte asynchronous global -> shared copy (L2 only); when !valid nothing is read
// and the 16 destination bytes are zero-filled (src-size 0).
SKIPDIT_DEV void cp_async16(void* smem_dst, const void* gmem_src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem_dst)),
               "l"(gmem_src), "r"(valid ? 16 : 0)
               : "memory");
}

SKIPDIT_DEV void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most N of this thread's committed copy groups are pending.
template <int N>
SKIPDIT_DEV void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// ldmatrix: lane 8*i + r gives the address of row r of 8x8 matrix i (16 bytes);
// register i of lane l receives row l/4, elements 2*(l%4) and 2*(l%4)+1 of matrix i
// (with .trans: column l/4, rows 2*(l%4) and 2*(l%4)+1).
SKIPDIT_DEV void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
SKIPDIT_DEV void ldsm_x2(uint32_t (&r)[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_u32(p)));
}
SKIPDIT_DEV void ldsm_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
SKIPDIT_DEV void ldsm_x2_trans(uint32_t (&r)[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_u32(p)));
}

// d += A(16x16, row) * B(16x8, col), fp32 accumulators.
template <class E>
SKIPDIT_DEV void mma_k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
SKIPDIT_DEV void mma_k16<F16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
SKIPDIT_DEV void mma_k16<BF16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// d += A(16x8, row) * B(8x8, col): the k8 step that lets head dims 72 and 88 avoid
// padding the k dimension of Q K^T to a multiple of 16.
template <class E>
SKIPDIT_DEV void mma_k8(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t b0);
template <>
SKIPDIT_DEV void mma_k8<F16>(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t b0) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(b0));
}
template <>
SKIPDIT_DEV void mma_k8<BF16>(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t b0) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(b0));
}

// Two fp32 values rounded (to nearest even) into one register: lo in bits 0..15.
template <class E>
SKIPDIT_DEV uint32_t pack2(float lo, float hi);
template <>
SKIPDIT_DEV uint32_t pack2<F16>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
SKIPDIT_DEV uint32_t pack2<BF16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

SKIPDIT_DEV float shfl_xor(float v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }
SKIPDIT_DEV void block_sync() { __syncthreads(); }
SKIPDIT_DEV void warp_sync() { __syncwarp(); }

SKIPDIT_DEV float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
SKIPDIT_DEV float fast_log2(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Makes v opaque to the optimizer (an empty asm that "changes" it), so that values
// derived from it are recomputed where they are used rather than hoisted out of loops.
SKIPDIT_DEV void opaque(int64_t& v) { asm volatile("" : "+l"(v)); }

SKIPDIT_DEV void st_shared_u32(void* p, uint32_t v) { *reinterpret_cast<uint32_t*>(p) = v; }
SKIPDIT_DEV U128 ld_shared_v4(const void* p) { return *reinterpret_cast<const U128*>(p); }
SKIPDIT_DEV void st_global_v4(void* p, const U128& v) { *reinterpret_cast<U128*>(p) = v; }
SKIPDIT_DEV void st_global_f32(float* p, float v) { *p = v; }

}  // namespace skipdit::attn
