// Shared argument checks and helpers for the skipdit ops (CPU and CUDA).
//
// Checks raise c10 errors that reach Python as ValueError / TypeError /
// RuntimeError with a message naming the op and the argument, never a crash.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <string>
#include <tuple>

#include "macros.h"

// CPU row loops are compiled for several vector ISAs and picked at load time (GCC
// function multiversioning), since the library is built for a generic x86-64.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SKIPDIT_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SKIPDIT_VECTOR_CLONES
#endif

namespace skipdit {

// CPU reductions run in kLanes independent accumulators, so that they vectorize
// without reassociation flags, and are combined in double. A row's tail (length not a
// multiple of kLanes) goes to a separate scalar: indexing the lanes with j % kLanes
// there would make the compiler keep the lanes in memory, in the vector loop too.
constexpr int kLanes = 16;

// Testing aid (DESIGN.md section 4): when on, every output a kernel allocates is
// filled with NaN first, so elements a kernel fails to write show up in tests.
// Set through torch.ops.skipdit._set_poison_outputs.
bool& poison_outputs_flag();

inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  auto t = at::empty(sizes, options);
  if (poison_outputs_flag() && at::isFloatingType(t.scalar_type())) t.fill_(NAN);
  return t;
}

inline bool is_16bit(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16;
}

// Accumulation dtype of DESIGN.md: fp32 for 16-bit inputs, else the input dtype.
inline at::ScalarType acc_type(at::ScalarType t) {
  return is_16bit(t) ? at::kFloat : t;
}

// The dtype as Python spells it (torch.float32), for messages that Python code compares.
inline std::string torch_dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    default: return std::string("torch.") + c10::toString(t);
  }
}

// A required Tensor argument given as None reaches a native op as an undefined tensor
// (the dispatcher lets it through); every check below would fail on it with an error
// that does not name the argument.
inline void check_defined(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.defined(), op, ": ", name, " must be a tensor, got None");
}

inline void check_float_dtype(const char* op, const char* name, const at::Tensor& t) {
  auto s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble,
                   op, ": ", name, " must be float16, bfloat16, float32 or float64, got ", s);
}

inline void check_last_dim_contiguous(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.dim() >= 1, op, ": ", name, " must have at least one dimension");
  TORCH_CHECK_VALUE(t.stride(-1) == 1 || t.size(-1) == 1, op, ": ", name,
                    " must have a contiguous last dimension (stride 1), got stride ", t.stride(-1));
}

inline void check_nonempty(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.numel() > 0, op, ": ", name, " is empty (shape ", t.sizes(), ")");
}

// t (argument `name`) must be on the device of ref (`ref_name`, by default the op's
// first tensor argument).
inline void check_same_device(const char* op, const at::Tensor& ref, const char* name,
                              const at::Tensor& t, const char* ref_name = "the first input") {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": all tensors must be on one device; ",
                    name, " is on ", t.device(), " but ", ref_name, " is on ", ref.device());
}

// Row view of a tensor whose last dim is contiguous and whose leading dims have
// arbitrary strides: row r starts at data + offset(r). Leading dims of size 1 are
// dropped and neighbours that can be collapsed into one stride are merged, so the
// common layouts (contiguous, a slice of a fused projection) take the one-stride path.
// A plain struct (no constructor, trivially copyable): CUDA kernels take it by value and
// call offset() on the device. Built on the host by make_row_indexer, which refuses
// views with more than kMaxDims non-collapsible leading dims before writing anything.
struct RowIndexer {
  static constexpr int kMaxDims = 16;
  int64_t rows;               // product of the leading sizes
  int ndim;                   // leading dims after collapsing (0: a single row)
  int64_t sizes[kMaxDims];    // collapsed leading sizes, innermost last
  int64_t strides[kMaxDims];  // their element strides

  SKIPDIT_HD int64_t offset(int64_t r) const {
    if (ndim == 0) return 0;
    if (ndim == 1) return r * strides[0];
    int64_t off = 0;
    for (int i = ndim - 1; i >= 0; --i) {
      off += (r % sizes[i]) * strides[i];
      r /= sizes[i];
    }
    return off;
  }
};

// The row indexer of t (argument `name` of `op`, last dim contiguous).
inline RowIndexer make_row_indexer(const char* op, const char* name, const at::Tensor& t) {
  RowIndexer ri{};
  ri.rows = 1;
  int n = 0;
  const int lead = static_cast<int>(t.dim()) - 1;
  for (int d = 0; d < lead; ++d) {
    ri.rows *= t.size(d);
    if (t.size(d) == 1) continue;
    if (n > 0 && ri.strides[n - 1] == t.stride(d) * t.size(d)) {
      ri.sizes[n - 1] *= t.size(d);
      ri.strides[n - 1] = t.stride(d);
      continue;
    }
    TORCH_CHECK_VALUE(n < RowIndexer::kMaxDims, op, ": ", name, " has more than ",
                      RowIndexer::kMaxDims, " leading dimensions that cannot be merged into one "
                      "stride (shape ", t.sizes(), ", strides ", t.strides(),
                      "); pass a contiguous copy or a view with fewer strided dimensions");
    ri.sizes[n] = t.size(d);
    ri.strides[n] = t.stride(d);
    ++n;
  }
  ri.ndim = n;
  return ri;
}

// The six outputs of skip_fuse_backward, allocated like the inputs (contiguous);
// grad_bias is empty when there is no bias.
struct SkipFuseGrads {
  at::Tensor x, skip, norm_weight, norm_bias, weight, bias;

  SkipFuseGrads(const at::Tensor& x_, const at::Tensor& nw, const at::Tensor& nb,
                const at::Tensor& w, const std::optional<at::Tensor>& b)
      : x(new_output(x_.sizes(), x_.options())),
        skip(new_output(x_.sizes(), x_.options())),
        norm_weight(new_output(nw.sizes(), nw.options())),
        norm_bias(new_output(nb.sizes(), nb.options())),
        weight(new_output(w.sizes(), w.options())),
        bias(b.has_value() ? new_output(b->sizes(), b->options()) : at::empty({0}, w.options())) {}

  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> tuple() const {
    return {x, skip, norm_weight, norm_bias, weight, bias};
  }
};

// y[r0:r0+rows] = h[:rows] @ weight^T (+ bias): the GEMM of one normalized row chunk
// (ATen's BLAS / cuBLAS), written into the output rows in place.
inline void linear_rows_out(at::Tensor& y, int64_t r0, int64_t rows, const at::Tensor& h,
                            const at::Tensor& weight_t, const std::optional<at::Tensor>& bias) {
  at::Tensor hv = h.narrow(0, 0, rows);
  at::Tensor yv = y.narrow(0, r0, rows);
  if (bias.has_value()) {
    at::addmm_out(yv, *bias, hv, weight_t);
  } else {
    at::mm_out(yv, hv, weight_t);
  }
}

}  // namespace skipdit
