// CPU replay of the skip_fuse forward GEMM's data movement (csrc/cuda/skip_fuse_kernels.cuh),
// using the kernel's own index math (csrc/cuda/skip_fuse_tiles.h) -- not the kernel code,
// which tests/emu/skip_fuse_kernels.cpp runs.
//
// One CTA at a time, thread by thread and warp by warp:
//   - cp.async: each thread's 16-byte chunk copies (or zero fills) into the shared ring,
//   - the in-place normalization of the thread's own A chunks,
//   - ldmatrix.x4 and mma.sync (m16n8k16 for 16-bit operands, m16n8k8 for tf32) with
//     the PTX ISA's fragment tables (the warp-level functions of tests/emu/ptx_emu.h,
//     accumulating in double),
//   - the epilogue's accumulator -> (row, column) mapping and bias,
// and compares y with a direct computation from the same rounded operands. Ragged M, N
// and K tiles, an x/skip split inside a k-tile and padded row strides are covered.
// Built by tests/emu_build.py; tests/test_skip_fuse_cuda.py calls emu_skip_fuse_tiles.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "ptx_emu.h"

#include "cuda/skip_fuse_tiles.h"

using namespace skipdit::skip_fuse;

namespace {

// The two operand formats of the GEMM: bf16 (m16n8k16) and fp32 as tf32 (m16n8k8).
struct BF16 {
  using bits = uint16_t;
  using tag = skipdit::BF16;
  static constexpr int kBytes = 2;
  static bits from_float(float f) { return skipdit::from_float<tag>(f); }
  static float to_float(bits b) { return skipdit::to_float<tag>(b); }
  static bits operand(float f) { return from_float(f); }  // the kernel's store_operand
  static uint32_t b_operand(uint32_t r) { return r; }     // B fragments used as loaded
  static float b_value(float f) { return f; }             // ... and their values
  static const char* name() { return "bf16 / m16n8k16"; }
};

struct F32 {
  using bits = uint32_t;
  using tag = skipdit::F32;
  static constexpr int kBytes = 4;
  static bits from_float(float f) { return skipdit::float_to_bits(f); }
  static float to_float(bits b) { return skipdit::bits_to_float(b); }
  static bits operand(float f) { return skipdit::to_tf32(f); }  // cvt.rna.tf32.f32
  static uint32_t b_operand(uint32_t r) { return skipdit::to_tf32(skipdit::bits_to_float(r)); }
  static float b_value(float f) { return skipdit::bits_to_float(skipdit::to_tf32(f)); }
  static const char* name() { return "fp32 / tf32 m16n8k8"; }
};

// ldmatrix .x4 from the 32 lanes' row byte offsets into the shared ring.
void ldmatrix_x4(const std::vector<uint8_t>& smem, const uint32_t (&addr)[32], uint32_t (&reg)[32][4]) {
  const uint16_t* rows[32];
  for (int l = 0; l < 32; ++l) rows[l] = reinterpret_cast<const uint16_t*>(&smem[addr[l]]);
  skipdit::emu::ldmatrix_warp<4, false>(rows, reg);
}

template <typename E>
int run(int M, int N, int D, int pad_x, int pad_s, int pad_w, bool with_bias, uint32_t seed,
        std::string& log) {
  using bits = typename E::bits;
  constexpr int CE = 16 / E::kBytes;
  constexpr int BK = kTileKBytes / E::kBytes;
  constexpr int kStages = 3;
  const int K = 2 * D;
  const int64_t ldx = D + pad_x, lds = D + pad_s, ldw = K + pad_w;
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<bits> x(M * ldx), s(M * lds), w(N * ldw), bias(N);
  for (auto& v : x) v = E::from_float(3.f + nd(rng));
  for (auto& v : s) v = E::from_float(nd(rng) * 2.f);
  for (auto& v : w) v = E::from_float(nd(rng) * 0.1f);
  for (auto& v : bias) v = E::from_float(nd(rng));
  std::vector<float> gamma(K), beta(K);
  for (auto& v : gamma) v = 1.f + 0.1f * nd(rng);
  for (auto& v : beta) v = 0.1f * nd(rng);
  // Row statistics (any values do for an index test; these are the real ones).
  std::vector<float> mean(M), rstd(M);
  for (int r = 0; r < M; ++r) {
    double a = 0, q = 0;
    for (int k = 0; k < K; ++k) a += E::to_float(k < D ? x[r * ldx + k] : s[r * lds + k - D]);
    a /= K;
    for (int k = 0; k < K; ++k) {
      const double d = E::to_float(k < D ? x[r * ldx + k] : s[r * lds + k - D]) - a;
      q += d * d;
    }
    mean[r] = static_cast<float>(a);
    rstd[r] = static_cast<float>(1.0 / std::sqrt(q / K + 1e-6));
  }
  // Expected y from the same rounded operands.
  std::vector<double> y_ref(static_cast<size_t>(M) * N);
  {
    std::vector<double> h(K);
    for (int r = 0; r < M; ++r) {
      for (int k = 0; k < K; ++k) {
        const float z = E::to_float(k < D ? x[r * ldx + k] : s[r * lds + k - D]);
        h[k] = E::to_float(E::operand(std::fma((z - mean[r]) * rstd[r], gamma[k], beta[k])));
      }
      for (int n = 0; n < N; ++n) {
        double acc = 0;
        for (int k = 0; k < K; ++k) acc += h[k] * E::b_value(E::to_float(w[n * ldw + k]));
        y_ref[static_cast<size_t>(r) * N + n] = acc + (with_bias ? E::to_float(bias[n]) : 0.0);
      }
    }
  }

  std::vector<double> y(static_cast<size_t>(M) * N, std::nan(""));
  const int n_tiles = (N + kBN - 1) / kBN;
  const int64_t m_tiles = (M + kBM - 1) / kBM;
  std::vector<uint8_t> smem(kStages * kStageBytes);
  for (int64_t cta = 0; cta < m_tiles * n_tiles; ++cta) {
    const int64_t m0 = cta_m0(cta, n_tiles);
    const int n0 = cta_n0(cta, n_tiles);
    std::fill(smem.begin(), smem.end(), 0xA5);  // garbage: unwritten bytes must not matter
    auto issue = [&](int kt, int slot) {  // mirrors issue() in the kernel
      for (int tid = 0; tid < kThreads; ++tid) {
        const int chunk = copy_chunk(tid);
        const int kk = kt * BK + chunk * CE;
        const bool kok = kk < K;
        const bool in_skip = k_in_skip(kk, D);
        const int col = k_src_col(kk, D);
        const bits* abase = in_skip ? s.data() : x.data();
        const int64_t ald = in_skip ? lds : ldx;
        const uint32_t sa = slot * kStageBytes, sb = sa + kTileBytes;
        for (int i = 0; i < kCopyIters; ++i) {
          const int row = copy_row(tid, i);
          const int64_t r = m0 + row;
          const bool ok = kok && r < M;
          uint8_t* dst = &smem[sa + tile_offset(row, chunk)];
          if (ok) std::memcpy(dst, abase + r * ald + col, 16); else std::memset(dst, 0, 16);
        }
        for (int i = 0; i < kCopyIters; ++i) {
          const int row = copy_row(tid, i);
          const int n = n0 + row;
          const bool ok = kok && n < N;
          uint8_t* dst = &smem[sb + tile_offset(row, chunk)];
          if (ok) std::memcpy(dst, w.data() + static_cast<int64_t>(n) * ldw + kk, 16); else std::memset(dst, 0, 16);
        }
      }
    };
    // the accumulators of the 8 warps (zero-initialized, on the heap: 512 KiB)
    auto acc = std::make_unique<double[][kMTiles][kNTiles][32][4]>(kThreads / 32);
    const int KT = (K + BK - 1) / BK;
    for (int st = 0; st < kStages - 1; ++st)
      if (st < KT) issue(st, st);
    for (int kt = 0; kt < KT; ++kt) {
      const int slot = kt % kStages;
      for (int tid = 0; tid < kThreads; ++tid) {  // normalize own chunks (kernel: same loop)
        const int chunk = copy_chunk(tid);
        const int kk = kt * BK + chunk * CE;
        for (int i = 0; i < kCopyIters; ++i) {
          const int64_t r = m0 + copy_row(tid, i);
          const float mu = r < M ? mean[r] : 0.f, rs = r < M ? rstd[r] : 0.f;
          bits* p = reinterpret_cast<bits*>(&smem[slot * kStageBytes + tile_offset(copy_row(tid, i), chunk)]);
          for (int e = 0; e < CE; ++e) {
            const float g = kk < K ? gamma[kk + e] : 0.f, b = kk < K ? beta[kk + e] : 0.f;
            p[e] = E::operand(std::fma((E::to_float(p[e]) - mu) * rs, g, b));
          }
        }
      }
      if (kt + kStages - 1 < KT) issue(kt + kStages - 1, (kt + kStages - 1) % kStages);
      const uint32_t ta = slot * kStageBytes, tb = ta + kTileBytes;
      for (int warp = 0; warp < kThreads / 32; ++warp) {
        for (int ks = 0; ks < kKSteps; ++ks) {
          uint32_t af[kMTiles][32][4], bfr[kNTiles][32][2];
          for (int mt = 0; mt < kMTiles; ++mt) {
            uint32_t addr[32];
            for (int lane = 0; lane < 32; ++lane) addr[lane] = ta + a_ldsm_offset(warp, lane, mt, ks);
            ldmatrix_x4(smem, addr, af[mt]);
          }
          for (int np = 0; np < kNTiles / 2; ++np) {
            uint32_t addr[32], r[32][4];
            for (int lane = 0; lane < 32; ++lane) addr[lane] = tb + b_ldsm_offset(warp, lane, np, ks);
            ldmatrix_x4(smem, addr, r);
            for (int lane = 0; lane < 32; ++lane) {  // kernel: V::b_operand of each register
              bfr[2 * np][lane][0] = E::b_operand(r[lane][0]);
              bfr[2 * np][lane][1] = E::b_operand(r[lane][1]);
              bfr[2 * np + 1][lane][0] = E::b_operand(r[lane][2]);
              bfr[2 * np + 1][lane][1] = E::b_operand(r[lane][3]);
            }
          }
          for (int mt = 0; mt < kMTiles; ++mt)
            for (int nt = 0; nt < kNTiles; ++nt) {
              skipdit::emu::mma_warp<typename E::tag, E::kBytes == 2 ? 16 : 8, double>(
                  af[mt], bfr[nt], acc[warp][mt][nt]);
            }
        }
      }
    }
    for (int warp = 0; warp < kThreads / 32; ++warp)  // epilogue (kernel: same mapping)
      for (int lane = 0; lane < 32; ++lane)
        for (int nt = 0; nt < kNTiles; ++nt) {
          const int col = n0 + acc_col(warp, lane, nt, 0);
          if (col >= N) continue;
          const double b0 = with_bias ? E::to_float(bias[col]) : 0, b1 = with_bias ? E::to_float(bias[col + 1]) : 0;
          for (int mt = 0; mt < kMTiles; ++mt)
            for (int hr = 0; hr < 2; ++hr) {
              const int64_t row = m0 + acc_row(warp, lane, mt, 2 * hr);
              if (row >= M) continue;
              if (acc_col(warp, lane, nt, 1) != acc_col(warp, lane, nt, 0) + 1 ||
                  acc_row(warp, lane, mt, 2 * hr + 1) != acc_row(warp, lane, mt, 2 * hr)) {
                log += std::string("FAIL ") + E::name() + ": accumulator pair is not (row, col), (row, col + 1)\n";
                return 1;
              }
              double& y0 = y[row * N + col];
              double& y1 = y[row * N + col + 1];
              if (!std::isnan(y0) || !std::isnan(y1)) {
                log += std::string("FAIL ") + E::name() + ": y[" + std::to_string(row) + ", " +
                       std::to_string(col) + "] written twice\n";
                return 1;
              }
              y0 = acc[warp][mt][nt][lane][2 * hr] + b0;
              y1 = acc[warp][mt][nt][lane][2 * hr + 1] + b1;
            }
        }
  }
  double max_err = 0, max_ref = 0;
  for (size_t i = 0; i < y.size(); ++i) {
    if (std::isnan(y[i])) {
      log += std::string("FAIL ") + E::name() + ": y[" + std::to_string(i / N) + ", " +
             std::to_string(i % N) + "] never written\n";
      return 1;
    }
    max_err = std::fmax(max_err, std::fabs(y[i] - y_ref[i]));
    max_ref = std::fmax(max_ref, std::fabs(y_ref[i]));
  }
  const bool ok = max_err <= 1e-9 * (1 + max_ref);
  char line[256];
  std::snprintf(line, sizeof line, "%s %s M=%d N=%d D=%d bias=%d: max |y - y_ref| = %.3e (max |y_ref| %.3e)\n",
                ok ? "ok  " : "FAIL", E::name(), M, N, D, with_bias ? 1 : 0, max_err, max_ref);
  log += line;
  return ok ? 0 : 1;
}

}  // namespace

extern "C" {

// One replay: dtype 1 bf16 (m16n8k16), 2 fp32 (tf32 m16n8k8); row strides D + pad_x,
// D + pad_s, 2D + pad_w. Returns the number of failures; log gets one line.
int emu_skip_fuse_tiles(int dtype, int M, int N, int D, int pad_x, int pad_s, int pad_w, int bias,
                        uint32_t seed, char* log, int log_len) {
  std::string text;
  const int fails = dtype == 1 ? run<BF16>(M, N, D, pad_x, pad_s, pad_w, bias != 0, seed, text)
                               : run<F32>(M, N, D, pad_x, pad_s, pad_w, bias != 0, seed, text);
  std::snprintf(log, log_len, "%s", text.c_str());
  return fails;
}

}  // extern "C"
