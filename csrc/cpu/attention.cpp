// attention on the CPU: ATen's flash-attention CPU kernel (blocked, online softmax,
// already vectorized and threaded), called on BHSD views of the BSHD inputs so that
// strided q/k/v views of a fused qkv tensor are read in place. Its output is laid out
// BSHD in memory, which is the layout this op returns.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common.h"
#include "ops.h"

namespace skipdit {
namespace {

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, double scale) {
  check_attention("skipdit::attention_forward", q, k, v, scale);
  auto [o, lse] = at::_scaled_dot_product_flash_attention_for_cpu(
      q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, false, {}, scale);
  // o: [B, H, Nq, Dh] view of BSHD memory; lse: [B, H, Nq].
  return {o.transpose(1, 2).contiguous(), lse.contiguous()};
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
