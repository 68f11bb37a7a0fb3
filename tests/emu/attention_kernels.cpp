// Runs the CUDA attention forward kernels (csrc/cuda/attention_kernels.cuh, the source
// the GPU build compiles) on the CPU emulator (cta.h, ptx_emu.h) and returns their
// outputs. Built as a shared library by tests/emu_build.py; called from
// tests/test_attention_cuda.py through ctypes.
#include <cstdio>
#include <string>
#include <vector>

#include "ptx_emu.h"

#include "cuda/attention_kernels.cuh"

namespace {

using namespace skipdit;
using namespace skipdit::attention;

template <class E>
void run_all(FwdParams p, int64_t cta_begin, int64_t cta_end, char* info, int info_len) {
  plan(p, [&](auto cfg, auto is_short, const LaunchShape& shape) {
    using C = typename decltype(cfg)::type;
    constexpr bool kShort = decltype(is_short)::value;
    std::snprintf(info, info_len, "%s kDh=%d grid=%lld threads=%d smem=%d", kShort ? "short" : "main",
                  C::kDh, static_cast<long long>(shape.grid), shape.threads, shape.smem);
    if (shape.smem > shape.max_smem) emu::fail("launch asks for more shared memory than allowed");
    emu::launch(shape.grid, shape.threads, shape.smem, [&] {
      if constexpr (kShort) {
        attention_fwd_short_kernel<C, E>(p);
      } else {
        attention_fwd_kernel<C, E>(p);
      }
    }, cta_begin, cta_end);
  });
}

}  // namespace

extern "C" {

// The emulator's 16-bit conversions (dtype 0 fp16, 1 bf16), for a check against torch's.
void emu_convert(int dtype, const float* in, uint16_t* out, float* back, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    out[i] = dtype == 0 ? skipdit::from_float<skipdit::F16>(in[i]) : skipdit::from_float<skipdit::BF16>(in[i]);
    back[i] = dtype == 0 ? skipdit::to_float<skipdit::F16>(out[i]) : skipdit::to_float<skipdit::BF16>(out[i]);
  }
}

// Runs the attention forward kernels on the CPU. dtype: 0 fp16, 1 bf16. mode: bits as
// in emu::Machine::mode. strides: q, k, v element strides for B, N, H (9 values).
// ranges: [lo, hi) byte addresses of the storage the kernel may read (q, k, v: 6
// values) and write (out, lse: 4 values). CTAs [cta_begin, cta_end) of the grid run
// (cta_end < 0: all). Returns 0, or 1 with the first violation in err. info receives
// the kernel and launch shape chosen.
int emu_attention_forward(int dtype, int mode, const void* q, const void* k, const void* v,
                          void* out, float* lse, const int64_t* strides, const uint64_t* ranges,
                          int64_t B, int H, int Nq, int Nk, int dh, double scale,
                          int64_t cta_begin, int64_t cta_end, char* err, int err_len, char* info,
                          int info_len) {
  auto rng = [&](int i) {
    return emu::Range{reinterpret_cast<const char*>(ranges[2 * i]),
                      reinterpret_cast<const char*>(ranges[2 * i + 1])};
  };
  emu::reset(mode, {rng(0), rng(1), rng(2)}, {rng(3), rng(4)});
  FwdParams p{};
  p.q = static_cast<const uint16_t*>(q);
  p.k = static_cast<const uint16_t*>(k);
  p.v = static_cast<const uint16_t*>(v);
  p.out = static_cast<uint16_t*>(out);
  p.lse = lse;
  p.q_sb = strides[0], p.q_sn = strides[1], p.q_sh = strides[2];
  p.k_sb = strides[3], p.k_sn = strides[4], p.k_sh = strides[5];
  p.v_sb = strides[6], p.v_sn = strides[7], p.v_sh = strides[8];
  p.BH = B * H;
  p.H = H;
  p.Nq = Nq;
  p.Nk = Nk;
  p.dh = dh;
  p.scale_log2 = static_cast<float>(scale * kLog2e);
  info[0] = 0;
  if (dtype == 0) {
    run_all<F16>(p, cta_begin, cta_end, info, info_len);
  } else {
    run_all<BF16>(p, cta_begin, cta_end, info, info_len);
  }
  std::snprintf(err, err_len, "%s", emu::M.error.c_str());
  const int rc = emu::failed() ? 1 : 0;
  emu::reset(1, {}, {});
  return rc;
}

}  // extern "C"
