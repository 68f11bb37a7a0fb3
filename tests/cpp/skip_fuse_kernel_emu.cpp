// Runs the skip_fuse CUDA kernels (csrc/cuda/skip_fuse_kernels.cuh, the same source the
// GPU build compiles) on the CPU and checks their results.
//
// Every CUDA thread of a CTA is an OS thread; __syncthreads is a std::barrier over the
// CTA, warp collectives (__shfl_xor_sync, ldmatrix, mma.sync) exchange registers through
// a per-warp buffer between two warp barriers and compute what the PTX ISA specifies
// (fragment tables of mma.m16n8k16 / m16n8k8, ldmatrix row distribution). cp.async is
// modelled at its latest legal completion: the destination is poisoned (0xff bytes,
// NaN in every dtype) when the copy is issued and written only when the issuing thread
// waits for its group, so a read before the wait, or a refill of a slot that another
// warp still reads, shows up as NaN. CTAs run one after another.
//
// Build: g++ -O1 -std=c++20 -ffp-contract=off -pthread -I csrc -I <cuda include>
//        tests/cpp/skip_fuse_kernel_emu.cpp; exit code 0 when every check passes.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <memory>
#include <random>
#include <thread>
#include <vector>

// ---- CUDA keywords and built-ins as host C++ --------------------------------------
#undef __global__
#undef __device__
#undef __shared__
#undef __launch_bounds__
#define __global__
#define __device__
#define __shared__ static  // one CTA runs at a time, so a static is the CTA's copy
#define __launch_bounds__(...)

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 gridDim;
thread_local dim3 blockDim;

inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t __float_as_uint(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
template <typename T>
T __ldg(const T* p) {
  return *p;
}

namespace skipdit_emu {

struct WarpX {
  uint32_t u[32][8];
  float f[32];
};

struct Cta {
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  std::barrier<>* block_bar = nullptr;
  std::vector<std::unique_ptr<std::barrier<>>> warp_bar;
  std::vector<WarpX> wx;
};

inline Cta* g_cta = nullptr;
thread_local int t_lane = 0, t_warp = 0;

struct Copy {
  uint32_t dst;
  const void* src;
  int bytes;
};
thread_local std::vector<Copy> t_open;               // issued, not yet committed
thread_local std::deque<std::vector<Copy>> t_groups;  // committed, not yet complete
thread_local bool t_bad = false;                      // misuse of the emulated PTX

inline void warp_sync() { g_cta->warp_bar[t_warp]->arrive_and_wait(); }

unsigned char* dynamic_smem() { return g_cta->smem; }
uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(static_cast<const unsigned char*>(p) - g_cta->smem);
}

void cp_async16(uint32_t dst, const void* src, int bytes) {
  if (dst % 16 != 0 || dst + 16 > g_cta->smem_bytes || reinterpret_cast<uintptr_t>(src) % 16 != 0 ||
      (bytes != 0 && bytes != 16)) {
    t_bad = true;
    return;
  }
  std::memset(g_cta->smem + dst, 0xff, 16);
  t_open.push_back({dst, src, bytes});
}
void cp_async_commit() {
  t_groups.push_back(std::move(t_open));
  t_open.clear();
}
void cp_async_wait(int n) {
  while (static_cast<int>(t_groups.size()) > n) {
    for (const Copy& c : t_groups.front()) {
      std::memset(g_cta->smem + c.dst, 0, 16);
      if (c.bytes) std::memcpy(g_cta->smem + c.dst, c.src, 16);
    }
    t_groups.pop_front();
  }
}

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: lanes 8j..8j+7 address the rows of matrix j;
// lane l receives in register j the b16 pair at row l/4, columns 2(l%4), 2(l%4)+1.
void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  WarpX& X = g_cta->wx[t_warp];
  X.u[t_lane][0] = addr;
  warp_sync();
  for (int j = 0; j < 4; ++j) {
    const uint32_t row = X.u[8 * j + t_lane / 4][0];
    if (row % 16 != 0 || row + 16 > g_cta->smem_bytes) t_bad = true;
    else std::memcpy(&r[j], g_cta->smem + row + 4 * (t_lane % 4), 4);
  }
  warp_sync();
}

uint32_t to_tf32(float f) {  // cvt.rna.tf32.f32
  return (__float_as_uint(f) + 0x1000u) & 0xffffe000u;
}

float b16_to_float(uint32_t reg, int hi, int kind) {
  const uint16_t bits = static_cast<uint16_t>(hi ? reg >> 16 : reg & 0xffffu);
  if (kind == 0) return __uint_as_float(static_cast<uint32_t>(bits) << 16);
  __half_raw raw;
  raw.x = bits;
  return __half2float(__half(raw));
}

// mma.sync.aligned.{m16n8k16 bf16/f16, m16n8k8 tf32}.row.col.f32, per the PTX fragment
// tables; every lane rebuilds the warp's A and B and computes its own four outputs.
template <int kKind>
void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  WarpX& X = g_cta->wx[t_warp];
  for (int i = 0; i < 4; ++i) X.u[t_lane][i] = a[i];
  X.u[t_lane][4] = b0;
  X.u[t_lane][5] = b1;
  warp_sync();
  double A[16][16] = {}, B[16][8] = {};
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, t = l & 3;
    if (kKind == 2) {  // tf32: the hardware reads the top 19 bits
      auto v = [&](int i) { return static_cast<double>(__uint_as_float(X.u[l][i] & 0xffffe000u)); };
      A[g][t] = v(0);
      A[g + 8][t] = v(1);
      A[g][t + 4] = v(2);
      A[g + 8][t + 4] = v(3);
      B[t][g] = v(4);
      B[t + 4][g] = v(5);
    } else {
      for (int i = 0; i < 8; ++i) {
        const int row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
        const int col = t * 2 + (i & 1) + (i >= 4 ? 8 : 0);
        A[row][col] = b16_to_float(X.u[l][i / 2], i & 1, kKind);
      }
      for (int i = 0; i < 4; ++i) {
        const int row = t * 2 + (i & 1) + (i >= 2 ? 8 : 0);
        B[row][g] = b16_to_float(X.u[l][4 + i / 2], i & 1, kKind);
      }
    }
  }
  const int kdim = kKind == 2 ? 8 : 16;
  const int g = t_lane >> 2, t = t_lane & 3;
  for (int i = 0; i < 4; ++i) {
    const int row = i < 2 ? g : g + 8, col = t * 2 + (i & 1);
    double s = 0;
    for (int k = 0; k < kdim; ++k) s += A[row][k] * B[k][col];
    d[i] = static_cast<float>(d[i] + s);
  }
  warp_sync();
}

template <class F>
bool launch(unsigned grid, unsigned block, size_t smem_bytes, F body) {
  bool bad = false;
  for (unsigned b = 0; b < grid; ++b) {
    Cta cta;
    std::barrier<> bar(block);
    cta.block_bar = &bar;
    for (unsigned w = 0; w < block / 32; ++w) cta.warp_bar.emplace_back(std::make_unique<std::barrier<>>(32));
    cta.wx.resize(block / 32);
    std::vector<unsigned char> mem(smem_bytes + 256, 0xff);
    cta.smem = mem.data() + (128 - reinterpret_cast<uintptr_t>(mem.data()) % 128);
    cta.smem_bytes = smem_bytes;
    g_cta = &cta;
    std::vector<std::thread> threads;
    std::vector<char> thread_bad(block, 0);
    for (unsigned t = 0; t < block; ++t) {
      threads.emplace_back([&, t] {
        threadIdx = make_uint3(t, 0, 0);
        blockIdx = make_uint3(b, 0, 0);
        gridDim = dim3(grid);
        blockDim = dim3(block);
        t_lane = static_cast<int>(t % 32);
        t_warp = static_cast<int>(t / 32);
        t_open.clear();
        t_groups.clear();
        t_bad = false;
        body();
        if (!t_open.empty() || !t_groups.empty()) t_bad = true;  // copies never waited for
        thread_bad[t] = t_bad;
      });
    }
    for (auto& th : threads) th.join();
    for (char c : thread_bad) bad |= c != 0;
  }
  g_cta = nullptr;
  return !bad;
}

}  // namespace skipdit_emu

inline float __shfl_xor_sync(unsigned /*mask: all lanes in these kernels*/, float v, int o) {
  using namespace skipdit_emu;
  WarpX& X = g_cta->wx[t_warp];
  X.f[t_lane] = v;
  warp_sync();
  const float r = X.f[t_lane ^ o];
  warp_sync();
  return r;
}
inline void __syncthreads() { skipdit_emu::g_cta->block_bar->arrive_and_wait(); }

#define SKIPDIT_SF_EMULATE 1
#include "cuda/skip_fuse_kernels.cuh"

// ---------------------------------------------------------------------------------
namespace {

using skipdit::FwdArgs;
namespace sf = skipdit::sf;

int g_fails = 0;

void check(bool ok, const char* what, double err, double tol) {
  std::printf("%s %-58s err %.3e tol %.3e\n", ok ? "ok  " : "FAIL", what, err, tol);
  if (!ok) ++g_fails;
}

template <typename T>
struct Ty;
template <>
struct Ty<__nv_bfloat16> {
  static __nv_bfloat16 from(float f) { return __float2bfloat16_rn(f); }
  static float to(__nv_bfloat16 v) { return __bfloat162float(v); }
  static float operand(float f) { return to(from(f)); }
  static float b_operand(float f) { return f; }
  static constexpr double eps = 1.0 / 256;  // output rounding (2 ulp)
  static const char* name() { return "bf16"; }
};
template <>
struct Ty<__half> {
  static __half from(float f) { return __float2half_rn(f); }
  static float to(__half v) { return __half2float(v); }
  static float operand(float f) { return to(from(f)); }
  static float b_operand(float f) { return f; }
  static constexpr double eps = 1.0 / 2048;
  static const char* name() { return "fp16"; }
};
template <>
struct Ty<float> {
  static float from(float f) { return f; }
  static float to(float v) { return v; }
  static float operand(float f) { return __uint_as_float(skipdit_emu::to_tf32(f)); }
  static float b_operand(float f) { return operand(f); }
  static constexpr double eps = 1e-6;
  static const char* name() { return "fp32/tf32"; }
};

template <typename T>
struct Problem {
  int M, D, N;
  int64_t ldx, lds, ldw;
  std::vector<T> x, s, w, bias;
  std::vector<float> gamma, beta;  // [2D]
  float z(int r, int k) const { return Ty<T>::to(k < D ? x[r * ldx + k] : s[r * lds + k - D]); }
};

template <typename T>
Problem<T> make_problem(int M, int D, int N, int pad, uint32_t seed) {
  Problem<T> p{M, D, N, D + pad, D + 2 * pad, 2 * D + pad, {}, {}, {}, {}, {}, {}};
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  p.x.resize(M * p.ldx);
  p.s.resize(M * p.lds);
  for (int r = 0; r < M; ++r) {
    // Row families: normal, offset 1000 std, one outlier channel.
    const float off = r % 3 == 1 ? 1000.f : 0.f;
    for (int64_t k = 0; k < p.ldx; ++k) p.x[r * p.ldx + k] = Ty<T>::from(off + nd(rng));
    for (int64_t k = 0; k < p.lds; ++k) p.s[r * p.lds + k] = Ty<T>::from(off + nd(rng));
    if (r % 3 == 2) p.s[r * p.lds + (r % D)] = Ty<T>::from(500.f);
  }
  p.w.resize(N * p.ldw);
  for (auto& v : p.w) v = Ty<T>::from(nd(rng) / std::sqrt(2.f * D));
  p.bias.resize(N);
  for (auto& v : p.bias) v = Ty<T>::from(nd(rng));
  p.gamma.resize(2 * D);
  p.beta.resize(2 * D);
  for (auto& v : p.gamma) v = 1.f + 0.2f * nd(rng);
  for (auto& v : p.beta) v = 0.2f * nd(rng);
  return p;
}

// Row statistics (kernel) vs a double two-pass computation on the same inputs.
template <typename T>
std::vector<float2> run_stats(const Problem<T>& p, float eps) {
  std::vector<float2> st(p.M, make_float2(NAN, NAN));
  const unsigned blocks = (p.M + skipdit::kStatsThreads / 32 - 1) / (skipdit::kStatsThreads / 32);
  const bool ok = skipdit_emu::launch(blocks, skipdit::kStatsThreads, 0, [&] {
    skipdit::row_stats_kernel<T>(p.x.data(), p.ldx, p.s.data(), p.lds, p.M, p.D, eps, st.data());
  });
  double emean = 0, erstd = 0;
  for (int r = 0; r < p.M; ++r) {
    double m = 0, q = 0;
    for (int k = 0; k < 2 * p.D; ++k) m += p.z(r, k);
    m /= 2 * p.D;
    for (int k = 0; k < 2 * p.D; ++k) q += (p.z(r, k) - m) * (p.z(r, k) - m);
    const double rs = 1 / std::sqrt(q / (2 * p.D) + eps);
    emean = std::fmax(emean, std::fabs(st[r].x - m) / (1 + std::fabs(m)));
    erstd = std::fmax(erstd, std::fabs(st[r].y - rs) / rs);
  }
  char what[128];
  std::snprintf(what, sizeof what, "row_stats %s M=%d D=%d: mean (rel)", Ty<T>::name(), p.M, p.D);
  check(ok && emean <= 1e-6, what, emean, 1e-6);
  std::snprintf(what, sizeof what, "row_stats %s M=%d D=%d: rstd (rel)", Ty<T>::name(), p.M, p.D);
  check(ok && erstd <= 2e-6, what, erstd, 2e-6);
  return st;
}

template <typename T>
void test_forward(int M, int D, int N, int pad, bool with_bias, uint32_t seed) {
  Problem<T> p = make_problem<T>(M, D, N, pad, seed);
  const std::vector<float2> st = run_stats(p, 1e-6f);
  std::vector<T> y(static_cast<size_t>(M) * N, Ty<T>::from(NAN));
  FwdArgs<T> a;
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
  const int n_tiles = (N + sf::kBN - 1) / sf::kBN, m_tiles = (M + sf::kBM - 1) / sf::kBM;
  const bool ok = skipdit_emu::launch(m_tiles * n_tiles, sf::kThreads,
                                      skipdit::kFwdStages * sf::kStageBytes, [&] {
    skipdit::skip_fuse_fwd_kernel<T, skipdit::kFwdStages>(a);
  });
  // Reference: the kernel's fp32 normalization and operand rounding, products summed in
  // double, then the bias.
  double err = 0, ymax = 0;
  bool finite = true;
  std::vector<double> h(2 * D);
  for (int r = 0; r < M; ++r) {
    for (int k = 0; k < 2 * D; ++k)
      h[k] = Ty<T>::operand(std::fmaf((p.z(r, k) - st[r].x) * st[r].y, p.gamma[k], p.beta[k]));
    for (int n = 0; n < N; ++n) {
      double acc = with_bias ? Ty<T>::to(p.bias[n]) : 0.0;
      for (int k = 0; k < 2 * D; ++k) acc += h[k] * Ty<T>::b_operand(Ty<T>::to(p.w[n * p.ldw + k]));
      const double got = Ty<T>::to(y[static_cast<size_t>(r) * N + n]);
      finite &= std::isfinite(got);
      err = std::fmax(err, std::fabs(got - acc) - Ty<T>::eps * std::fabs(acc));
      ymax = std::fmax(ymax, std::fabs(acc));
    }
  }
  if (!finite) err = INFINITY;
  const double tol = 2e-5 * ymax;  // fp32 accumulation over K, beyond the output rounding
  char what[128];
  std::snprintf(what, sizeof what, "fwd GEMM %s M=%d D=%d N=%d bias=%d", Ty<T>::name(), M, D, N,
                with_bias ? 1 : 0);
  check(ok && finite && err <= tol, what, err, tol);
}

template <typename T>
void test_normalize_rows(int M, int D, uint32_t seed) {
  Problem<T> p = make_problem<T>(M, D, 8, 8, seed);
  const std::vector<float2> st = run_stats(p, 1e-6f);
  const int r0 = 2, rows = M - 3;
  std::vector<T> h(static_cast<size_t>(rows) * 2 * D, Ty<T>::from(NAN));
  const bool ok = skipdit_emu::launch(3, skipdit::kEltThreads, 0, [&] {
    skipdit::normalize_rows_kernel<T>(p.x.data(), p.ldx, p.s.data(), p.lds, st.data(), p.gamma.data(),
                                      p.beta.data(), r0, rows, D, h.data());
  });
  double err = 0;
  for (int i = 0; i < rows; ++i)
    for (int k = 0; k < 2 * D; ++k) {
      const int r = r0 + i;
      const float want = Ty<T>::to(Ty<T>::from(std::fmaf((p.z(r, k) - st[r].x) * st[r].y, p.gamma[k], p.beta[k])));
      const float got = Ty<T>::to(h[static_cast<size_t>(i) * 2 * D + k]);
      err = std::isfinite(got) ? std::fmax(err, std::fabs(got - want)) : INFINITY;
    }
  char what[128];
  std::snprintf(what, sizeof what, "normalize_rows %s rows [%d, %d) D=%d (exact)", Ty<T>::name(), r0, r0 + rows, D);
  check(ok && err == 0, what, err, 0);
}

template <typename T>
void test_ln_backward(int M, int D, int grid, uint32_t seed) {
  Problem<T> p = make_problem<T>(M, D, 8, 8, seed);
  const std::vector<float2> st = run_stats(p, 1e-6f);
  const int K = 2 * D;
  std::mt19937 rng(seed + 7);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<T> dh(static_cast<size_t>(M) * K);
  for (auto& v : dh) v = Ty<T>::from(nd(rng));
  std::vector<T> gx(static_cast<size_t>(M) * D, Ty<T>::from(NAN)), gs(gx);
  std::vector<float> partial(static_cast<size_t>(grid) * 2 * K, NAN), dg(K, NAN), db(K, NAN);
  bool ok = skipdit_emu::launch(grid, skipdit::kLnThreads, 2 * K * sizeof(float), [&] {
    skipdit::ln_bwd_kernel<T>(dh.data(), p.x.data(), p.ldx, p.s.data(), p.lds, st.data(), p.gamma.data(),
                              M, D, gx.data(), gs.data(), partial.data());
  });
  ok &= skipdit_emu::launch((2 * K + skipdit::kEltThreads - 1) / skipdit::kEltThreads, skipdit::kEltThreads, 0, [&] {
    skipdit::reduce_partials_kernel<float>(partial.data(), grid, K, dg.data(), db.data());
  });
  // Reference in double from the kernel's statistics.
  double ex = 0, exmax = 0, eg = 0, egmax = 0, eb = 0, ebmax = 0;
  std::vector<double> rg(K, 0), rb(K, 0);
  for (int r = 0; r < M; ++r) {
    const double mu = st[r].x, rs = st[r].y;
    double c1 = 0, c2 = 0;
    for (int k = 0; k < K; ++k) {
      const double xh = (p.z(r, k) - mu) * rs, g = Ty<T>::to(dh[r * K + k]) * p.gamma[k];
      c1 += g;
      c2 += g * xh;
      rg[k] += Ty<T>::to(dh[r * K + k]) * xh;
      rb[k] += Ty<T>::to(dh[r * K + k]);
    }
    c1 /= K;
    c2 /= K;
    for (int k = 0; k < K; ++k) {
      const double xh = (p.z(r, k) - mu) * rs, g = Ty<T>::to(dh[r * K + k]) * p.gamma[k];
      const double want = rs * (g - c1 - xh * c2);
      const double got = Ty<T>::to(k < D ? gx[r * D + k] : gs[r * D + k - D]);
      ex = std::isfinite(got) ? std::fmax(ex, std::fabs(got - want) - Ty<T>::eps * std::fabs(want)) : INFINITY;
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
  std::snprintf(what, sizeof what, "ln_bwd %s M=%d D=%d grid=%d: grad_x / grad_skip", Ty<T>::name(), M, D, grid);
  check(ok && ex <= 1e-4 * exmax, what, ex, 1e-4 * exmax);
  std::snprintf(what, sizeof what, "ln_bwd %s M=%d D=%d grid=%d: grad_norm_weight", Ty<T>::name(), M, D, grid);
  check(ok && eg <= 1e-5 * (1 + egmax), what, eg, 1e-5 * (1 + egmax));
  std::snprintf(what, sizeof what, "ln_bwd %s M=%d D=%d grid=%d: grad_norm_bias", Ty<T>::name(), M, D, grid);
  check(ok && eb <= 1e-5 * (1 + ebmax), what, eb, 1e-5 * (1 + ebmax));
}

}  // namespace

int main() {
  // Forward GEMM: ragged M (2 tiles), ragged N (128 + 8), K = 144 (ragged last k-tile,
  // x/skip boundary inside a k-tile), padded row strides; one row; exact tiles.
  test_forward<__nv_bfloat16>(165, 72, 136, 8, true, 1);
  test_forward<__half>(165, 72, 136, 24, true, 2);
  test_forward<float>(165, 72, 136, 8, true, 3);
  test_forward<__nv_bfloat16>(1, 200, 64, 0, false, 4);
  test_forward<float>(1, 200, 64, 16, false, 5);
  test_forward<__nv_bfloat16>(128, 64, 128, 0, true, 6);
  test_normalize_rows<__nv_bfloat16>(37, 72, 7);
  test_normalize_rows<float>(37, 200, 8);
  // LayerNorm backward: several rows per CTA (both reduction slots), D not a multiple
  // of 256 chunks, partial sums over several CTAs.
  test_ln_backward<__nv_bfloat16>(37, 72, 5, 9);
  test_ln_backward<__half>(20, 1152, 3, 10);
  test_ln_backward<float>(37, 200, 4, 11);
  std::printf(g_fails ? "FAILED (%d)\n" : "all ok\n", g_fails);
  return g_fails ? 1 : 0;
}
