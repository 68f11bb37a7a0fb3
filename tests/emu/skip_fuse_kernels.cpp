// Runs the skip_fuse CUDA kernels (csrc/cuda/skip_fuse_kernels.cuh, the source the GPU
// build compiles) on the CPU emulator (cta.h, ptx_emu.h) and checks their results
// against double references: row statistics, the forward GEMM (bf16, fp16, tf32; ragged
// tiles, strided rows), normalize_rows, and the LayerNorm backward with its column sums.
// Under the emulator cp.async can land at its wait with the destination poisoned until
// then, and warps can run one by one, so a read before the wait or a refill of a slot
// another warp still reads shows up as NaN; every access is bounds-checked.
//
// Built as a shared library by tests/emu_build.py; tests/test_skip_fuse_cuda.py calls
// the emu_skip_fuse_* checks through ctypes. Each appends one line per check to `log`
// and returns the number of failed checks.
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "ptx_emu.h"

#include "cuda/skip_fuse_kernels.cuh"

namespace {

using namespace skipdit;
using namespace skipdit::skip_fuse;

struct Log {
  std::string text;
  int fails = 0;
  void check(bool ok, const char* what, double err, double tol) {
    char line[256];
    std::snprintf(line, sizeof line, "%s %-58s err %.3e tol %.3e%s%s\n", ok ? "ok  " : "FAIL", what,
                  err, tol, emu::failed() ? " emulator: " : "", emu::M.error.c_str());
    text += line;
    if (!ok) ++fails;
  }
  int done(char* out, int len) const {
    std::snprintf(out, len, "%s", text.c_str());
    return fails;
  }
};

// Element conversions and the operand rounding of the kernel, per format.
template <class E>
struct Ty {
  using S = uint16_t;
  static S from(float f) { return from_float<E>(f); }
  static float to(S v) { return to_float<E>(v); }
  static float operand(float f) { return to(from(f)); }
  static float b_operand(float f) { return f; }
  static constexpr double eps = std::is_same_v<E, BF16> ? 1.0 / 256 : 1.0 / 2048;  // 2 ulp
  static const char* name() { return std::is_same_v<E, BF16> ? "bf16" : "fp16"; }
};
template <>
struct Ty<F32> {
  using S = float;
  static S from(float f) { return f; }
  static float to(S v) { return v; }
  static float operand(float f) { return bits_to_float(to_tf32(f)); }
  static float b_operand(float f) { return operand(f); }
  static constexpr double eps = 1e-6;
  static const char* name() { return "fp32/tf32"; }
};

template <class T>
emu::Range whole(const std::vector<T>& v) {
  return emu::range_of(v.data(), v.size());
}

template <class E>
struct Problem {
  using S = typename Ty<E>::S;
  int M, D, N;
  int64_t ldx, lds, ldw;
  std::vector<S> x, s, w, bias;
  std::vector<float> gamma, beta;  // [2D]
  float z(int r, int k) const { return Ty<E>::to(k < D ? x[r * ldx + k] : s[r * lds + k - D]); }
};

template <class E>
Problem<E> make_problem(int M, int D, int N, int pad, uint32_t seed) {
  Problem<E> p{M, D, N, D + pad, D + 2 * pad, 2 * D + pad, {}, {}, {}, {}, {}, {}};
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  p.x.resize(M * p.ldx);
  p.s.resize(M * p.lds);
  for (int r = 0; r < M; ++r) {
    // Row families: normal, offset 1000 std, one outlier channel.
    const float off = r % 3 == 1 ? 1000.f : 0.f;
    for (int64_t k = 0; k < p.ldx; ++k) p.x[r * p.ldx + k] = Ty<E>::from(off + nd(rng));
    for (int64_t k = 0; k < p.lds; ++k) p.s[r * p.lds + k] = Ty<E>::from(off + nd(rng));
    if (r % 3 == 2) p.s[r * p.lds + (r % D)] = Ty<E>::from(500.f);
  }
  p.w.resize(N * p.ldw);
  for (auto& v : p.w) v = Ty<E>::from(nd(rng) / std::sqrt(2.f * D));
  p.bias.resize(N);
  for (auto& v : p.bias) v = Ty<E>::from(nd(rng));
  p.gamma.resize(2 * D);
  p.beta.resize(2 * D);
  for (auto& v : p.gamma) v = 1.f + 0.2f * nd(rng);
  for (auto& v : p.beta) v = 0.2f * nd(rng);
  return p;
}

// Row statistics (kernel) vs a double two-pass computation on the same inputs.
template <class E>
std::vector<RowStats> run_stats(const Problem<E>& p, float eps, int mode, Log& log) {
  std::vector<RowStats> st(p.M, RowStats{NAN, NAN});
  const int blocks = (p.M + kStatsThreads / 32 - 1) / (kStatsThreads / 32);
  emu::reset(mode, {whole(p.x), whole(p.s)}, {whole(st)});
  const bool ok = emu::launch(blocks, kStatsThreads, 0, [&] {
    skip_fuse_row_stats_kernel<E>(p.x.data(), p.ldx, p.s.data(), p.lds, p.M, p.D, eps, st.data());
  });
  double emean = 0, erstd = 0;
  for (int r = 0; r < p.M; ++r) {
    double m = 0, q = 0;
    for (int k = 0; k < 2 * p.D; ++k) m += p.z(r, k);
    m /= 2 * p.D;
    for (int k = 0; k < 2 * p.D; ++k) q += (p.z(r, k) - m) * (p.z(r, k) - m);
    const double rs = 1 / std::sqrt(q / (2 * p.D) + eps);
    emean = std::fmax(emean, std::fabs(st[r].mean - m) / (1 + std::fabs(m)));
    erstd = std::fmax(erstd, std::fabs(st[r].rstd - rs) / rs);
  }
  char what[128];
  std::snprintf(what, sizeof what, "row_stats %s M=%d D=%d: mean (rel)", Ty<E>::name(), p.M, p.D);
  log.check(ok && emean <= 1e-6, what, emean, 1e-6);
  std::snprintf(what, sizeof what, "row_stats %s M=%d D=%d: rstd (rel)", Ty<E>::name(), p.M, p.D);
  log.check(ok && erstd <= 2e-6, what, erstd, 2e-6);
  return st;
}

template <class E>
void test_forward(int M, int D, int N, int pad, bool with_bias, uint32_t seed, int mode, Log& log) {
  Problem<E> p = make_problem<E>(M, D, N, pad, seed);
  const std::vector<RowStats> st = run_stats(p, 1e-6f, mode, log);
  std::vector<typename Ty<E>::S> y(static_cast<size_t>(M) * N, Ty<E>::from(NAN));
  FwdArgs<E> a;
  a.x = p.x.data();
  a.skip = p.s.data();
  a.w = p.w.data();
  a.bias = with_bias ? p.bias.data() : nullptr;
  a.gamma = p.gamma.data();
  a.beta = p.beta.data();
  a.stats = st.data();
  a.y = y.data();
  a.ldx = p.ldx;
  a.lds = p.lds;
  a.ldw = p.ldw;
  a.M = M;
  a.N = N;
  a.D = D;
  a.K = 2 * D;
  const int n_tiles = (N + kBN - 1) / kBN, m_tiles = (M + kBM - 1) / kBM;
  emu::reset(mode, {whole(p.x), whole(p.s), whole(p.w), whole(p.gamma), whole(p.beta)}, {whole(y)});
  const bool ok = emu::launch(m_tiles * n_tiles, kThreads, kFwdSmemBytes,
                              [&] { skip_fuse_fwd_kernel<E, kFwdStages>(a); });
  // Reference: the kernel's fp32 normalization and operand rounding, products summed in
  // double, then the bias.
  double err = 0, ymax = 0;
  bool finite = true;
  std::vector<double> h(2 * D);
  for (int r = 0; r < M; ++r) {
    for (int k = 0; k < 2 * D; ++k)
      h[k] = Ty<E>::operand(std::fmaf((p.z(r, k) - st[r].mean) * st[r].rstd, p.gamma[k], p.beta[k]));
    for (int n = 0; n < N; ++n) {
      double acc = with_bias ? Ty<E>::to(p.bias[n]) : 0.0;
      for (int k = 0; k < 2 * D; ++k) acc += h[k] * Ty<E>::b_operand(Ty<E>::to(p.w[n * p.ldw + k]));
      const double got = Ty<E>::to(y[static_cast<size_t>(r) * N + n]);
      finite &= std::isfinite(got);
      err = std::fmax(err, std::fabs(got - acc) - Ty<E>::eps * std::fabs(acc));
      ymax = std::fmax(ymax, std::fabs(acc));
    }
  }
  if (!finite) err = INFINITY;
  const double tol = 2e-5 * ymax;  // fp32 accumulation over K, beyond the output rounding
  char what[128];
  std::snprintf(what, sizeof what, "fwd GEMM %s M=%d D=%d N=%d bias=%d", Ty<E>::name(), M, D, N,
                with_bias ? 1 : 0);
  log.check(ok && finite && err <= tol, what, err, tol);
}

template <class E>
void test_normalize_rows(int M, int D, uint32_t seed, int mode, Log& log) {
  Problem<E> p = make_problem<E>(M, D, 8, 8, seed);
  const std::vector<RowStats> st = run_stats(p, 1e-6f, mode, log);
  const int r0 = 2, rows = M - 3;
  std::vector<typename Ty<E>::S> h(static_cast<size_t>(rows) * 2 * D, Ty<E>::from(NAN));
  emu::reset(mode, {whole(p.x), whole(p.s), whole(p.gamma), whole(p.beta)}, {whole(h)});
  const bool ok = emu::launch(3, kEltThreads, 0, [&] {
    skip_fuse_normalize_rows_kernel<E>(p.x.data(), p.ldx, p.s.data(), p.lds, st.data(),
                                       p.gamma.data(), p.beta.data(), r0, rows, D, h.data());
  });
  double err = 0;
  for (int i = 0; i < rows; ++i)
    for (int k = 0; k < 2 * D; ++k) {
      const int r = r0 + i;
      const float want = Ty<E>::to(
          Ty<E>::from(std::fmaf((p.z(r, k) - st[r].mean) * st[r].rstd, p.gamma[k], p.beta[k])));
      const float got = Ty<E>::to(h[static_cast<size_t>(i) * 2 * D + k]);
      err = std::isfinite(got) ? std::fmax(err, std::fabs(got - want)) : INFINITY;
    }
  char what[128];
  std::snprintf(what, sizeof what, "normalize_rows %s rows [%d, %d) D=%d (exact)", Ty<E>::name(), r0,
                r0 + rows, D);
  log.check(ok && err == 0, what, err, 0);
}

template <class E>
void test_ln_backward(int M, int D, int grid, uint32_t seed, int mode, Log& log) {
  using S = typename Ty<E>::S;
  Problem<E> p = make_problem<E>(M, D, 8, 8, seed);
  const std::vector<RowStats> st = run_stats(p, 1e-6f, mode, log);
  const int K = 2 * D;
  std::mt19937 rng(seed + 7);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<S> dh(static_cast<size_t>(M) * K);
  for (auto& v : dh) v = Ty<E>::from(nd(rng));
  std::vector<S> gx(static_cast<size_t>(M) * D, Ty<E>::from(NAN)), gs(gx);
  std::vector<float> partial(static_cast<size_t>(grid) * 2 * K, NAN), dg(K, NAN), db(K, NAN);
  emu::reset(mode, {whole(dh), whole(p.x), whole(p.s), whole(p.gamma)},
             {whole(gx), whole(gs), whole(partial)});
  bool ok = emu::launch(grid, kLnThreads, ln_bwd_smem_bytes(D), [&] {
    skip_fuse_ln_bwd_kernel<E>(dh.data(), p.x.data(), p.ldx, p.s.data(), p.lds, st.data(),
                               p.gamma.data(), M, D, gx.data(), gs.data(), partial.data());
  });
  emu::reset(mode, {whole(partial)}, {whole(dg), whole(db)});
  ok &= emu::launch((2 * K + kEltThreads - 1) / kEltThreads, kEltThreads, 0, [&] {
    skip_fuse_col_sums_kernel<F32>(partial.data(), grid, K, dg.data(), db.data());
  });
  // Reference in double from the kernel's statistics.
  double ex = 0, exmax = 0, eg = 0, egmax = 0, eb = 0, ebmax = 0;
  std::vector<double> rg(K, 0), rb(K, 0);
  for (int r = 0; r < M; ++r) {
    const double mu = st[r].mean, rs = st[r].rstd;
    double c1 = 0, c2 = 0;
    for (int k = 0; k < K; ++k) {
      const double xh = (p.z(r, k) - mu) * rs, g = Ty<E>::to(dh[r * K + k]) * p.gamma[k];
      c1 += g;
      c2 += g * xh;
      rg[k] += Ty<E>::to(dh[r * K + k]) * xh;
      rb[k] += Ty<E>::to(dh[r * K + k]);
    }
    c1 /= K;
    c2 /= K;
    for (int k = 0; k < K; ++k) {
      const double xh = (p.z(r, k) - mu) * rs, g = Ty<E>::to(dh[r * K + k]) * p.gamma[k];
      const double want = rs * (g - c1 - xh * c2);
      const double got = Ty<E>::to(k < D ? gx[r * D + k] : gs[r * D + k - D]);
      ex = std::isfinite(got) ? std::fmax(ex, std::fabs(got - want) - Ty<E>::eps * std::fabs(want)) : INFINITY;
      exmax = std::fmax(exmax, std::fabs(want));
    }
  }
  for (int k = 0; k < K; ++k) {
    eg = std::isfinite(dg[k]) ? std::fmax(eg, std::fabs(dg[k] - rg[k])) : INFINITY;
    eb = std::isfinite(db[k]) ? std::fmax(eb, std::fabs(db[k] - rb[k])) : INFINITY;
    egmax = std::fmax(egmax, std::fabs(rg[k]));
    ebmax = std::fmax(ebmax, std::fabs(rb[k]));
  }
  char what[128];
  std::snprintf(what, sizeof what, "ln_bwd %s M=%d D=%d grid=%d: grad_x / grad_skip", Ty<E>::name(), M, D, grid);
  log.check(ok && ex <= 1e-4 * exmax, what, ex, 1e-4 * exmax);
  std::snprintf(what, sizeof what, "ln_bwd %s M=%d D=%d grid=%d: grad_norm_weight", Ty<E>::name(), M, D, grid);
  log.check(ok && eg <= 1e-5 * (1 + egmax), what, eg, 1e-5 * (1 + egmax));
  std::snprintf(what, sizeof what, "ln_bwd %s M=%d D=%d grid=%d: grad_norm_bias", Ty<E>::name(), M, D, grid);
  log.check(ok && eb <= 1e-5 * (1 + ebmax), what, eb, 1e-5 * (1 + ebmax));
}

// Calls f(tag) for dtype 0 fp16, 1 bf16, 2 fp32.
template <class F>
void by_dtype(int dtype, F&& f) {
  if (dtype == 0) {
    f(F16{});
  } else if (dtype == 1) {
    f(BF16{});
  } else {
    f(F32{});
  }
}

}  // namespace

extern "C" {

// mode: emu::Machine::mode bits (1: cp.async lands at its wait; 2: warps one by one).
int emu_skip_fuse_forward(int dtype, int M, int D, int N, int pad, int bias, uint32_t seed, int mode,
                          char* log, int log_len) {
  Log l;
  by_dtype(dtype, [&](auto e) { test_forward<decltype(e)>(M, D, N, pad, bias != 0, seed, mode, l); });
  return l.done(log, log_len);
}

int emu_skip_fuse_normalize_rows(int dtype, int M, int D, uint32_t seed, int mode, char* log,
                                 int log_len) {
  Log l;
  by_dtype(dtype, [&](auto e) { test_normalize_rows<decltype(e)>(M, D, seed, mode, l); });
  return l.done(log, log_len);
}

int emu_skip_fuse_ln_backward(int dtype, int M, int D, int grid, uint32_t seed, int mode, char* log,
                              int log_len) {
  Log l;
  by_dtype(dtype, [&](auto e) { test_ln_backward<decltype(e)>(M, D, grid, seed, mode, l); });
  return l.done(log, log_len);
}

}  // extern "C"
