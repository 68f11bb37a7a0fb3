// Autograd kernels of the native ops, in C++ so that a call that needs no gradient
// pays no Python on its way to the device kernel. Each forward redispatches below
// autograd (to the CPU or CUDA kernel); each backward calls the matching *_backward
// op, which dispatches by device the same way.
//
// Double backward (a backward run with create_graph=True, e.g. a gradient penalty or
// gradgradcheck): the *_backward kernels are not differentiable, so then the backward
// recomputes the forward as the ATen composition of skipdit_fast/reference.py (the same
// math and roundings) and differentiates it with autograd, with create_graph: the
// gradients it returns are themselves differentiable, to any order. This costs what
// eager PyTorch costs (the (M, 2D) concatenation, attention's [Nq, Nk] scores) and
// runs only when grad mode is on inside the backward.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "common.h"
#include "ops.h"

namespace skipdit {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// d outputs / d inputs . grads, differentiable (create_graph), for the inputs that
// require grad; undefined for the others.
variable_list differentiable_grads(const variable_list& outputs, const variable_list& inputs,
                                   const variable_list& grads) {
  variable_list wanted;
  for (const auto& t : inputs) {
    if (t.defined() && t.requires_grad()) wanted.push_back(t);
  }
  variable_list out(inputs.size());
  if (wanted.empty()) return out;
  auto g = torch::autograd::grad(outputs, wanted, grads, /*retain_graph=*/true,
                                 /*create_graph=*/true, /*allow_unused=*/true);
  size_t j = 0;
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (inputs[i].defined() && inputs[i].requires_grad()) out[i] = g[j++];
  }
  return out;
}

// skipdit_fast/reference.py skip_fuse: y = linear(layer_norm(cat([x, skip]).to(acc),
// acc params).to(x.dtype), weight, bias).
at::Tensor skip_fuse_composition(const at::Tensor& x, const at::Tensor& skip,
                                 const at::Tensor& norm_weight, const at::Tensor& norm_bias,
                                 const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 double eps) {
  const auto acc = acc_type(x.scalar_type());
  at::Tensor z = at::cat({x, skip}, -1).to(acc);
  at::Tensor h = at::layer_norm(z, {z.size(-1)}, norm_weight.to(acc), norm_bias.to(acc), eps)
                     .to(x.scalar_type());
  return at::linear(h, weight, bias);
}

class SkipFuseFunction : public torch::autograd::Function<SkipFuseFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& skip,
                            const at::Tensor& norm_weight, const at::Tensor& norm_bias,
                            const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto fwd = op_handle<SkipFuseSig>("skipdit::skip_fuse");
    auto y = fwd.call(x, skip, norm_weight, norm_bias, weight, bias, eps);
    ctx->save_for_backward({x, skip, norm_weight, norm_bias, weight,
                            bias.has_value() ? *bias : at::Tensor()});
    ctx->saved_data["eps"] = eps;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto bwd = op_handle<SkipFuseBackwardSig>("skipdit::skip_fuse_backward");
    auto s = ctx->get_saved_variables();
    std::optional<at::Tensor> bias;
    if (s[5].defined()) bias = s[5];
    auto g = grads[0].defined() ? grads[0]
                                : at::zeros(skip_fuse_out_shape(s[0], s[4].size(0)), s[0].options());
    const double eps = ctx->saved_data["eps"].toDouble();
    if (at::GradMode::is_enabled()) {  // create_graph: see the top of this file
      auto y = skip_fuse_composition(s[0], s[1], s[2], s[3], s[4], bias, eps);
      auto d = differentiable_grads({y}, {s[0], s[1], s[2], s[3], s[4], s[5]}, {g});
      return {d[0], d[1], d[2], d[3], d[4], d[5], at::Tensor()};
    }
    auto [dx, dskip, dnw, dnb, dw, db] =
        bwd.call(g, s[0], s[1], s[2], s[3], s[4], bias, eps);
    return {dx, dskip, dnw, dnb, dw, bias.has_value() ? db : at::Tensor(), at::Tensor()};
  }
};

at::Tensor skip_fuse_autograd(const at::Tensor& x, const at::Tensor& skip,
                              const at::Tensor& norm_weight, const at::Tensor& norm_bias,
                              const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              double eps) {
  // autograd's Function::apply reads every input's device: an undefined one (None for a
  // Tensor) must be named before it gets there
  const char* op = "skipdit::skip_fuse";
  check_defined(op, "x", x);
  check_defined(op, "skip", skip);
  check_defined(op, "norm_weight", norm_weight);
  check_defined(op, "norm_bias", norm_bias);
  check_defined(op, "weight", weight);
  if (bias.has_value()) check_defined(op, "bias", *bias);
  return SkipFuseFunction::apply(x, skip, norm_weight, norm_bias, weight, bias, eps);
}

// skipdit_fast/reference.py attention: scores and softmax in the accumulation dtype,
// probabilities rounded to the input dtype before @ v; BSHD in and out.
at::Tensor attention_composition(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 double scale) {
  const auto acc = acc_type(q.scalar_type());
  at::Tensor qh = q.transpose(1, 2), kh = k.transpose(1, 2), vh = v.transpose(1, 2);
  at::Tensor scores = at::matmul(qh, kh.transpose(-1, -2)).to(acc) * scale;
  at::Tensor p = at::softmax(scores, -1).to(q.scalar_type());
  return at::matmul(p, vh).transpose(1, 2).contiguous();
}

// A tensor seen by a tracer (fake / functional / functorch-wrapped, or with symbolic
// sizes): its values cannot be read, so value-dependent branches are skipped for it.
bool is_traced(const at::Tensor& t) {
  const auto ks = t.key_set();
  return ks.has(c10::DispatchKey::Python) || ks.has(c10::DispatchKey::Functionalize) ||
         ks.has(c10::DispatchKey::FuncTorchGradWrapper) || ks.has(c10::DispatchKey::FuncTorchBatched) ||
         t.unsafeGetTensorImpl()->has_symbolic_sizes_strides();
}

class AttentionFunction : public torch::autograd::Function<AttentionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, double scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto fwd = op_handle<AttentionForwardSig>("skipdit::attention_forward");
    auto [out, lse] = fwd.call(q, k, v, scale);
    ctx->save_for_backward({q, k, v, out, lse});
    ctx->saved_data["scale"] = scale;
    ctx->mark_non_differentiable({lse});
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto bwd = op_handle<AttentionBackwardSig>("skipdit::attention_backward");
    auto s = ctx->get_saved_variables();
    auto g = grads[0].defined() ? grads[0] : at::zeros_like(s[3]);
    const double scale = ctx->saved_data["scale"].toDouble();
    if (at::GradMode::is_enabled()) {  // create_graph: see the top of this file
      auto o = attention_composition(s[0], s[1], s[2], scale);
      auto d = differentiable_grads({o}, {s[0], s[1], s[2]}, {g});
      return {d[0], d[1], d[2], at::Tensor()};
    }
    if (s[4].is_cpu() && !is_traced(s[4]) && !s[4].isfinite().all().item<bool>()) {
      auto [dq, dk, dv] = softmax_grads(g, s[0], s[1], s[2], scale);
      return {dq, dk, dv, at::Tensor()};
    }
    auto [dq, dk, dv] = bwd.call(g, s[0], s[1], s[2], s[3], s[4], scale);
    return {dq, dk, dv, at::Tensor()};
  }

 private:
  // Gradients of attention_composition, written out (P = softmax(S), dS = P * (dP -
  // rowsum(dP * P))), for a forward with a non-finite row (lse +inf or NaN: only
  // non-finite inputs make one). attention_backward's contract, P = exp(S - lse), is 0
  // at the row's -inf scores, so through it dK / dV of those keys come back finite where
  // autograd of the reference (whose softmax row is NaN) gives NaN; the CPU autograd
  // path takes this instead, so ops.attention's gradients have the reference's NaNs.
  // (On CUDA the check would cost a device sync per backward: not done there.)
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_grads(
      const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
      double scale) {
    const auto acc = acc_type(q.scalar_type());
    auto bhsd = [&](const at::Tensor& t) { return t.transpose(1, 2).to(acc); };
    const at::Tensor qh = bhsd(q), kh = bhsd(k), vh = bhsd(v), go = bhsd(grad_out);
    const at::Tensor p = at::softmax(at::matmul(qh, kh.transpose(-1, -2)) * scale, -1);
    const at::Tensor dp = at::matmul(go, vh.transpose(-1, -2));
    const at::Tensor ds = p * (dp - (dp * p).sum(-1, true));
    auto bshd = [&](const at::Tensor& t) { return t.transpose(1, 2).to(q.scalar_type()).contiguous(); };
    return {bshd(at::matmul(ds, kh) * scale), bshd(at::matmul(ds.transpose(-1, -2), qh) * scale),
            bshd(at::matmul(p.transpose(-1, -2), go))};
  }
};

std::tuple<at::Tensor, at::Tensor> attention_forward_autograd(const at::Tensor& q,
                                                              const at::Tensor& k,
                                                              const at::Tensor& v, double scale) {
  check_defined("skipdit::attention_forward", "q", q);
  check_defined("skipdit::attention_forward", "k", k);
  check_defined("skipdit::attention_forward", "v", v);
  auto r = AttentionFunction::apply(q, k, v, scale);
  return {r[0], r[1]};
}

// attention() is composite: it resolves the default scale, then calls
// attention_forward (which carries the autograd) and drops the log-sum-exp.
at::Tensor attention_composite(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               std::optional<double> scale) {
  static auto fwd = op_handle<AttentionForwardSig>("skipdit::attention_forward");
  // The head dim fixes the default scale; under symbolic shapes this specializes it.
  const int64_t dh = q.dim() == 4 ? q.sym_size(3).guard_int(__FILE__, __LINE__) : 0;
  const double s = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(dh > 0 ? dh : 1));
  return std::get<0>(fwd.call(q, k, v, s));
}

class CacheDeltaFunction : public torch::autograd::Function<CacheDeltaFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& a, const at::Tensor& b) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = op_handle<CacheDeltaSig>("skipdit::cache_delta");
    ctx->save_for_backward({a, b});
    return op.call(a, b);
  }

  // r = A / S with A = sum|a - b|, S = sum|b|:
  // dr/da = sign(a - b) / S;  dr/db = -sign(a - b) / S - A / S^2 * sign(b).
  // An ATen composition already, differentiable itself under create_graph.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    const auto acc = s[0].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    auto a = s[0].to(acc), b = s[1].to(acc);
    auto diff_sign = (a - b).sign();
    auto S = b.abs().sum();
    auto A = (a - b).abs().sum();
    auto g = grads[0].to(acc);
    auto da = diff_sign * (g / S);
    auto db = -da - b.sign() * (g * A / (S * S));
    return {da.to(s[0].scalar_type()), db.to(s[1].scalar_type())};
  }
};

at::Tensor cache_delta_autograd(const at::Tensor& a, const at::Tensor& b) {
  check_defined("skipdit::cache_delta", "a", a);
  check_defined("skipdit::cache_delta", "b", b);
  return CacheDeltaFunction::apply(a, b);
}

}  // namespace
}  // namespace skipdit

TORCH_LIBRARY_IMPL(skipdit, Autograd, m) {
  m.impl("skip_fuse", &skipdit::skip_fuse_autograd);
  m.impl("attention_forward", &skipdit::attention_forward_autograd);
  m.impl("cache_delta", &skipdit::cache_delta_autograd);
}

TORCH_LIBRARY_IMPL(skipdit, CompositeImplicitAutograd, m) {
  m.impl("attention", &skipdit::attention_composite);
}
