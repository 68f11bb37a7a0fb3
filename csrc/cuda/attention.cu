// attention_forward on CUDA: flash-attention forward with mma.sync tensor cores for
// fp16 and bf16 (kernel bodies and tile choices: attention_fwd.cuh).
//
// q, k, v are read in place through their strides (views of a fused qkv projection are
// never copied). Only inputs whose rows are not 16-byte aligned (a data pointer or a
// B/N/H stride that is not a multiple of 8 elements, which no qkv projection view
// produces) are copied once into an aligned contiguous buffer, because the kernels
// move rows in 16-byte cp.async chunks.
//
// The backward pass has no CUDA kernel here (the backend routes it elsewhere).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>

#include "common.h"
#include "cuda/attention_fwd.cuh"
#include "ops.h"

namespace skipdit {
namespace {

using attn::FwdParams;

template <class C, class E>
__global__ void __launch_bounds__(C::kThreads) attn_fwd_main_kernel(const FwdParams p) {
  extern __shared__ __align__(16) char smem[];
  attn::fwd_main<C, E>(p, smem, threadIdx.x, blockIdx.x);
}

template <class C, class E>
__global__ void __launch_bounds__(32 * C::kMaxWarps, 1) attn_fwd_short_kernel(const FwdParams p) {
  extern __shared__ __align__(16) char smem[];
  attn::fwd_short<C, E>(p, smem, threadIdx.x, blockDim.x / 32, blockIdx.x);
}

// Raises a kernel's dynamic shared-memory limit to `bytes`, once per kernel (Tag: one
// type per kernel) and device.
template <class Tag>
void allow_smem(const void* kernel, int bytes, int device) {
  static std::atomic<int> configured[64];
  if (bytes <= 48 * 1024) return;
  if (device < 64 && configured[device].load(std::memory_order_relaxed) >= bytes) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  if (device < 64) configured[device].store(bytes, std::memory_order_relaxed);
}
template <class C, class E, bool kShort>
struct KernelTag {};

bool rows_aligned(const at::Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int d = 0; d < 3; ++d) {
    if (t.size(d) > 1 && t.stride(d) % 8 != 0) return false;
  }
  return true;
}

at::Tensor aligned(const at::Tensor& t) {
  return rows_aligned(t) ? t : at::empty(t.sizes(), t.options()).copy_(t);
}

template <class E>
void launch(FwdParams p, int device, cudaStream_t stream) {
  attn::plan(p, [&](auto cfg, auto is_short, const attn::LaunchShape& shape) {
    using C = typename decltype(cfg)::type;
    TORCH_CHECK(shape.grid <= std::numeric_limits<int>::max(), "skipdit::attention_forward: ",
                p.BH, " (batch, head) pairs are too many for one launch");
    void (*kernel)(const FwdParams);
    if constexpr (decltype(is_short)::value) {
      kernel = attn_fwd_short_kernel<C, E>;
    } else {
      kernel = attn_fwd_main_kernel<C, E>;
    }
    allow_smem<KernelTag<C, E, decltype(is_short)::value>>(reinterpret_cast<const void*>(kernel),
                                                           shape.max_smem, device);
    kernel<<<static_cast<unsigned>(shape.grid), shape.threads, shape.smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cuda(const at::Tensor& q_in,
                                                          const at::Tensor& k_in,
                                                          const at::Tensor& v_in, double scale) {
  const char* op = "skipdit::attention_forward";
  check_attention(op, q_in, k_in, v_in, scale);
  const auto dtype = q_in.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kHalf || dtype == at::kBFloat16, op,
                   ": the CUDA kernel runs float16 and bfloat16 (tensor-core MMA), got ", dtype,
                   "; use the triton or reference backend for other dtypes");
  c10::cuda::CUDAGuard guard(q_in.device());
  const int64_t B = q_in.size(0), Nq = q_in.size(1), H = q_in.size(2), Dh = q_in.size(3);
  const int64_t Nk = k_in.size(1);
  constexpr int64_t kMaxLen = int64_t{1} << 30;
  TORCH_CHECK_VALUE(Nq < kMaxLen && Nk < kMaxLen && H < kMaxLen, op,
                    ": sequence lengths and head count must be below 2^30, got Nq=", Nq,
                    ", Nk=", Nk, ", H=", H);
  const at::Tensor q = aligned(q_in), k = aligned(k_in), v = aligned(v_in);

  auto out = new_output({B, Nq, H, Dh}, q.options());
  auto lse = new_output({B, H, Nq}, q.options().dtype(at::kFloat));

  FwdParams p{};
  p.q = static_cast<const uint16_t*>(q.const_data_ptr());
  p.k = static_cast<const uint16_t*>(k.const_data_ptr());
  p.v = static_cast<const uint16_t*>(v.const_data_ptr());
  p.out = static_cast<uint16_t*>(out.data_ptr());
  p.lse = lse.data_ptr<float>();
  p.q_sb = q.stride(0), p.q_sn = q.stride(1), p.q_sh = q.stride(2);
  p.k_sb = k.stride(0), p.k_sn = k.stride(1), p.k_sh = k.stride(2);
  p.v_sb = v.stride(0), p.v_sn = v.stride(1), p.v_sh = v.stride(2);
  p.BH = B * H;
  p.H = static_cast<int>(H);
  p.Nq = static_cast<int>(Nq);
  p.Nk = static_cast<int>(Nk);
  p.dh = static_cast<int>(Dh);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);

  const int device = q.get_device();
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (dtype == at::kHalf) {
    launch<attn::F16>(p, device, stream);
  } else {
    launch<attn::BF16>(p, device, stream);
  }
  return {out, lse};
}

}  // namespace
}  // namespace skipdit

TORCH_LIBRARY_IMPL(skipdit, CUDA, m) {
  m.impl("attention_forward", &skipdit::attention_forward_cuda);
}
