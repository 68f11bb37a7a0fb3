// skip_fuse on the CPU: y = linear(layer_norm(cat([x, skip])), weight, bias).
//
// Rows are processed in chunks: a parallel pass normalizes a chunk of rows straight
// from x and skip into a chunk-sized buffer (stable shifted two-pass statistics, see
// normalize_row), rounds it to the operand dtype, and one GEMM per chunk
// (ATen's BLAS) writes the output rows. The (M, 2D) concatenation or normalized tensor
// never exists; the buffer is at most kCpuFwdChunkBytes (kCpuBwdChunkBytes per buffer in
// the backward, whose weight-gradient GEMM needs tall chunks to run at BLAS speed;
// cpu/skip_fuse.h, exported in build_info).
//
// The backward saves nothing but the inputs. Per chunk: dh = dy W (ATen GEMM), then one
// pass per row that recomputes the statistics and the normalized row (kept for the
// weight gradient) and runs the LayerNorm backward straight into grad_x and grad_skip
// while the row is in L1, then dW += dy^T h.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "common.h"
#include "cpu/skip_fuse.h"
#include "ops.h"

namespace skipdit {
namespace {

using skip_fuse::kCpuBwdChunkBytes;
using skip_fuse::kCpuFwdChunkBytes;

// Rows per chunk: at most `bytes` of buffer, and the M rows split into equal chunks
// (a multiple of 16 rows each) so that no GEMM runs on a short tail: 1024 rows in
// chunks of 910 would give a second, 114-row GEMM at a fraction of BLAS speed.
int64_t chunk_rows(int64_t bytes, int64_t M, int64_t width, int64_t elem_size) {
  M = std::max<int64_t>(M, 1);
  const int64_t cap = std::max<int64_t>(16, bytes / std::max<int64_t>(1, width * elem_size));
  if (M <= cap) return M;
  const int64_t n = (M + cap - 1) / cap;
  const int64_t even = ((M + n - 1) / n + 15) / 16 * 16;
  return std::min(even, cap);
}

// Row loops: SKIPDIT_VECTOR_CLONES and kLanes accumulators, see common.h.

// Normalizes one row z = cat(xr, sr) of width 2D. Statistics are two-pass and shifted:
// every value is taken relative to the row's first value (exact for nearby values,
// so rows with a large offset lose nothing), the mean of the shifted values comes from
// a lane sum, the variance from the centered values. Writes h = round(xhat * gamma +
// beta) (h_t = the operand dtype, or acc_t holding the rounded value) and, when given,
// the row's statistics {shift, mean - shift, rstd} from which xhat is recomputed.
template <typename scalar_t, typename acc_t, typename norm_t, typename h_t>
SKIPDIT_VECTOR_CLONES void normalize_row(const scalar_t* xr, const scalar_t* sr, int64_t D,
                                         double eps, const norm_t* gamma, const norm_t* beta,
                                         h_t* h, acc_t* stats) {
  const int64_t W = 2 * D;
  const scalar_t* half[2] = {xr, sr};
  const acc_t shift = static_cast<acc_t>(xr[0]);
  acc_t lane[kLanes] = {};
  acc_t rest = 0;
  for (int p = 0; p < 2; ++p) {
    const scalar_t* v = half[p];
    int64_t j = 0;
    for (; j + kLanes <= D; j += kLanes)
      for (int k = 0; k < kLanes; ++k) lane[k] += static_cast<acc_t>(v[j + k]) - shift;
    for (; j < D; ++j) rest += static_cast<acc_t>(v[j]) - shift;
  }
  double sum = rest;
  for (int k = 0; k < kLanes; ++k) sum += lane[k];
  const acc_t dmu = static_cast<acc_t>(sum / static_cast<double>(W));  // mean - shift
  acc_t sq[kLanes] = {};
  acc_t sq_rest = 0;
  for (int p = 0; p < 2; ++p) {
    const scalar_t* v = half[p];
    int64_t j = 0;
    for (; j + kLanes <= D; j += kLanes)
      for (int k = 0; k < kLanes; ++k) {
        const acc_t d = (static_cast<acc_t>(v[j + k]) - shift) - dmu;
        sq[k] += d * d;
      }
    for (; j < D; ++j) {
      const acc_t d = (static_cast<acc_t>(v[j]) - shift) - dmu;
      sq_rest += d * d;
    }
  }
  double var = sq_rest;
  for (int k = 0; k < kLanes; ++k) var += sq[k];
  const acc_t rstd = static_cast<acc_t>(1.0 / std::sqrt(var / static_cast<double>(W) + eps));
  for (int p = 0; p < 2; ++p) {
    const scalar_t* v = half[p];
    const norm_t* g = gamma + p * D;
    const norm_t* b = beta + p * D;
    h_t* hp = h + p * D;
    for (int64_t j = 0; j < D; ++j) {
      const acc_t n = ((static_cast<acc_t>(v[j]) - shift) - dmu) * rstd;
      hp[j] = static_cast<h_t>(static_cast<scalar_t>(n * static_cast<acc_t>(g[j]) + static_cast<acc_t>(b[j])));
    }
  }
  if (stats) {
    stats[0] = shift;
    stats[1] = dmu;
    stats[2] = rstd;
  }
}

// Normalizes rows [r0, r0 + rows) into h ([rows, 2D]).
template <typename scalar_t, typename acc_t, typename norm_t, typename h_t>
void normalize_chunk(const scalar_t* x, const RowIndexer& xi, const scalar_t* skip,
                     const RowIndexer& si, int64_t r0, int64_t rows, int64_t D,
                     const norm_t* gamma, const norm_t* beta, double eps, h_t* h) {
  const int64_t W = 2 * D;
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / W), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      normalize_row<scalar_t, acc_t, norm_t, h_t>(x + xi.offset(r0 + i), skip + si.offset(r0 + i), D,
                                                  eps, gamma, beta, h + i * W, nullptr);
    }
  });
}

// LayerNorm backward of one row, split into the x and skip halves on the way out:
// dz = rstd * (dh*g - mean(dh*g) - xhat * mean(dh*g*xhat)), xhat recomputed from the
// inputs and the row statistics; also accumulates the row's share of grad_gamma
// (dh * xhat) and grad_beta (dh).
template <typename scalar_t, typename acc_t>
SKIPDIT_VECTOR_CLONES void ln_backward_row(const acc_t* dh, const scalar_t* xr, const scalar_t* sr,
                                           const acc_t* stats, const acc_t* gamma, int64_t D,
                                           scalar_t* dx, scalar_t* dskip, acc_t* dgamma,
                                           acc_t* dbeta) {
  const acc_t shift = stats[0], dmu = stats[1], rstd = stats[2];
  const scalar_t* half[2] = {xr, sr};
  scalar_t* out[2] = {dx, dskip};
  acc_t l1[kLanes] = {}, l2[kLanes] = {};
  acc_t r1 = 0, r2 = 0;
  for (int p = 0; p < 2; ++p) {
    const scalar_t* v = half[p];
    const acc_t* d = dh + p * D;
    const acc_t* g = gamma + p * D;
    acc_t* dg = dgamma + p * D;
    acc_t* db = dbeta + p * D;
    int64_t j = 0;
    for (; j + kLanes <= D; j += kLanes)
      for (int k = 0; k < kLanes; ++k) {
        const acc_t xh = ((static_cast<acc_t>(v[j + k]) - shift) - dmu) * rstd;
        const acc_t dg_ = d[j + k] * g[j + k];
        l1[k] += dg_;
        l2[k] += dg_ * xh;
        dg[j + k] += d[j + k] * xh;
        db[j + k] += d[j + k];
      }
    for (; j < D; ++j) {
      const acc_t xh = ((static_cast<acc_t>(v[j]) - shift) - dmu) * rstd;
      const acc_t dg_ = d[j] * g[j];
      r1 += dg_;
      r2 += dg_ * xh;
      dg[j] += d[j] * xh;
      db[j] += d[j];
    }
  }
  double s1 = r1, s2 = r2;
  for (int k = 0; k < kLanes; ++k) {
    s1 += l1[k];
    s2 += l2[k];
  }
  const acc_t c1 = static_cast<acc_t>(s1 / static_cast<double>(2 * D));
  const acc_t c2 = static_cast<acc_t>(s2 / static_cast<double>(2 * D));
  for (int p = 0; p < 2; ++p) {
    const scalar_t* v = half[p];
    const acc_t* d = dh + p * D;
    const acc_t* g = gamma + p * D;
    scalar_t* o = out[p];
    for (int64_t j = 0; j < D; ++j) {
      const acc_t xh = ((static_cast<acc_t>(v[j]) - shift) - dmu) * rstd;
      o[j] = static_cast<scalar_t>(rstd * (d[j] * g[j] - c1 - xh * c2));
    }
  }
}

template <typename scalar_t, typename norm_t>
void skip_fuse_fwd_impl(const at::Tensor& x, const at::Tensor& skip, const at::Tensor& nw,
                        const at::Tensor& nb, const at::Tensor& w,
                        const std::optional<at::Tensor>& bias, double eps, const SkipFuseShape& s,
                        const RowIndexer& xi, const RowIndexer& si, at::Tensor& y) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t W = 2 * s.D;
  const int64_t chunk = chunk_rows(kCpuFwdChunkBytes, s.M, W, sizeof(scalar_t));
  auto nwc = nw.contiguous(), nbc = nb.contiguous();
  auto h = at::empty({std::min(chunk, s.M), W}, x.options());
  auto wt = w.t();
  for (int64_t r0 = 0; r0 < s.M; r0 += chunk) {
    const int64_t rows = std::min(chunk, s.M - r0);
    normalize_chunk<scalar_t, acc_t, norm_t, scalar_t>(
        x.const_data_ptr<scalar_t>(), xi, skip.const_data_ptr<scalar_t>(), si, r0, rows, s.D,
        nwc.const_data_ptr<norm_t>(), nbc.const_data_ptr<norm_t>(), eps,
        h.mutable_data_ptr<scalar_t>());
    linear_rows_out(y, r0, rows, h, wt, bias);
  }
}

at::Tensor skip_fuse_cpu(const at::Tensor& x, const at::Tensor& skip,
                         const at::Tensor& norm_weight, const at::Tensor& norm_bias,
                         const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         double eps) {
  const char* op = "skipdit::skip_fuse";
  const auto s = check_skip_fuse(op, x, skip, norm_weight, norm_bias, weight, bias, eps);
  const RowIndexer xi = make_row_indexer(op, "x", x), si = make_row_indexer(op, "skip", skip);
  auto y = new_output({s.M, s.D_out}, x.options());
  const bool norm_f32 = norm_weight.scalar_type() == at::kFloat;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "skip_fuse_cpu", [&] {
    if (norm_f32 && !std::is_same_v<scalar_t, float>) {
      skip_fuse_fwd_impl<scalar_t, float>(x, skip, norm_weight, norm_bias, weight, bias, eps, s,
                                          xi, si, y);
    } else {
      skip_fuse_fwd_impl<scalar_t, scalar_t>(x, skip, norm_weight, norm_bias, weight, bias, eps, s,
                                             xi, si, y);
    }
  });
  return y.view(skip_fuse_out_shape(x, s.D_out));
}

template <typename scalar_t, typename norm_t>
void skip_fuse_bwd_impl(const at::Tensor& g, const at::Tensor& x, const at::Tensor& skip,
                        const at::Tensor& nw, const at::Tensor& nb, const at::Tensor& w,
                        double eps, const SkipFuseShape& s, const RowIndexer& xi,
                        const RowIndexer& si, SkipFuseGrads& grads) {
  at::Tensor &dx = grads.x, &dskip = grads.skip, &dnw = grads.norm_weight, &dnb = grads.norm_bias,
             &dw = grads.weight, &db = grads.bias;
  using acc_t = at::opmath_type<scalar_t>;
  const at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t D = s.D, W = 2 * D;
  const int64_t chunk = chunk_rows(kCpuBwdChunkBytes, s.M, W, sizeof(acc_t));
  auto nwc = nw.contiguous(), nbc = nb.contiguous();
  at::Tensor gamma_acc = nwc.to(acc);
  at::Tensor w_acc = w.to(acc);
  auto g2 = g.reshape({s.M, s.D_out});
  const int64_t cmax = std::min(chunk, s.M);
  at::Tensor h = at::empty({cmax, W}, x.options().dtype(acc));  // rounded to scalar_t
  // weight / bias gradients accumulate straight into the outputs when those are in the
  // accumulation dtype (fp32, fp64), else into an fp32 buffer.
  const bool direct = w.scalar_type() == acc;
  at::Tensor dw_acc = direct ? dw : at::empty({s.D_out, W}, x.options().dtype(acc));
  at::Tensor db_acc = direct && db.numel() > 0 ? db : at::empty({s.D_out}, x.options().dtype(acc));
  // per-thread partial sums of grad_gamma / grad_beta: [threads, 2, W]
  const int64_t nthreads = at::get_num_threads();
  at::Tensor dgb = at::zeros({nthreads, 2, W}, x.options().dtype(acc));
  scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
  scalar_t* dsp = dskip.mutable_data_ptr<scalar_t>();
  const acc_t* gam = gamma_acc.const_data_ptr<acc_t>();
  acc_t* dgbp = dgb.mutable_data_ptr<acc_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* sp = skip.const_data_ptr<scalar_t>();
  const norm_t* nwp = nwc.const_data_ptr<norm_t>();
  const norm_t* nbp = nbc.const_data_ptr<norm_t>();
  acc_t* hp = h.mutable_data_ptr<acc_t>();
  for (int64_t r0 = 0; r0 < s.M; r0 += chunk) {
    const int64_t rows = std::min(chunk, s.M - r0);
    at::Tensor dy = g2.narrow(0, r0, rows).to(acc);
    at::Tensor dh = dy.mm(w_acc).contiguous();  // [rows, 2D]
    const acc_t* dhp = dh.const_data_ptr<acc_t>();
    // One pass per row while it is in L1: statistics, the normalized row h (for the
    // weight gradient below), and the LayerNorm backward into grad_x / grad_skip.
    at::parallel_for(0, rows, std::max<int64_t>(1, 8192 / W), [&](int64_t b, int64_t e) {
      acc_t* mine = dgbp + at::get_thread_num() * 2 * W;
      acc_t st[3];
      for (int64_t i = b; i < e; ++i) {
        const scalar_t* xr = xp + xi.offset(r0 + i);
        const scalar_t* sr = sp + si.offset(r0 + i);
        normalize_row<scalar_t, acc_t, norm_t, acc_t>(xr, sr, D, eps, nwp, nbp, hp + i * W, st);
        ln_backward_row<scalar_t, acc_t>(dhp + i * W, xr, sr, st, gam, D, dxp + (r0 + i) * D,
                                         dsp + (r0 + i) * D, mine, mine + W);
      }
    });
    auto hv = h.narrow(0, 0, rows);
    if (r0 == 0) {
      at::mm_out(dw_acc, dy.t(), hv);
      at::sum_out(db_acc, dy, 0);
    } else {
      dw_acc.addmm_(dy.t(), hv);
      db_acc.add_(dy.sum(0));
    }
  }
  at::Tensor dg_acc = dgb.select(1, 0).sum(0);
  at::Tensor dbn_acc = dgb.select(1, 1).sum(0);
  dnw.copy_(dg_acc);
  dnb.copy_(dbn_acc);
  if (!direct) dw.copy_(dw_acc);
  if (db.numel() > 0 && !db.is_same(db_acc)) db.copy_(db_acc);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
skip_fuse_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& skip,
                       const at::Tensor& norm_weight, const at::Tensor& norm_bias,
                       const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       double eps) {
  const char* op = "skipdit::skip_fuse_backward";
  const auto s = check_skip_fuse_backward(op, grad_out, x, skip, norm_weight, norm_bias, weight,
                                          bias, eps);
  const RowIndexer xi = make_row_indexer(op, "x", x), si = make_row_indexer(op, "skip", skip);
  SkipFuseGrads d(x, norm_weight, norm_bias, weight, bias);
  const bool norm_f32 = norm_weight.scalar_type() == at::kFloat;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "skip_fuse_bwd_cpu", [&] {
    if (norm_f32 && !std::is_same_v<scalar_t, float>) {
      skip_fuse_bwd_impl<scalar_t, float>(grad_out, x, skip, norm_weight, norm_bias, weight, eps,
                                          s, xi, si, d);
    } else {
      skip_fuse_bwd_impl<scalar_t, scalar_t>(grad_out, x, skip, norm_weight, norm_bias, weight,
                                             eps, s, xi, si, d);
    }
  });
  return d.tuple();
}

}  // namespace
}  // namespace skipdit

TORCH_LIBRARY_IMPL(skipdit, CPU, m) {
  m.impl("skip_fuse", &skipdit::skip_fuse_cpu);
  m.impl("skip_fuse_backward", &skipdit::skip_fuse_backward_cpu);
}
