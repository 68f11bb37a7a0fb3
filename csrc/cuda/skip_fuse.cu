// skip_fuse on CUDA: y = linear(layer_norm(cat([x, skip])), weight, bias), fused.
//
// Forward (bf16 / fp16, and fp32 with TF32 allowed):
//   1. skip_fuse_row_stats_kernel: one warp per row reads x and skip (16-byte vector loads) and
//      writes (mean, rstd) in fp32 with a corrected two-pass method (mean, then the
//      centered sums over the L1-resident row): stable for rows with a large offset.
//   2. skip_fuse_fwd_kernel: a GEMM y = h @ W^T (tile geometry in skip_fuse_tiles.h) whose
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
//   normalized in bounded chunks into a buffer (skip_fuse_normalize_rows_kernel) and
//   cuBLAS (fp32) does the GEMM.
//
// Backward: dh = dy @ W (cuBLAS through ATen); skip_fuse_ln_bwd_kernel recomputes nothing
// but reads dh, x, skip and the row statistics and writes grad_x and grad_skip directly,
// plus per-CTA partial sums of grad_norm_weight / grad_norm_bias (each column owned by
// one thread, no atomics) that skip_fuse_col_sums_kernel adds in a fixed order.
// grad_weight = dy^T @ h with h normalized in bounded row chunks; grad_bias = dy summed
// over rows.
//
// Limits: skip_fuse_cuda_limits below (D and D_out multiples of 8, D <= 8192; float16,
// bfloat16, float32; sm_80+ and the shared memory of skip_fuse_tiles.h), which the
// kernels check and the cuda_limits op reports. x and skip are read in place when their
// rows have one stride and start 16-byte aligned (a slice of a fused projection does);
// other views (several strided leading dims, odd offsets) are copied to a contiguous
// buffer first.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <type_traits>

#include "common.h"
#include "cuda/cuda_utils.cuh"
#include "cuda/skip_fuse_kernels.cuh"
#include "ops.h"

namespace skipdit {

// ---------------------------------------------------------------------------
// Limits

namespace {

std::string skip_fuse_dtype_reason(at::ScalarType dt) {
  if (dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat) return "";
  return "the CUDA kernel supports float16, bfloat16 and float32, got " + torch_dtype_name(dt);
}

std::string skip_fuse_shape_reason(int64_t D, int64_t D_out) {
  using namespace skip_fuse;
  if (D % kDMultiple != 0 || D > kMaxD) {
    return "D=" + std::to_string(D) + ": the CUDA kernel needs D to be a multiple of " +
           std::to_string(kDMultiple) + " and at most " + std::to_string(kMaxD);
  }
  if (D_out % kDMultiple != 0) {
    return "D_out=" + std::to_string(D_out) + ": the CUDA kernel needs D_out to be a multiple of " +
           std::to_string(kDMultiple);
  }
  return "";
}

// The device checks of cuda_utils, with the shared memory of the forward GEMM and of the
// LayerNorm backward for width D.
std::string skip_fuse_device_reason(int64_t D, const CudaDeviceInfo& dev) {
  const int64_t need = std::max<int64_t>(skip_fuse::kFwdSmemBytes, skip_fuse::ln_bwd_smem_bytes(D));
  return cuda::device_reason(dev, "the CUDA kernel", need);
}

}  // namespace

std::string skip_fuse_cuda_limits(c10::ArrayRef<int64_t> features,
                                  std::optional<at::ScalarType> dtype, const CudaDeviceInfo& dev) {
  TORCH_CHECK_VALUE(features.size() == 2,
                    "skipdit::cuda_limits: skip_fuse takes features [D, D_out], got ", features);
  std::string why = dtype.has_value() ? skip_fuse_dtype_reason(*dtype) : "";
  if (why.empty()) why = skip_fuse_shape_reason(features[0], features[1]);
  if (why.empty()) why = skip_fuse_device_reason(features[0], dev);
  return why;
}

namespace {

using namespace skip_fuse;

// The inputs of one call, checked against the kernels' limits.
void check_cuda_limits(const char* op, const at::Tensor& x, const SkipFuseShape& s) {
  const std::string dt = skip_fuse_dtype_reason(x.scalar_type());
  TORCH_CHECK_TYPE(dt.empty(), op, " (cuda): ", dt);
  std::string why = skip_fuse_shape_reason(s.D, s.D_out);
  if (why.empty()) why = skip_fuse_device_reason(s.D, cuda::device_info(x.get_device()));
  TORCH_CHECK_VALUE(why.empty(), op, " (cuda): ", why);
  TORCH_CHECK_VALUE(s.M <= kMaxRows, op, " (cuda): at most ", kMaxRows, " rows, got ", s.M);
}

// ---------------------------------------------------------------------------
// Host side

template <class E>
using S = typename Vec<E>::S;

template <class T>
const T* cptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}
template <class T>
T* mptr(at::Tensor& t) {
  return reinterpret_cast<T*>(t.mutable_data_ptr());
}

// x or skip as the kernels read it: M rows of D with one row stride ld, every row
// 16-byte aligned. In place when the row indexer (common.h) has at most one stride and
// the rows are aligned; else a contiguous copy.
struct KernelRows {
  at::Tensor t;
  int64_t ld;
};

KernelRows kernel_rows(const RowIndexer& ri, const at::Tensor& t, int64_t D) {
  const int64_t ld = ri.ndim == 1 ? ri.strides[0] : D;
  if (ri.ndim <= 1 && cuda::aligned16(t.const_data_ptr()) && (ld * t.element_size()) % 16 == 0) {
    return {t, ld};
  }
  return {t.clone(at::MemoryFormat::Contiguous), D};
}

// fp32, contiguous, 16-byte aligned copy of a norm parameter (no copy when it already is).
at::Tensor f32_param(const at::Tensor& p) {
  return cuda::with_aligned_rows(p.to(at::kFloat).contiguous());
}

// Rows per chunk of the bounded [rows, 2D] buffers (h for grad_weight / fp32 forward).
int64_t chunk_rows(int64_t M, int64_t K, int64_t elem_size) {
  return std::min<int64_t>(std::max<int64_t>(kHChunkBytes / (K * elem_size), 128), M);
}

// Shared inputs of forward and backward, in the layout the kernels read.
struct Prepared {
  KernelRows x, skip;
  at::Tensor gamma, beta;  // fp32
  at::Tensor stats;        // [M, 2] fp32: RowStats
  const RowStats* st() const { return cptr<RowStats>(stats); }
};

template <class E>
Prepared prepare(const at::Tensor& x, const RowIndexer& xi, const at::Tensor& skip,
                 const RowIndexer& si, const at::Tensor& nw, const at::Tensor& nb,
                 const SkipFuseShape& s, double eps, cudaStream_t stream) {
  Prepared p{kernel_rows(xi, x, s.D), kernel_rows(si, skip, s.D), f32_param(nw), f32_param(nb),
             at::empty({s.M, 2}, x.options().dtype(at::kFloat))};
  const int64_t blocks = (s.M + kStatsThreads / 32 - 1) / (kStatsThreads / 32);
  skip_fuse_row_stats_kernel<E><<<static_cast<unsigned>(blocks), kStatsThreads, 0, stream>>>(
      cptr<S<E>>(p.x.t), p.x.ld, cptr<S<E>>(p.skip.t), p.skip.ld, s.M, static_cast<int>(s.D),
      static_cast<float>(eps), mptr<RowStats>(p.stats));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return p;
}

template <class E>
void launch_normalize_rows(const Prepared& p, int64_t r0, int64_t rows, int D, at::Tensor& h,
                           int device, cudaStream_t stream) {
  constexpr int CE = Vec<E>::N;
  const int64_t total = rows * (2 * D / CE);
  const int64_t blocks = std::min<int64_t>((total + kEltThreads - 1) / kEltThreads,
                                           int64_t{16} * cuda::sm_count(device));
  skip_fuse_normalize_rows_kernel<E><<<static_cast<unsigned>(std::max<int64_t>(blocks, 1)),
                                       kEltThreads, 0, stream>>>(
      cptr<S<E>>(p.x.t), p.x.ld, cptr<S<E>>(p.skip.t), p.skip.ld, p.st(),
      p.gamma.const_data_ptr<float>(), p.beta.const_data_ptr<float>(), r0, rows, D, mptr<S<E>>(h));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class E>
void launch_fwd_gemm(const Prepared& p, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                     const SkipFuseShape& s, at::Tensor& y, int device, cudaStream_t stream) {
  const at::Tensor w2 = cuda::with_aligned_rows(w);
  at::Tensor b2;
  if (bias.has_value()) b2 = bias->contiguous();
  FwdArgs<E> a;
  a.x = cptr<S<E>>(p.x.t);
  a.skip = cptr<S<E>>(p.skip.t);
  a.w = cptr<S<E>>(w2);
  a.bias = bias.has_value() ? cptr<S<E>>(b2) : nullptr;
  a.gamma = p.gamma.const_data_ptr<float>();
  a.beta = p.beta.const_data_ptr<float>();
  a.stats = p.st();
  a.y = mptr<S<E>>(y);
  a.ldx = p.x.ld;
  a.lds = p.skip.ld;
  a.ldw = s.D_out > 1 ? w2.stride(0) : 2 * s.D;
  a.M = s.M;
  a.N = static_cast<int>(s.D_out);
  a.D = static_cast<int>(s.D);
  a.K = static_cast<int>(2 * s.D);
  auto kernel = skip_fuse_fwd_kernel<E, kFwdStages>;
  cuda::opt_in_smem(reinterpret_cast<const void*>(kernel), kFwdSmemBytes, device,
                    "skipdit::skip_fuse");
  const int64_t n_tiles = (s.D_out + kBN - 1) / kBN;
  const int64_t m_tiles = (s.M + kBM - 1) / kBM;
  const int64_t grid = n_tiles * m_tiles;
  TORCH_CHECK(grid < (int64_t{1} << 31), "skipdit::skip_fuse (cuda): too many tiles (", grid, ")");
  kernel<<<static_cast<unsigned>(grid), kThreads, kFwdSmemBytes, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class E>
void skip_fuse_fwd_typed(const at::Tensor& x, const RowIndexer& xi, const at::Tensor& skip,
                         const RowIndexer& si, const at::Tensor& nw, const at::Tensor& nb,
                         const at::Tensor& w, const std::optional<at::Tensor>& bias, double eps,
                         const SkipFuseShape& s, at::Tensor& y) {
  const int device = x.get_device();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  Prepared p = prepare<E>(x, xi, skip, si, nw, nb, s, eps, stream);
  if (!std::is_same_v<E, F32> || at::globalContext().allowTF32CuBLAS()) {
    launch_fwd_gemm<E>(p, w, bias, s, y, device, stream);
    return;
  }
  // fp32 without TF32: exact fp32 GEMM (cuBLAS) over normalized row chunks.
  const int64_t K = 2 * s.D;
  const int64_t chunk = chunk_rows(s.M, K, sizeof(float));
  at::Tensor h = at::empty({std::min(chunk, s.M), K}, x.options());
  at::Tensor wt = w.t();
  for (int64_t r0 = 0; r0 < s.M; r0 += chunk) {
    const int64_t rows = std::min(chunk, s.M - r0);
    launch_normalize_rows<E>(p, r0, rows, static_cast<int>(s.D), h, device, stream);
    linear_rows_out(y, r0, rows, h, wt, bias);
  }
}

// Calls f(tag) with the element-format tag of dtype (float16, bfloat16, float32).
template <class F>
void dispatch_format(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kBFloat16: f(BF16{}); break;
    case at::kHalf: f(F16{}); break;
    default: f(F32{}); break;
  }
}

at::Tensor skip_fuse_cuda(const at::Tensor& x, const at::Tensor& skip,
                          const at::Tensor& norm_weight, const at::Tensor& norm_bias,
                          const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          double eps) {
  const char* op = "skipdit::skip_fuse";
  const auto s = check_skip_fuse(op, x, skip, norm_weight, norm_bias, weight, bias, eps);
  check_cuda_limits(op, x, s);
  const RowIndexer xi = make_row_indexer(op, "x", x), si = make_row_indexer(op, "skip", skip);
  c10::cuda::CUDAGuard guard(x.device());
  auto y = new_output({s.M, s.D_out}, x.options());
  dispatch_format(x.scalar_type(), [&](auto e) {
    skip_fuse_fwd_typed<decltype(e)>(x, xi, skip, si, norm_weight, norm_bias, weight, bias, eps, s, y);
  });
  return y.view(skip_fuse_out_shape(x, s.D_out));
}

// ---------------------------------------------------------------------------
// Backward

template <class E>
void skip_fuse_bwd_typed(const at::Tensor& g, const at::Tensor& x, const RowIndexer& xi,
                         const at::Tensor& skip, const RowIndexer& si, const at::Tensor& nw,
                         const at::Tensor& nb, const at::Tensor& w, double eps,
                         const SkipFuseShape& s, SkipFuseGrads& grads) {
  at::Tensor &dx = grads.x, &dskip = grads.skip, &dnw = grads.norm_weight, &dnb = grads.norm_bias,
             &dw = grads.weight, &db = grads.bias;
  const int device = x.get_device();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const int64_t K = 2 * s.D;
  Prepared p = prepare<E>(x, xi, skip, si, nw, nb, s, eps, stream);
  at::Tensor dy = g.reshape({s.M, s.D_out});

  if (db.numel() > 0) db.copy_(dy.sum({0}, /*keepdim=*/false, at::kFloat));

  // Gradient of h (the rounded, normalized operand); same dtype as the activations.
  at::Tensor dh = at::mm(dy, w).contiguous();
  TORCH_INTERNAL_ASSERT(cuda::aligned16(dh.const_data_ptr()));

  // LayerNorm backward into grad_x / grad_skip, partial affine gradients per CTA.
  const int grid = static_cast<int>(std::min<int64_t>(s.M, int64_t{4} * cuda::sm_count(device)));
  const int smem = static_cast<int>(ln_bwd_smem_bytes(s.D));
  auto kernel = skip_fuse_ln_bwd_kernel<E>;
  cuda::opt_in_smem(reinterpret_cast<const void*>(kernel), smem, device, "skipdit::skip_fuse_backward");
  at::Tensor partial = at::empty({grid, 2 * K}, x.options().dtype(at::kFloat));
  kernel<<<grid, kLnThreads, smem, stream>>>(
      cptr<S<E>>(dh), cptr<S<E>>(p.x.t), p.x.ld, cptr<S<E>>(p.skip.t), p.skip.ld, p.st(),
      p.gamma.const_data_ptr<float>(), s.M, static_cast<int>(s.D), mptr<S<E>>(dx),
      mptr<S<E>>(dskip), partial.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const unsigned rblocks = static_cast<unsigned>((2 * K + kEltThreads - 1) / kEltThreads);
  auto col_sums = [&](auto o) {
    using O = decltype(o);
    skip_fuse_col_sums_kernel<O><<<rblocks, kEltThreads, 0, stream>>>(
        partial.const_data_ptr<float>(), grid, static_cast<int>(K), mptr<S<O>>(dnw), mptr<S<O>>(dnb));
  };
  if (dnw.scalar_type() == at::kFloat) {
    col_sums(F32{});
  } else {
    col_sums(E{});
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // grad_weight = dy^T @ h over bounded row chunks of h.
  const int64_t chunk = chunk_rows(s.M, K, sizeof(S<E>));
  at::Tensor h = at::empty({std::min(chunk, s.M), K}, x.options());
  if (chunk >= s.M) {
    launch_normalize_rows<E>(p, 0, s.M, static_cast<int>(s.D), h, device, stream);
    at::mm_out(dw, dy.t(), h);
    return;
  }
  at::Tensor dw_acc = at::zeros({s.D_out, K}, x.options().dtype(at::kFloat));
  for (int64_t r0 = 0; r0 < s.M; r0 += chunk) {
    const int64_t rows = std::min(chunk, s.M - r0);
    launch_normalize_rows<E>(p, r0, rows, static_cast<int>(s.D), h, device, stream);
    at::Tensor dyc = dy.narrow(0, r0, rows).t();
    at::Tensor hv = h.narrow(0, 0, rows);
    if constexpr (std::is_same_v<E, F32>) {
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
  check_cuda_limits(op, x, s);
  const RowIndexer xi = make_row_indexer(op, "x", x), si = make_row_indexer(op, "skip", skip);
  c10::cuda::CUDAGuard guard(x.device());
  SkipFuseGrads d(x, norm_weight, norm_bias, weight, bias);
  dispatch_format(x.scalar_type(), [&](auto e) {
    skip_fuse_bwd_typed<decltype(e)>(grad_out, x, xi, skip, si, norm_weight, norm_bias, weight,
                                     eps, s, d);
  });
  return d.tuple();
}

}  // namespace
}  // namespace skipdit

TORCH_LIBRARY_IMPL(skipdit, CUDA, m) {
  m.impl("skip_fuse", &skipdit::skip_fuse_cuda);
  m.impl("skip_fuse_backward", &skipdit::skip_fuse_backward_cuda);
}
