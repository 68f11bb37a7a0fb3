// attention on the CPU: ATen's flash-attention CPU kernel (blocked, online softmax,
// already vectorized and threaded), called on BHSD views of the BSHD inputs so that
// strided q/k/v views of a fused qkv tensor are read in place. Its output is laid out
// BSHD in memory, which is the layout this op returns.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

#include "common.h"
#include "ops.h"

namespace skipdit {
namespace {

// Rows with non-finite scores. ATen's kernel treats a query row whose scores are all
// -inf or NaN (a NaN in the q row, -inf scores from infinite inputs) as fully masked and
// returns out = 0, lse = 0 for it (measured), where the reference's softmax gives NaN;
// and for rows with a +inf score it returns lse = NaN where the reference's logsumexp
// gives +inf. Candidates are the rows with lse == 0 or a non-finite lse (finite inputs
// almost never give lse == 0 exactly); a candidate whose scores (the reference's: q's
// dtype, then the accumulation dtype, times scale) are not all finite gets the
// reference's out row and lse.
void restore_nonfinite_rows(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            double scale, at::Tensor& out, at::Tensor& lse) {
  const at::Tensor rows = (lse.eq(0) | lse.isfinite().logical_not()).nonzero();  // (b, h, i)
  if (rows.size(0) == 0) return;
  const auto acc = acc_type(q.scalar_type());
  auto idx = rows.accessor<int64_t, 2>();
  for (int64_t n = 0; n < rows.size(0); ++n) {
    const int64_t b = idx[n][0], h = idx[n][1], i = idx[n][2];
    at::Tensor kh = k.select(0, b).select(1, h), vh = v.select(0, b).select(1, h);  // [Nk, Dh]
    at::Tensor scores = at::matmul(kh, q.select(0, b).select(0, i).select(0, h)).to(acc) * scale;
    if (scores.isfinite().all().item<bool>()) continue;
    lse.select(0, b).select(0, h).select(0, i).copy_(at::logsumexp(scores, 0));
    out.select(0, b).select(0, i).select(0, h).copy_(
        at::matmul(at::softmax(scores, 0).to(q.scalar_type()), vh));
  }
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, double scale) {
  check_attention("skipdit::attention_forward", q, k, v, scale);
  auto [o, lse] = at::_scaled_dot_product_flash_attention_for_cpu(
      q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, false, {}, scale);
  // o: [B, H, Nq, Dh] view of BSHD memory; lse: [B, H, Nq].
  at::Tensor out = o.transpose(1, 2).contiguous(), lse_out = lse.contiguous();
  restore_nonfinite_rows(q, k, v, scale, out, lse_out);
  return {out, lse_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, double scale) {
  check_attention_backward("skipdit::attention_backward", grad_out, q, k, v, out, lse, scale);
  // ATen's kernel reads out and grad_out through their leading strides but assumes a
  // contiguous head dim (measured: out with a head-dim stride of 2 gave wrong dq / dk);
  // such views are copied. lse is read as [B, H, Nq] contiguous.
  auto head_dim_contiguous = [](const at::Tensor& t) {
    return t.stride(3) == 1 || t.size(3) == 1 ? t : t.contiguous();
  };
  auto [dq, dk, dv] = at::_scaled_dot_product_flash_attention_for_cpu_backward(
      head_dim_contiguous(grad_out).transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2),
      v.transpose(1, 2), head_dim_contiguous(out).transpose(1, 2), lse.contiguous(), 0.0, false,
      {}, scale);
  return {dq.transpose(1, 2).contiguous(), dk.transpose(1, 2).contiguous(),
          dv.transpose(1, 2).contiguous()};
}

}  // namespace
}  // namespace skipdit

TORCH_LIBRARY_IMPL(skipdit, CPU, m) {
  m.impl("attention_forward", &skipdit::attention_forward_cpu);
  m.impl("attention_backward", &skipdit::attention_backward_cpu);
}
