// attention_forward on CUDA: flash-attention forward with mma.sync tensor cores for
// fp16 and bf16 (kernels: attention_kernels.cuh; tile choices: attention_tiles.h).
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

#include <limits>
#include <string>

#include "common.h"
#include "cuda/attention_kernels.cuh"
#include "cuda/cuda_utils.cuh"
#include "ops.h"

namespace skipdit {

namespace {

std::string attention_dtype_reason(at::ScalarType dt) {
  if (dt == at::kHalf || dt == at::kBFloat16) return "";
  return "the CUDA attention kernel runs float16 and bfloat16 only, got " + torch_dtype_name(dt);
}

// The device checks of cuda_utils, with the shared memory of the largest launch for
// head dim dh.
std::string attention_device_reason(int64_t dh, const CudaDeviceInfo& dev) {
  return cuda::device_reason(dev, "the CUDA attention kernel",
                             attention::max_smem_bytes(static_cast<int>(dh)),
                             " for head dim " + std::to_string(dh));
}

}  // namespace

std::string attention_cuda_limits(c10::ArrayRef<int64_t> features,
                                  std::optional<at::ScalarType> dtype, const CudaDeviceInfo& dev) {
  TORCH_CHECK_VALUE(features.size() == 1,
                    "skipdit::cuda_limits: attention takes features [head_dim], got ", features);
  const int64_t dh = features[0];
  if (dh % 8 != 0 || dh < 8 || dh > 256) {
    return "head dim must be a multiple of 8 up to 256, got " + std::to_string(dh);
  }
  std::string why = dtype.has_value() ? attention_dtype_reason(*dtype) : "";
  if (why.empty()) why = attention_device_reason(dh, dev);
  return why;
}

namespace {

using attention::FwdParams;

template <class E>
void launch(FwdParams p, int device, cudaStream_t stream) {
  attention::plan(p, [&](auto cfg, auto is_short, const attention::LaunchShape& shape) {
    using C = typename decltype(cfg)::type;
    TORCH_CHECK(shape.grid <= std::numeric_limits<int>::max(), "skipdit::attention_forward: ",
                p.BH, " (batch, head) pairs are too many for one launch");
    void (*kernel)(const FwdParams);
    if constexpr (decltype(is_short)::value) {
      kernel = attention::attention_fwd_short_kernel<C, E>;
    } else {
      kernel = attention::attention_fwd_kernel<C, E>;
    }
    cuda::opt_in_smem(reinterpret_cast<const void*>(kernel), shape.max_smem, device,
                      "skipdit::attention_forward");
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
  const std::string dt = attention_dtype_reason(dtype);
  TORCH_CHECK_TYPE(dt.empty(), op, ": ", dt, "; use the triton or reference backend for other dtypes");
  const int device = q_in.get_device();
  const std::string why = attention_device_reason(q_in.size(3), cuda::device_info(device));
  TORCH_CHECK_VALUE(why.empty(), op, ": ", why);
  c10::cuda::CUDAGuard guard(q_in.device());
  const int64_t B = q_in.size(0), Nq = q_in.size(1), H = q_in.size(2), Dh = q_in.size(3);
  const int64_t Nk = k_in.size(1);
  constexpr int64_t kMaxLen = int64_t{1} << 30;
  TORCH_CHECK_VALUE(Nq < kMaxLen && Nk < kMaxLen && H < kMaxLen, op,
                    ": sequence lengths and head count must be below 2^30, got Nq=", Nq,
                    ", Nk=", Nk, ", H=", H);
  // The kernels move rows in 16-byte cp.async chunks: rows that are not 16-byte
  // aligned (no qkv projection view has them) are copied once.
  const at::Tensor q = cuda::with_aligned_rows(q_in), k = cuda::with_aligned_rows(k_in),
                   v = cuda::with_aligned_rows(v_in);

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
  p.scale_log2 = static_cast<float>(scale * attention::kLog2e);

  auto stream = c10::cuda::getCurrentCUDAStream();
  if (dtype == at::kHalf) {
    launch<F16>(p, device, stream);
  } else {
    launch<BF16>(p, device, stream);
  }
  return {out, lse};
}

}  // namespace
}  // namespace skipdit

TORCH_LIBRARY_IMPL(skipdit, CUDA, m) {
  m.impl("attention_forward", &skipdit::attention_forward_cuda);
}
