// cache_delta on CUDA: sum|a - b| / sum|b| in one kernel launch, result left on the
// device (no host synchronization).
//
// cache_delta_reduce_kernel: each CTA reduces a grid-stride share of the elements into
// two double partial sums and writes them to its own slot; the last CTA to finish
// (atomic ticket) adds the slots in a fixed order, so the result is deterministic,
// writes the ratio and resets the ticket for the next call. Contiguous inputs are read
// with 16-byte vector loads; strided inputs (last dim contiguous) go through the row
// indexer of common.h (any view of up to 16 strided leading dims, like the CPU kernel).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <string>

#include "common.h"
#include "cuda/cuda_utils.cuh"
#include "ops.h"

namespace skipdit {

// Every float dtype, any shape the op accepts: only the build's architectures limit it.
std::string cache_delta_cuda_limits(c10::ArrayRef<int64_t> features,
                                    std::optional<at::ScalarType> dtype, const CudaDeviceInfo& dev) {
  TORCH_CHECK_VALUE(features.empty(), "skipdit::cuda_limits: cache_delta takes no features, got ",
                    features);
  if (dtype.has_value() && !at::isFloatingType(*dtype)) {
    return "the CUDA cache_delta kernel runs float16, bfloat16, float32 and float64, got " +
           torch_dtype_name(*dtype);
  }
  return dev.cc_major < 0 ? "" : cuda::arch_reason(dev.cc_major, dev.cc_minor);
}

namespace cache_delta {

constexpr int kThreads = 256;

template <typename T>
SKIPDIT_DEV double to_d(T v) {
  return static_cast<double>(static_cast<float>(v));
}
SKIPDIT_DEV double to_d(double v) { return v; }

SKIPDIT_DEV void block_sum2(double& d, double& s, double* smem) {
  for (int o = 16; o > 0; o >>= 1) {
    d += __shfl_down_sync(0xffffffffu, d, o);
    s += __shfl_down_sync(0xffffffffu, s, o);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    smem[2 * warp] = d;
    smem[2 * warp + 1] = s;
  }
  __syncthreads();
  if (warp == 0) {
    d = lane < kThreads / 32 ? smem[2 * lane] : 0.0;
    s = lane < kThreads / 32 ? smem[2 * lane + 1] : 0.0;
    for (int o = 16; o > 0; o >>= 1) {
      d += __shfl_down_sync(0xffffffffu, d, o);
      s += __shfl_down_sync(0xffffffffu, s, o);
    }
  }
}

template <typename scalar_t, typename out_t>
__global__ void __launch_bounds__(kThreads)
    cache_delta_reduce_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                              const RowIndexer ra, const RowIndexer rb, int64_t D, int64_t n,
                              bool contiguous, double* __restrict__ partials,
                              unsigned int* __restrict__ ticket, out_t* __restrict__ out) {
  double d = 0.0, s = 0.0;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  constexpr int V = 16 / sizeof(scalar_t);
  if (contiguous) {
    // Vector body over the aligned prefix, scalar tail.
    const bool aligned = (reinterpret_cast<uintptr_t>(a) % 16 == 0) &&
                         (reinterpret_cast<uintptr_t>(b) % 16 == 0);
    const int64_t nv = aligned ? n / V : 0;
    for (int64_t i = tid; i < nv; i += stride) {
      uint4 va = reinterpret_cast<const uint4*>(a)[i];
      uint4 vb = reinterpret_cast<const uint4*>(b)[i];
      const scalar_t* ea = reinterpret_cast<const scalar_t*>(&va);
      const scalar_t* eb = reinterpret_cast<const scalar_t*>(&vb);
      double fd = 0.0, fs = 0.0;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const double bv = to_d(eb[j]);
        fd += fabs(to_d(ea[j]) - bv);
        fs += fabs(bv);
      }
      d += fd;
      s += fs;
    }
    for (int64_t i = nv * V + tid; i < n; i += stride) {
      const double bv = to_d(b[i]);
      d += fabs(to_d(a[i]) - bv);
      s += fabs(bv);
    }
  } else {
    for (int64_t i = tid; i < n; i += stride) {
      const int64_t r = i / D, c = i % D;
      const double bv = to_d(b[rb.offset(r) + c]);
      d += fabs(to_d(a[ra.offset(r) + c]) - bv);
      s += fabs(bv);
    }
  }
  __shared__ double smem[2 * kThreads / 32];
  __shared__ bool last;
  block_sum2(d, s, smem);
  if (threadIdx.x == 0) {
    partials[2 * blockIdx.x] = d;
    partials[2 * blockIdx.x + 1] = s;
    __threadfence();
    last = atomicAdd(ticket, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  // The last CTA adds the partial sums in a fixed order.
  d = 0.0;
  s = 0.0;
  for (int i = threadIdx.x; i < gridDim.x; i += kThreads) {
    d += partials[2 * i];
    s += partials[2 * i + 1];
  }
  __syncthreads();
  block_sum2(d, s, smem);
  if (threadIdx.x == 0) {
    *out = static_cast<out_t>(d / s);
    *ticket = 0u;
  }
}

}  // namespace cache_delta

namespace {

at::Tensor cache_delta_cuda(const at::Tensor& a, const at::Tensor& b) {
  const char* op = "skipdit::cache_delta";
  check_cache_delta(op, a, b);
  c10::cuda::CUDAGuard guard(a.device());
  const int64_t n = a.numel();
  const bool contiguous = a.is_contiguous() && b.is_contiguous();
  constexpr int kThreads = cache_delta::kThreads;
  const int64_t want = (n + kThreads * 8 - 1) / (kThreads * 8);
  const int grid = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(want, 2 * cuda::sm_count(a.get_device()))));
  const auto out_t = a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto out = new_output({}, a.options().dtype(out_t));
  // [partials (2 doubles per CTA) | ticket]; the ticket must start at zero and the
  // kernel leaves it at zero.
  auto ws = at::empty({2 * grid + 1}, a.options().dtype(at::kDouble));
  auto ticket = reinterpret_cast<unsigned int*>(ws.data_ptr<double>() + 2 * grid);
  auto stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(cudaMemsetAsync(ticket, 0, sizeof(double), stream));
  const RowIndexer ra = make_row_indexer(op, "a", a), rb = make_row_indexer(op, "b", b);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "cache_delta_cuda", [&] {
    using cuda_t = std::conditional_t<std::is_same_v<scalar_t, at::Half>, __half,
                   std::conditional_t<std::is_same_v<scalar_t, at::BFloat16>, __nv_bfloat16, scalar_t>>;
    auto launch = [&](auto* out_ptr) {
      cache_delta::cache_delta_reduce_kernel<cuda_t><<<grid, kThreads, 0, stream>>>(
          reinterpret_cast<const cuda_t*>(a.const_data_ptr<scalar_t>()),
          reinterpret_cast<const cuda_t*>(b.const_data_ptr<scalar_t>()), ra, rb, a.size(-1), n, contiguous,
          ws.data_ptr<double>(), ticket, out_ptr);
    };
    if (out_t == at::kDouble) {
      launch(out.data_ptr<double>());
    } else {
      launch(out.data_ptr<float>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace skipdit

TORCH_LIBRARY_IMPL(skipdit, CUDA, m) {
  m.impl("cache_delta", &skipdit::cache_delta_cuda);
}
