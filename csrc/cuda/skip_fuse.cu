// skip_fuse on CUDA: y = linear(layer_norm(cat([x, skip])), weight, bias), fused.
//
// Forward (bf16 / fp16, and fp32 with TF32 allowed):
//   1. row_stats_kernel: one warp per row reads x and skip (16-byte vector loads) and
//      writes (mean, rstd) in fp32 with a corrected two-pass method (mean, then the
//      centered sums over the L1-resident row): stable for rows with a large offset.
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
#include "skip_fuse_kernels.cuh"

namespace skipdit {
namespace {

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
  // Ask for the largest shared-memory carveout, so that the occupancy the kernel was
  // sized for (two forward CTAs per SM on sm_90) is not capped by the L1 split.
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                      cudaSharedmemCarveoutMaxShared));
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
    linear_rows_out(y, r0, rows, h, wt, bias);
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
  const auto s = check_skip_fuse_backward(op, grad_out, x, skip, norm_weight, norm_bias, weight,
                                          bias, eps);
  check_cuda_shapes(op, x, s);
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
