// skip_fuse on the CPU: y = linear(layer_norm(cat([x, skip])), weight, bias).
//
// Rows are processed in chunks: a parallel pass normalizes a chunk of rows straight
// from x and skip into a chunk-sized buffer (stable two-pass statistics, accumulated
// in double for 32-bit inputs), rounds it to the operand dtype, and one GEMM per chunk
// (ATen's BLAS) writes the output rows. The (M, 2D) concatenation or normalized tensor
// never exists; the buffer is at most kFwdChunkBytes (kBwdChunkBytes per buffer in the
// backward, whose weight-gradient GEMM needs tall chunks to run at BLAS speed).
//
// The backward recomputes the statistics per chunk, so nothing but the inputs is
// saved, and writes the LayerNorm input gradient directly into grad_x and grad_skip.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "common.h"
#include "ops.h"

namespace skipdit {
namespace {

constexpr int64_t kFwdChunkBytes = 8 << 20;
constexpr int64_t kBwdChunkBytes = 24 << 20;

int64_t chunk_rows(int64_t bytes, int64_t M, int64_t width, int64_t elem_size) {
  int64_t r = bytes / std::max<int64_t>(1, width * elem_size);
  return std::clamp<int64_t>(r, 16, std::max<int64_t>(M, 1));
}

// Statistics of one row z = cat(xr, sr) of width 2D: mean and 1/sqrt(var + eps),
// two passes (mean first, then the centered sum of squares).
template <typename scalar_t>
inline void row_stats(const scalar_t* xr, const scalar_t* sr, int64_t D, double eps, double& mean,
                      double& rstd) {
  double s = 0;
  for (int64_t j = 0; j < D; ++j) s += static_cast<double>(xr[j]);
  for (int64_t j = 0; j < D; ++j) s += static_cast<double>(sr[j]);
  const double mu = s / static_cast<double>(2 * D);
  double q = 0;
  for (int64_t j = 0; j < D; ++j) {
    const double d = static_cast<double>(xr[j]) - mu;
    q += d * d;
  }
  for (int64_t j = 0; j < D; ++j) {
    const double d = static_cast<double>(sr[j]) - mu;
    q += d * d;
  }
  mean = mu;
  rstd = 1.0 / std::sqrt(q / static_cast<double>(2 * D) + eps);
}

// Normalizes rows [r0, r0 + rows) into xhat (acc dtype, optional) and h (operand dtype,
// h = round(xhat * gamma + beta)), both laid out [rows, 2D].
template <typename scalar_t, typename acc_t, typename norm_t>
void normalize_chunk(const scalar_t* x, const RowIndexer& xi, const scalar_t* skip,
                     const RowIndexer& si, int64_t r0, int64_t rows, int64_t D,
                     const norm_t* gamma, const norm_t* beta, double eps, acc_t* xhat,
                     scalar_t* h, acc_t* rstd_out) {
  const int64_t W = 2 * D;
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / W), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const scalar_t* xr = x + xi.offset(r0 + i);
      const scalar_t* sr = skip + si.offset(r0 + i);
      double mu, rs;
      row_stats(xr, sr, D, eps, mu, rs);
      const acc_t amu = static_cast<acc_t>(mu), ars = static_cast<acc_t>(rs);
      for (int64_t half = 0; half < 2; ++half) {
        const scalar_t* src = half == 0 ? xr : sr;
        const int64_t o = half * D;
        for (int64_t j = 0; j < D; ++j) {
          const acc_t v = (static_cast<acc_t>(src[j]) - amu) * ars;
          if (xhat) xhat[i * W + o + j] = v;
          h[i * W + o + j] = static_cast<scalar_t>(
              v * static_cast<acc_t>(gamma[o + j]) + static_cast<acc_t>(beta[o + j]));
        }
      }
      if (rstd_out) rstd_out[i] = ars;
    }
  });
}

template <typename scalar_t, typename norm_t>
void skip_fuse_fwd_impl(const at::Tensor& x, const at::Tensor& skip, const at::Tensor& nw,
                        const at::Tensor& nb, const at::Tensor& w,
                        const std::optional<at::Tensor>& bias, double eps, const SkipFuseShape& s,
                        at::Tensor& y) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t W = 2 * s.D;
  const int64_t chunk = chunk_rows(kFwdChunkBytes, s.M, W, sizeof(scalar_t));
  RowIndexer xi(x), si(skip);
  auto nwc = nw.contiguous(), nbc = nb.contiguous();
  auto h = at::empty({std::min(chunk, s.M), W}, x.options());
  auto wt = w.t();
  for (int64_t r0 = 0; r0 < s.M; r0 += chunk) {
    const int64_t rows = std::min(chunk, s.M - r0);
    normalize_chunk<scalar_t, acc_t, norm_t>(
        x.const_data_ptr<scalar_t>(), xi, skip.const_data_ptr<scalar_t>(), si, r0, rows, s.D,
        nwc.const_data_ptr<norm_t>(), nbc.const_data_ptr<norm_t>(), eps, nullptr,
        h.mutable_data_ptr<scalar_t>(), nullptr);
    auto hv = h.narrow(0, 0, rows);
    auto yv = y.narrow(0, r0, rows);
    if (bias.has_value()) {
      at::addmm_out(yv, *bias, hv, wt);
    } else {
      at::mm_out(yv, hv, wt);
    }
  }
}

at::Tensor skip_fuse_cpu(const at::Tensor& x, const at::Tensor& skip,
                         const at::Tensor& norm_weight, const at::Tensor& norm_bias,
                         const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         double eps) {
  const auto s = check_skip_fuse("skipdit::skip_fuse", x, skip, norm_weight, norm_bias, weight,
                                 bias, eps);
  auto y = new_output({s.M, s.D_out}, x.options());
  const bool norm_f32 = norm_weight.scalar_type() == at::kFloat;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "skip_fuse_cpu", [&] {
    if (norm_f32 && !std::is_same_v<scalar_t, float>) {
      skip_fuse_fwd_impl<scalar_t, float>(x, skip, norm_weight, norm_bias, weight, bias, eps, s, y);
    } else {
      skip_fuse_fwd_impl<scalar_t, scalar_t>(x, skip, norm_weight, norm_bias, weight, bias, eps, s,
                                             y);
    }
  });
  return y.view(skip_fuse_out_shape(x, s.D_out));
}

template <typename scalar_t, typename norm_t>
void skip_fuse_bwd_impl(const at::Tensor& g, const at::Tensor& x, const at::Tensor& skip,
                        const at::Tensor& nw, const at::Tensor& nb, const at::Tensor& w,
                        double eps, const SkipFuseShape& s, at::Tensor& dx, at::Tensor& dskip,
                        at::Tensor& dnw, at::Tensor& dnb, at::Tensor& dw, at::Tensor& db) {
  using acc_t = at::opmath_type<scalar_t>;
  const at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t D = s.D, W = 2 * D;
  const int64_t chunk = chunk_rows(kBwdChunkBytes, s.M, W, sizeof(acc_t));
  RowIndexer xi(x), si(skip);
  auto nwc = nw.contiguous(), nbc = nb.contiguous();
  at::Tensor gamma_acc = nwc.to(acc);
  at::Tensor w_acc = w.to(acc);
  auto g2 = g.reshape({s.M, s.D_out});
  const int64_t cmax = std::min(chunk, s.M);
  at::Tensor xhat = at::empty({cmax, W}, x.options().dtype(acc));
  at::Tensor h = at::empty({cmax, W}, x.options());
  at::Tensor rstd = at::empty({cmax}, x.options().dtype(acc));
  at::Tensor dw_acc = at::zeros({s.D_out, W}, x.options().dtype(acc));
  at::Tensor db_acc = at::zeros({s.D_out}, x.options().dtype(acc));
  at::Tensor dg_acc = at::zeros({W}, x.options().dtype(acc));
  at::Tensor dbn_acc = at::zeros({W}, x.options().dtype(acc));
  scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
  scalar_t* dsp = dskip.mutable_data_ptr<scalar_t>();
  const acc_t* gam = gamma_acc.const_data_ptr<acc_t>();
  for (int64_t r0 = 0; r0 < s.M; r0 += chunk) {
    const int64_t rows = std::min(chunk, s.M - r0);
    normalize_chunk<scalar_t, acc_t, norm_t>(
        x.const_data_ptr<scalar_t>(), xi, skip.const_data_ptr<scalar_t>(), si, r0, rows, D,
        nwc.const_data_ptr<norm_t>(), nbc.const_data_ptr<norm_t>(), eps,
        xhat.mutable_data_ptr<acc_t>(), h.mutable_data_ptr<scalar_t>(),
        rstd.mutable_data_ptr<acc_t>());
    at::Tensor xh = xhat.narrow(0, 0, rows);
    at::Tensor dy = g2.narrow(0, r0, rows).to(acc);
    dw_acc.addmm_(dy.t(), h.narrow(0, 0, rows).to(acc));
    db_acc.add_(dy.sum(0));
    at::Tensor dh = dy.mm(w_acc).contiguous();  // [rows, 2D]
    dg_acc.add_((dh * xh).sum(0));
    dbn_acc.add_(dh.sum(0));
    const acc_t* dhp = dh.const_data_ptr<acc_t>();
    const acc_t* xhp = xh.const_data_ptr<acc_t>();
    const acc_t* rsp = rstd.const_data_ptr<acc_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 8192 / W), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const acc_t* dhr = dhp + i * W;
        const acc_t* xhr = xhp + i * W;
        acc_t c1 = 0, c2 = 0;
        for (int64_t j = 0; j < W; ++j) {
          const acc_t d = dhr[j] * gam[j];
          c1 += d;
          c2 += d * xhr[j];
        }
        c1 /= static_cast<acc_t>(W);
        c2 /= static_cast<acc_t>(W);
        const acc_t r = rsp[i];
        scalar_t* out_x = dxp + (r0 + i) * D;
        scalar_t* out_s = dsp + (r0 + i) * D;
        for (int64_t j = 0; j < D; ++j)
          out_x[j] = static_cast<scalar_t>(r * (dhr[j] * gam[j] - c1 - xhr[j] * c2));
        for (int64_t j = 0; j < D; ++j)
          out_s[j] = static_cast<scalar_t>(r * (dhr[D + j] * gam[D + j] - c1 - xhr[D + j] * c2));
      }
    });
  }
  dnw.copy_(dg_acc);
  dnb.copy_(dbn_acc);
  dw.copy_(dw_acc);
  if (db.numel() > 0) db.copy_(db_acc);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
skip_fuse_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& skip,
                       const at::Tensor& norm_weight, const at::Tensor& norm_bias,
                       const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       double eps) {
  const char* op = "skipdit::skip_fuse_backward";
  const auto s = check_skip_fuse(op, x, skip, norm_weight, norm_bias, weight, bias, eps);
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(skip_fuse_out_shape(x, s.D_out)), op,
                    ": grad_out must have shape ", at::IntArrayRef(skip_fuse_out_shape(x, s.D_out)),
                    ", got ", grad_out.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type(), op, ": grad_out dtype ",
                   grad_out.scalar_type(), " differs from x dtype ", x.scalar_type());
  check_same_device(op, x, "grad_out", grad_out);
  auto dx = new_output(x.sizes(), x.options());
  auto dskip = new_output(x.sizes(), x.options());
  auto dnw = new_output(norm_weight.sizes(), norm_weight.options());
  auto dnb = new_output(norm_bias.sizes(), norm_bias.options());
  auto dw = new_output(weight.sizes(), weight.options());
  auto db = bias.has_value() ? new_output(bias->sizes(), bias->options())
                             : at::empty({0}, weight.options());
  const bool norm_f32 = norm_weight.scalar_type() == at::kFloat;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "skip_fuse_bwd_cpu", [&] {
    if (norm_f32 && !std::is_same_v<scalar_t, float>) {
      skip_fuse_bwd_impl<scalar_t, float>(grad_out, x, skip, norm_weight, norm_bias, weight, eps,
                                          s, dx, dskip, dnw, dnb, dw, db);
    } else {
      skip_fuse_bwd_impl<scalar_t, scalar_t>(grad_out, x, skip, norm_weight, norm_bias, weight,
                                             eps, s, dx, dskip, dnw, dnb, dw, db);
    }
  });
  return {dx, dskip, dnw, dnb, dw, db};
}

}  // namespace
}  // namespace skipdit

TORCH_LIBRARY_IMPL(skipdit, CPU, m) {
  m.impl("skip_fuse", &skipdit::skip_fuse_cpu);
  m.impl("skip_fuse_backward", &skipdit::skip_fuse_backward_cpu);
}
