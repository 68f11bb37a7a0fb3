// CPU emulation of the skip_fuse forward GEMM's data movement (csrc/cuda/skip_fuse.cu),
// using the kernel's own index math (csrc/cuda/skip_fuse_tile.h).
//
// The CUDA kernel cannot run on a machine without a GPU, so this program replays one
// CTA at a time, thread by thread and warp by warp, on the CPU:
//   - cp.async: each thread's 16-byte chunk copies (or zero fills) into the shared ring,
//   - the in-place normalization of the thread's own A chunks,
//   - ldmatrix.x4 and mma.sync (m16n8k16 for 16-bit operands, m16n8k8 for tf32),
//     emulated from the PTX ISA descriptions (register <-> matrix element tables),
//   - the epilogue's accumulator -> (row, column) mapping and bias,
// and compares y with a direct computation from the same rounded operands. Ragged M, N
// and K tiles, an x/skip split inside a k-tile and padded row strides are covered.
// Build: g++ -O2 -std=c++20 -I csrc tests/cpp/skip_fuse_emu.cpp; exit code 0 on success.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "cuda/skip_fuse_tile.h"

using namespace skipdit::sf;

namespace {

uint32_t f2u(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float u2f(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// bf16 with round to nearest even (finite inputs).
struct BF16 {
  using bits = uint16_t;
  static constexpr int kBytes = 2;
  static bits from_float(float f) {
    uint32_t u = f2u(f);
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<bits>(u >> 16);
  }
  static float to_float(bits b) { return u2f(static_cast<uint32_t>(b) << 16); }
  static bits operand(float f) { return from_float(f); }  // store_operand
  static float b_operand(float f) { return f; }           // B fragments used as loaded
  static const char* name() { return "bf16 / m16n8k16"; }
};

// cvt.rna.tf32.f32: round to nearest, ties away from zero, to 10 mantissa bits.
float tf32_rna(float f) {
  uint32_t u = f2u(f);
  u = (u + 0x1000u) & 0xffffe000u;
  return u2f(u);
}

struct F32 {
  using bits = uint32_t;
  static constexpr int kBytes = 4;
  static bits from_float(float f) { return f2u(f); }
  static float to_float(bits b) { return u2f(b); }
  static bits operand(float f) { return f2u(tf32_rna(f)); }
  static float b_operand(float f) { return tf32_rna(f); }
  static const char* name() { return "fp32 / tf32 m16n8k8"; }
};

// Element e (of 16-bit width) of a 32-bit register: low half first.
uint16_t half_of(uint32_t r, int e) { return static_cast<uint16_t>(e == 0 ? r & 0xffffu : r >> 16); }

// ldmatrix.sync.aligned.m8n8.x4.shared.b16 (PTX ISA): lanes 8j..8j+7 give the row
// addresses of matrix j; lane l receives, in register j, the two b16 elements of row
// l / 4 at columns 2 * (l % 4) and 2 * (l % 4) + 1 of matrix j (low half = lower column).
void ldmatrix_x4(const std::vector<uint8_t>& smem, const uint32_t (&addr)[32], uint32_t (&reg)[32][4]) {
  for (int lane = 0; lane < 32; ++lane) {
    for (int j = 0; j < 4; ++j) {
      const uint32_t row_addr = addr[8 * j + lane / 4];
      uint16_t lo, hi;
      std::memcpy(&lo, &smem[row_addr + 4 * (lane % 4)], 2);
      std::memcpy(&hi, &smem[row_addr + 4 * (lane % 4) + 2], 2);
      reg[lane][j] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
  }
}

// mma.sync m16n8k16 .row.col f32.bf16.bf16.f32 (PTX ISA "Matrix Fragments for
// mma.m16n8k16 with floating point type"), accumulating in double.
void mma_bf16(const uint32_t (&a)[32][4], const uint32_t (&b)[32][2], double (&c)[32][4]) {
  double A[16][16] = {}, B[16][8] = {};
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 8; ++i) {  // a_i lives in register i / 2, half i % 2
      const int row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
      const int col = t * 2 + (i & 1) + (i >= 4 ? 8 : 0);
      A[row][col] = BF16::to_float(half_of(a[lane][i / 2], i & 1));
    }
    for (int i = 0; i < 4; ++i) {  // b_i in register i / 2
      const int row = t * 2 + (i & 1) + (i >= 2 ? 8 : 0);
      const int col = g;
      B[row][col] = BF16::b_operand(BF16::to_float(half_of(b[lane][i / 2], i & 1)));
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 4; ++i) {
      const int row = i < 2 ? g : g + 8;
      const int col = t * 2 + (i & 1);
      double s = 0;
      for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
      c[lane][i] += s;
    }
  }
}

// mma.sync m16n8k8 .row.col f32.tf32.tf32.f32 (PTX ISA "Matrix Fragments for mma.m16n8k8").
void mma_tf32(const uint32_t (&a)[32][4], const uint32_t (&b)[32][2], double (&c)[32][4]) {
  double A[16][8] = {}, B[8][8] = {};
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 4; ++i) {
      const int row = (i == 0 || i == 2) ? g : g + 8;
      const int col = i < 2 ? t : t + 4;
      A[row][col] = u2f(a[lane][i]);
    }
    for (int i = 0; i < 2; ++i) {
      const int row = i == 0 ? t : t + 4;
      B[row][g] = F32::b_operand(u2f(b[lane][i]));
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 4; ++i) {
      const int row = i < 2 ? g : g + 8;
      const int col = t * 2 + (i & 1);
      double s = 0;
      for (int k = 0; k < 8; ++k) s += A[row][k] * B[k][col];
      c[lane][i] += s;
    }
  }
}

template <typename E>
int run(int M, int N, int D, int pad_x, int pad_s, int pad_w, bool with_bias, uint32_t seed) {
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
        for (int k = 0; k < K; ++k) acc += h[k] * E::b_operand(E::to_float(w[n * ldw + k]));
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
    double acc[8][kMTiles][kNTiles][32][4] = {};
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
            for (int lane = 0; lane < 32; ++lane) {
              bfr[2 * np][lane][0] = r[lane][0];
              bfr[2 * np][lane][1] = r[lane][1];
              bfr[2 * np + 1][lane][0] = r[lane][2];
              bfr[2 * np + 1][lane][1] = r[lane][3];
            }
          }
          for (int mt = 0; mt < kMTiles; ++mt)
            for (int nt = 0; nt < kNTiles; ++nt) {
              if constexpr (E::kBytes == 2) {
                mma_bf16(af[mt], bfr[nt], acc[warp][mt][nt]);
              } else {
                mma_tf32(af[mt], bfr[nt], acc[warp][mt][nt]);
              }
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
                std::printf("FAIL %s: accumulator pair is not (row, col), (row, col + 1)\n", E::name());
                return 1;
              }
              double& y0 = y[row * N + col];
              double& y1 = y[row * N + col + 1];
              if (!std::isnan(y0) || !std::isnan(y1)) {
                std::printf("FAIL %s: y[%lld, %d] written twice\n", E::name(), (long long)row, col);
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
      std::printf("FAIL %s: y[%zu, %zu] never written\n", E::name(), i / N, i % N);
      return 1;
    }
    max_err = std::fmax(max_err, std::fabs(y[i] - y_ref[i]));
    max_ref = std::fmax(max_ref, std::fabs(y_ref[i]));
  }
  const bool ok = max_err <= 1e-9 * (1 + max_ref);
  std::printf("%s %s M=%d N=%d D=%d bias=%d: max |y - y_ref| = %.3e (max |y_ref| %.3e)\n",
              ok ? "ok  " : "FAIL", E::name(), M, N, D, with_bias ? 1 : 0, max_err, max_ref);
  return ok ? 0 : 1;
}

}  // namespace

int main() {
  int fails = 0;
  // Ragged M (2 tiles, 37 rows in the last), ragged N (136 = 128 + 8), K = 144 not a
  // multiple of the k-tile, x/skip boundary inside a k-tile, padded strides.
  fails += run<BF16>(165, 136, 72, 24, 8, 16, true, 1);
  fails += run<F32>(165, 136, 72, 24, 8, 16, true, 2);
  // One row, D spanning several k-tiles, no bias.
  fails += run<BF16>(1, 64, 200, 0, 8, 0, false, 3);
  fails += run<F32>(1, 64, 200, 0, 8, 0, false, 4);
  // Exact tile multiples.
  fails += run<BF16>(128, 128, 64, 0, 0, 0, true, 5);
  fails += run<F32>(128, 256, 32, 8, 0, 8, true, 6);
  std::printf(fails ? "FAILED (%d)\n" : "all ok\n", fails);
  return fails ? 1 : 0;
}
