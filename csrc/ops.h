// Declarations shared by the op schemas (ops.cpp), the autograd kernels
// (autograd.cpp) and the device kernels (cpu/, cuda/).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace skipdit {

// C++ signatures of the op schemas (ops.cpp), for typed calls through the dispatcher.
using SkipFuseSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, const at::Tensor&,
                               const std::optional<at::Tensor>&, double);
using SkipFuseBackwardOut =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using SkipFuseBackwardSig = SkipFuseBackwardOut(const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, const at::Tensor&,
                                                const std::optional<at::Tensor>&, double);
using AttentionForwardSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                               const at::Tensor&, double);
using AttentionBackwardOut = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using AttentionBackwardSig = AttentionBackwardOut(const at::Tensor&, const at::Tensor&,
                                                  const at::Tensor&, const at::Tensor&,
                                                  const at::Tensor&, const at::Tensor&, double);
using CacheDeltaSig = at::Tensor(const at::Tensor&, const at::Tensor&);

// Sizes of a skip_fuse call: M rows of width D (x and skip each), D_out outputs.
struct SkipFuseShape {
  int64_t M;
  int64_t D;
  int64_t D_out;
};

// Validates skip_fuse arguments (DESIGN.md section 2) and returns the sizes.
SkipFuseShape check_skip_fuse(const char* op, const at::Tensor& x, const at::Tensor& skip,
                              const at::Tensor& norm_weight, const at::Tensor& norm_bias,
                              const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              double eps);

// Validates skip_fuse_backward arguments: those of the forward, and grad_out (the
// output's shape, x's dtype, x's device). Returns the sizes.
SkipFuseShape check_skip_fuse_backward(const char* op, const at::Tensor& grad_out,
                                       const at::Tensor& x, const at::Tensor& skip,
                                       const at::Tensor& norm_weight, const at::Tensor& norm_bias,
                                       const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias, double eps);

// Validates attention arguments; returns the softmax scale to use.
double check_attention(const char* op, const at::Tensor& q, const at::Tensor& k,
                       const at::Tensor& v, std::optional<double> scale);

// Validates attention_backward arguments: those of the forward, grad_out and out (q's
// shape and dtype), lse ([B, H, Nq] in the accumulation dtype of q: float32 for 16-bit
// and float32 inputs, float64 for float64), all on q's device. Returns the scale.
double check_attention_backward(const char* op, const at::Tensor& grad_out, const at::Tensor& q,
                                const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                const at::Tensor& lse, double scale);

void check_cache_delta(const char* op, const at::Tensor& a, const at::Tensor& b);

// A CUDA device as the kernels' limit functions see it. cc_major < 0: unknown (no
// device checks); smem_optin < 0: unknown (no shared-memory check).
struct CudaDeviceInfo {
  int cc_major = -1;
  int cc_minor = 0;
  int64_t smem_optin = -1;
};

#ifdef SKIPDIT_WITH_CUDA
// Why the CUDA kernels of an op cannot serve inputs with these features (and dtype, when
// given) on such a device; "" when they can. Each is defined next to its kernels
// (cuda/<op>.cu), which check their inputs with it, and is served by the cuda_limits op.
//   skip_fuse:   features = {D, D_out}
//   attention:   features = {head_dim}
//   cache_delta: features = {}
std::string skip_fuse_cuda_limits(c10::ArrayRef<int64_t> features,
                                  std::optional<at::ScalarType> dtype, const CudaDeviceInfo& dev);
std::string attention_cuda_limits(c10::ArrayRef<int64_t> features,
                                  std::optional<at::ScalarType> dtype, const CudaDeviceInfo& dev);
std::string cache_delta_cuda_limits(c10::ArrayRef<int64_t> features,
                                    std::optional<at::ScalarType> dtype, const CudaDeviceInfo& dev);
#endif

// Output shape of skip_fuse: x's leading dims + D_out.
inline std::vector<int64_t> skip_fuse_out_shape(const at::Tensor& x, int64_t d_out) {
  std::vector<int64_t> s(x.sizes().begin(), x.sizes().end());
  s.back() = d_out;
  return s;
}

}  // namespace skipdit
