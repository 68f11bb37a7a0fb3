// Op schemas of the skipdit library: one definition per op, here only.
//
// Each native op has kernels for CPU (csrc/cpu) and, when built with CUDA,
// CUDA (csrc/cuda); autograd kernels live in autograd.cpp, fake (meta) kernels in
// skipdit_fast/ops/fakes.py. The *_triton ops share the native schemas and get their
// implementations from skipdit_fast/kernels (Triton) at import time.
#include "ops.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "common.h"
#include "cpu/skip_fuse.h"
#include "cuda/skip_fuse_tiles.h"

namespace skipdit {

bool& poison_outputs_flag() {
  static bool flag = false;
  return flag;
}

SkipFuseShape check_skip_fuse(const char* op, const at::Tensor& x, const at::Tensor& skip,
                              const at::Tensor& norm_weight, const at::Tensor& norm_bias,
                              const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              double eps) {
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"x", &x}, {"skip", &skip},
                                {"norm_weight", &norm_weight}, {"norm_bias", &norm_bias}, {"weight", &weight}}) {
    check_defined(op, name, *t);
  }
  if (bias.has_value()) check_defined(op, "bias", *bias);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, op, ": eps must be finite and >= 0, got ", eps);
  check_float_dtype(op, "x", x);
  check_last_dim_contiguous(op, "x", x);
  check_last_dim_contiguous(op, "skip", skip);
  check_nonempty(op, "x", x);
  TORCH_CHECK_VALUE(skip.sizes() == x.sizes(), op, ": skip must have the shape of x ", x.sizes(),
                    ", got ", skip.sizes());
  TORCH_CHECK_TYPE(skip.scalar_type() == x.scalar_type(), op, ": skip dtype ", skip.scalar_type(),
                   " differs from x dtype ", x.scalar_type());
  const int64_t D = x.size(-1);
  TORCH_CHECK_VALUE(norm_weight.dim() == 1 && norm_weight.size(0) == 2 * D, op,
                    ": norm_weight must have shape [2*D] = [", 2 * D, "], got ", norm_weight.sizes());
  TORCH_CHECK_VALUE(norm_bias.dim() == 1 && norm_bias.size(0) == 2 * D, op,
                    ": norm_bias must have shape [2*D] = [", 2 * D, "], got ", norm_bias.sizes());
  for (const auto* p : {&norm_weight, &norm_bias}) {
    TORCH_CHECK_TYPE(p->scalar_type() == x.scalar_type() || p->scalar_type() == at::kFloat, op,
                     ": norm parameters must be float32 or the dtype of x (", x.scalar_type(),
                     "), got ", p->scalar_type());
  }
  TORCH_CHECK_TYPE(norm_weight.scalar_type() == norm_bias.scalar_type(), op,
                   ": norm_weight and norm_bias must share a dtype, got ",
                   norm_weight.scalar_type(), " and ", norm_bias.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == 2 * D, op,
                    ": weight must have shape [D_out, 2*D] = [D_out, ", 2 * D, "], got ",
                    weight.sizes());
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), op, ": weight dtype ",
                   weight.scalar_type(), " differs from x dtype ", x.scalar_type());
  TORCH_CHECK_VALUE(weight.numel() > 0, op, ": weight is empty (shape ", weight.sizes(), ")");
  check_last_dim_contiguous(op, "weight", weight);
  check_same_device(op, x, "skip", skip);
  check_same_device(op, x, "norm_weight", norm_weight);
  check_same_device(op, x, "norm_bias", norm_bias);
  check_same_device(op, x, "weight", weight);
  const int64_t D_out = weight.size(0);
  if (bias.has_value()) {
    const auto& b = *bias;
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == D_out, op, ": bias must have shape [D_out] = [",
                      D_out, "], got ", b.sizes());
    TORCH_CHECK_TYPE(b.scalar_type() == weight.scalar_type(), op, ": bias dtype ", b.scalar_type(),
                     " differs from weight dtype ", weight.scalar_type());
    check_same_device(op, x, "bias", b);
  }
  return {x.numel() / D, D, D_out};
}

SkipFuseShape check_skip_fuse_backward(const char* op, const at::Tensor& grad_out,
                                       const at::Tensor& x, const at::Tensor& skip,
                                       const at::Tensor& norm_weight, const at::Tensor& norm_bias,
                                       const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias, double eps) {
  check_defined(op, "grad_out", grad_out);
  const SkipFuseShape s = check_skip_fuse(op, x, skip, norm_weight, norm_bias, weight, bias, eps);
  const auto out_shape = skip_fuse_out_shape(x, s.D_out);
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(out_shape), op,
                    ": grad_out must have the output's shape ", at::IntArrayRef(out_shape),
                    " (x's leading dims, D_out), got ", grad_out.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type(), op, ": grad_out dtype ",
                   grad_out.scalar_type(), " differs from x dtype ", x.scalar_type());
  check_same_device(op, x, "grad_out", grad_out, "x");
  return s;
}

double check_attention(const char* op, const at::Tensor& q, const at::Tensor& k,
                       const at::Tensor& v, std::optional<double> scale) {
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"q", &q}, {"k", &k}, {"v", &v}}) {
    check_defined(op, name, *t);
  }
  check_float_dtype(op, "q", q);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"q", &q}, {"k", &k}, {"v", &v}}) {
    TORCH_CHECK_VALUE(t->dim() == 4, op, ": ", name, " must be 4-D [B, N, H, Dh] (BSHD), got shape ",
                      t->sizes());
    check_last_dim_contiguous(op, name, *t);
    check_nonempty(op, name, *t);
    TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), op, ": ", name, " dtype ",
                     t->scalar_type(), " differs from q dtype ", q.scalar_type());
    check_same_device(op, q, name, *t);
  }
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), op, ": k and v must have one shape, got ", k.sizes(),
                    " and ", v.sizes());
  TORCH_CHECK_VALUE(q.size(0) == k.size(0) && q.size(2) == k.size(2) && q.size(3) == k.size(3), op,
                    ": q ", q.sizes(), " and k ", k.sizes(), " must agree in batch, heads and head dim");
  const int64_t dh = q.size(3);
  TORCH_CHECK_VALUE(dh % 8 == 0 && dh <= 256, op,
                    ": head dim must be a multiple of 8 up to 256, got ", dh);
  double s = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(dh));
  TORCH_CHECK_VALUE(std::isfinite(s), op, ": scale must be finite, got ", s);
  return s;
}

double check_attention_backward(const char* op, const at::Tensor& grad_out, const at::Tensor& q,
                                const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                const at::Tensor& lse, double scale) {
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"grad_out", &grad_out}, {"out", &out},
                                {"lse", &lse}}) {
    check_defined(op, name, *t);
  }
  const double s = check_attention(op, q, k, v, scale);
  for (const auto& [name, t] :
       {std::pair<const char*, const at::Tensor*>{"grad_out", &grad_out}, {"out", &out}}) {
    TORCH_CHECK_VALUE(t->sizes() == q.sizes(), op, ": ", name, " must have the shape of q ",
                      q.sizes(), ", got ", t->sizes());
    TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), op, ": ", name, " dtype ",
                     t->scalar_type(), " differs from q dtype ", q.scalar_type());
    check_same_device(op, q, name, *t, "q");
  }
  const std::vector<int64_t> lse_shape{q.size(0), q.size(2), q.size(1)};
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef(lse_shape), op,
                    ": lse must have shape [B, H, Nq] = ", at::IntArrayRef(lse_shape), ", got ",
                    lse.sizes());
  TORCH_CHECK_TYPE(lse.scalar_type() == acc_type(q.scalar_type()), op, ": lse dtype ",
                   lse.scalar_type(), " must be ", acc_type(q.scalar_type()),
                   " (the accumulation dtype of q's ", q.scalar_type(), ")");
  check_same_device(op, q, "lse", lse, "q");
  return s;
}

void check_cache_delta(const char* op, const at::Tensor& a, const at::Tensor& b) {
  check_defined(op, "a", a);
  check_defined(op, "b", b);
  check_float_dtype(op, "a", a);
  check_last_dim_contiguous(op, "a", a);
  check_last_dim_contiguous(op, "b", b);
  check_nonempty(op, "a", a);
  TORCH_CHECK_VALUE(a.sizes() == b.sizes(), op, ": a and b must have one shape, got ", a.sizes(),
                    " and ", b.sizes());
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), op, ": a dtype ", a.scalar_type(),
                   " differs from b dtype ", b.scalar_type());
  check_same_device(op, a, "b", b);
}

namespace {

// Argument checks of the backward ops before the dispatcher picks a backend kernel.
// Registered at BackendSelect, which every call passes before the backend keys: a call
// that mixes devices (say a meta grad_out with CPU inputs) would otherwise go to the
// kernel of the highest-priority device among its arguments (the fake kernel for meta),
// which sees only that its own inputs are consistent and returns uninitialized tensors.
// The same check runs for the native op and its *_triton twin (one schema each).
constexpr c10::DispatchKeySet kAfterBackendSelect(c10::DispatchKeySet::FULL_AFTER,
                                                  c10::DispatchKey::BackendSelect);

template <const char* kName>
SkipFuseBackwardOut skip_fuse_backward_checked(c10::DispatchKeySet ks, const at::Tensor& grad_out,
                                          const at::Tensor& x, const at::Tensor& skip,
                                          const at::Tensor& nw, const at::Tensor& nb,
                                          const at::Tensor& w,
                                          const std::optional<at::Tensor>& bias, double eps) {
  check_skip_fuse_backward(kName, grad_out, x, skip, nw, nb, w, bias, eps);
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow(kName, "").typed<SkipFuseBackwardSig>();
  return op.redispatch(ks & kAfterBackendSelect, grad_out, x, skip, nw, nb, w, bias, eps);
}

template <const char* kName>
AttentionBackwardOut attention_backward_checked(c10::DispatchKeySet ks, const at::Tensor& grad_out,
                                      const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v, const at::Tensor& out,
                                      const at::Tensor& lse, double scale) {
  check_attention_backward(kName, grad_out, q, k, v, out, lse, scale);
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow(kName, "").typed<AttentionBackwardSig>();
  return op.redispatch(ks & kAfterBackendSelect, grad_out, q, k, v, out, lse, scale);
}

constexpr char kSkipFuseBwd[] = "skipdit::skip_fuse_backward";
constexpr char kSkipFuseBwdTriton[] = "skipdit::skip_fuse_backward_triton";
constexpr char kAttentionBwd[] = "skipdit::attention_backward";
constexpr char kAttentionBwdTriton[] = "skipdit::attention_backward_triton";

std::string build_info() {
  std::string s = "{\"torch\": \"" SKIPDIT_TORCH_VERSION "\"";
#ifdef SKIPDIT_WITH_CUDA
  s += ", \"cuda\": \"" SKIPDIT_CUDA_COMPILER_VERSION "\", \"cuda_archs\": \"" SKIPDIT_CUDA_ARCHS "\"";
#else
  s += ", \"cuda\": null, \"cuda_archs\": \"\"";
#endif
#if defined(__clang__)
  s += ", \"cxx\": \"clang " __clang_version__ "\"";
#elif defined(__GNUC__)
  s += ", \"cxx\": \"gcc " __VERSION__ "\"";
#endif
#ifdef _OPENMP
  s += ", \"openmp\": true";
#else
  s += ", \"openmp\": false";
#endif
  // Constants of the kernels' source (the same in every build, CUDA or not), for code
  // that sizes or checks against them (benchmarks, memory tests).
  auto kv = [](const char* key, int64_t v) {
    return std::string("\"") + key + "\": " + std::to_string(v);
  };
  s += ", \"constants\": {" + kv("skip_fuse_cpu_fwd_chunk_bytes", skip_fuse::kCpuFwdChunkBytes) +
       ", " + kv("skip_fuse_cpu_bwd_chunk_bytes", skip_fuse::kCpuBwdChunkBytes) + ", " +
       kv("skip_fuse_cuda_smem_bytes", skip_fuse::kFwdSmemBytes) + ", " +
       kv("skip_fuse_cuda_ln_bwd_smem_bytes_per_d", skip_fuse::kLnBwdSmemBytesPerD) + ", " +
       kv("skip_fuse_cuda_h_chunk_bytes", skip_fuse::kHChunkBytes) + ", " +
       kv("skip_fuse_cuda_max_d", skip_fuse::kMaxD) + ", " +
       kv("skip_fuse_cuda_d_multiple", skip_fuse::kDMultiple) + ", " +
       kv("row_indexer_max_dims", RowIndexer::kMaxDims) + "}";
  s += "}";
  return s;
}

std::string cuda_limits(c10::string_view op, c10::ArrayRef<int64_t> features, int64_t cc_major,
                        int64_t cc_minor, int64_t smem_optin, std::optional<at::ScalarType> dtype) {
  TORCH_CHECK_VALUE(op == "skip_fuse" || op == "attention" || op == "cache_delta",
                    "skipdit::cuda_limits: unknown op '", op,
                    "'; the ops are skip_fuse, attention and cache_delta");
#ifdef SKIPDIT_WITH_CUDA
  const CudaDeviceInfo dev{static_cast<int>(cc_major), static_cast<int>(cc_minor), smem_optin};
  if (op == "skip_fuse") return skip_fuse_cuda_limits(features, dtype, dev);
  if (op == "attention") return attention_cuda_limits(features, dtype, dev);
  return cache_delta_cuda_limits(features, dtype, dev);
#else
  return "native library built without CUDA";
#endif
}

}  // namespace
}  // namespace skipdit

#define SKIPDIT_SKIP_FUSE_ARGS \
  "(Tensor x, Tensor skip, Tensor norm_weight, Tensor norm_bias, Tensor weight, Tensor? bias, float eps=1e-06)"
#define SKIPDIT_SKIP_FUSE_BWD_ARGS                                                                 \
  "(Tensor grad_out, Tensor x, Tensor skip, Tensor norm_weight, Tensor norm_bias, Tensor weight, " \
  "Tensor? bias, float eps) -> (Tensor grad_x, Tensor grad_skip, Tensor grad_norm_weight, "        \
  "Tensor grad_norm_bias, Tensor grad_weight, Tensor grad_bias)"
#define SKIPDIT_ATTENTION_FWD_ARGS "(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor out, Tensor lse)"
#define SKIPDIT_ATTENTION_BWD_ARGS                                                                 \
  "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale) -> " \
  "(Tensor grad_q, Tensor grad_k, Tensor grad_v)"

TORCH_LIBRARY(skipdit, m) {
  // Fake kernels for torch.compile are registered from this Python module.
  m.set_python_module("skipdit_fast.ops.fakes");
  // Native ops: CPU (and CUDA) kernels in C++, autograd in autograd.cpp.
  // y = linear(layer_norm(cat([x, skip], -1)), weight, bias); see DESIGN.md section 2.
  m.def("skip_fuse" SKIPDIT_SKIP_FUSE_ARGS " -> Tensor");
  // Gradients of skip_fuse. grad_bias is empty when bias is None.
  m.def("skip_fuse_backward" SKIPDIT_SKIP_FUSE_BWD_ARGS);
  // o = softmax(q @ k^T * scale) @ v per (batch, head); BSHD layout. Non-finite
  // inputs give the reference's NaNs and infinities (skipdit_fast/reference.py) on the
  // CPU and CUDA kernels: a query row whose scores include NaN or +inf, or are all -inf,
  // gives a NaN output row; NaN in v[b, j, h, d] gives NaN in out[b, :, h, d] (+-inf
  // gives +-inf). The lse of such rows (attention_forward) is the reference's logsumexp
  // on the CPU (NaN, +inf, -inf respectively) and NaN on CUDA.
  m.def("attention(Tensor q, Tensor k, Tensor v, float? scale=None) -> Tensor");
  // Forward that also returns the row log-sum-exp (natural log, [B, H, Nq], fp32
  // or fp64) for the backward.
  m.def("attention_forward" SKIPDIT_ATTENTION_FWD_ARGS);
  m.def("attention_backward" SKIPDIT_ATTENTION_BWD_ARGS);
  // sum|a - b| / sum|b| as a 0-d fp32 tensor (fp64 for fp64 inputs).
  m.def("cache_delta(Tensor a, Tensor b) -> Tensor");
  // JSON: what this library was built against and for: {"torch", "cuda", "cuda_archs",
  // "cxx", "openmp", "constants": {skip_fuse_cpu_fwd_chunk_bytes,
  // skip_fuse_cpu_bwd_chunk_bytes, skip_fuse_cuda_smem_bytes (the forward GEMM's
  // shared memory per block), skip_fuse_cuda_ln_bwd_smem_bytes_per_d,
  // skip_fuse_cuda_h_chunk_bytes, skip_fuse_cuda_max_d, skip_fuse_cuda_d_multiple,
  // row_indexer_max_dims}}.
  m.def("build_info() -> str");
  m.impl("build_info", [] { return skipdit::build_info(); });
  // Why the CUDA kernels of `op` cannot serve inputs with these features on a device of
  // compute capability (cc_major, cc_minor) allowing smem_optin bytes of opt-in shared
  // memory per block (torch.cuda.get_device_properties(d).shared_memory_per_block_optin),
  // in the given dtype; "" when they can. The same limits the kernels check their inputs
  // against, stated once next to them (csrc/cuda/<op>.cu).
  //   op "skip_fuse":   features [D, D_out]; dtypes float16, bfloat16, float32
  //   op "attention":   features [head_dim]; dtypes float16, bfloat16
  //   op "cache_delta": features []; every float dtype
  // cc_major < 0: no device checks (shape and dtype only); smem_optin < 0: no shared-memory
  // check; dtype None: no dtype check. Device checks: compute capability >= 8.0, a kernel
  // image in this build (build_info()["cuda_archs"]) for the capability, the shared memory.
  // Bad arguments (unknown op, wrong number of features) raise ValueError. A library
  // built without CUDA answers "native library built without CUDA" for every valid op.
  m.def("cuda_limits(str op, int[] features, int cc_major=-1, int cc_minor=0, int smem_optin=-1, "
        "ScalarType? dtype=None) -> str");
  m.impl("cuda_limits", &skipdit::cuda_limits);
  // Testing aid: fill every kernel output with NaN before the kernel writes it.
  m.def("_set_poison_outputs(bool on) -> bool");
  m.impl("_set_poison_outputs", [](bool on) {
    bool prev = skipdit::poison_outputs_flag();
    skipdit::poison_outputs_flag() = on;
    return prev;
  });

  // Triton backend: the same contracts, implemented in skipdit_fast/kernels.
  m.def("skip_fuse_triton" SKIPDIT_SKIP_FUSE_ARGS " -> Tensor");
  m.def("skip_fuse_backward_triton" SKIPDIT_SKIP_FUSE_BWD_ARGS);
  m.def("attention_triton(Tensor q, Tensor k, Tensor v, float? scale=None) -> Tensor");
  m.def("attention_forward_triton" SKIPDIT_ATTENTION_FWD_ARGS);
  m.def("attention_backward_triton" SKIPDIT_ATTENTION_BWD_ARGS);
  m.def("cache_delta_triton(Tensor a, Tensor b) -> Tensor");
}

TORCH_LIBRARY_IMPL(skipdit, BackendSelect, m) {
  using namespace skipdit;
  m.impl("skip_fuse_backward", TORCH_FN(skip_fuse_backward_checked<kSkipFuseBwd>));
  m.impl("skip_fuse_backward_triton", TORCH_FN(skip_fuse_backward_checked<kSkipFuseBwdTriton>));
  m.impl("attention_backward", TORCH_FN(attention_backward_checked<kAttentionBwd>));
  m.impl("attention_backward_triton", TORCH_FN(attention_backward_checked<kAttentionBwdTriton>));
}
