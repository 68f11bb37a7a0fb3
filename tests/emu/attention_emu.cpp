// CPU emulator of the CUDA attention kernels (csrc/cuda/attention_fwd.cuh).
//
// The kernel bodies are compiled unchanged by g++; what this file supplies is the
// hardware they are written against (the primitives of csrc/cuda/attention_hw.cuh),
// implemented from the PTX ISA's definitions, independently of the kernel code:
//   - every CUDA thread is a fiber (ucontext); a CTA's threads run round-robin and
//     switch only at synchronizing operations, so warp-collective instructions
//     (ldmatrix, mma, shfl, syncwarp) see all 32 lanes' operands at once;
//   - ldmatrix and mma.m16n8k16 / m16n8k8 rebuild the matrices from the per-lane
//     fragments with the PTX ISA's layouts (groupID = lane >> 2, threadID_in_group =
//     lane % 4) and compute in fp32 from exact 16-bit products;
//   - cp.async copies are queued per thread and performed at cp.async.wait_group time
//     (mode bit 0 set, "deferred": reading shared memory before the wait shows up) or
//     at issue; shared memory starts as NaN bit patterns;
//   - threads are scheduled round-robin (warps advance in near lockstep) or, with mode
//     bit 1, warp by warp: each warp runs until it blocks at __syncthreads before the
//     next one runs, so a warp that overwrites a buffer other warps still read (a
//     missing barrier) shows up;
//   - every shared-memory access is checked for bounds and alignment, every global read
//     against the input tensors' storage, every global write against the outputs;
//     ldmatrix / mma / shfl must be executed by all 32 lanes together.
// The first violation is reported as an error string (the kernel result is then void).
//
// Build: g++ -O2 -std=c++20 -shared -fPIC -I csrc tests/emu/attention_emu.cpp
// (tests/test_attention_cuda.py does this and calls emu_attention_forward via ctypes).
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <functional>
#include <string>
#include <type_traits>
#include <vector>

#define SKIPDIT_ATTN_EMULATION 1
#define SKIPDIT_DEV inline
#define SKIPDIT_HD

namespace skipdit::attn {

struct F16 {};
struct BF16 {};
struct alignas(16) U128 {
  uint32_t w[4];
};

SKIPDIT_DEV void cp_async16(void* smem_dst, const void* gmem_src, bool valid);
SKIPDIT_DEV void cp_async_commit();
void cp_async_wait_n(int n);
template <int N>
SKIPDIT_DEV void cp_async_wait() {
  cp_async_wait_n(N);
}
SKIPDIT_DEV void ldsm_x4(uint32_t (&r)[4], const void* p);
SKIPDIT_DEV void ldsm_x2(uint32_t (&r)[2], const void* p);
SKIPDIT_DEV void ldsm_x4_trans(uint32_t (&r)[4], const void* p);
SKIPDIT_DEV void ldsm_x2_trans(uint32_t (&r)[2], const void* p);
template <class E>
void mma_k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <class E>
void mma_k8(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t b0);
template <class E>
uint32_t pack2(float lo, float hi);
SKIPDIT_DEV float shfl_xor(float v, int mask);
SKIPDIT_DEV void block_sync();
SKIPDIT_DEV void warp_sync();
SKIPDIT_DEV float fast_exp2(float x) { return std::exp2(x); }
SKIPDIT_DEV float fast_log2(float x) { return std::log2(x); }
SKIPDIT_DEV void opaque(int64_t&) {}
SKIPDIT_DEV void st_shared_u32(void* p, uint32_t v);
SKIPDIT_DEV U128 ld_shared_v4(const void* p);
SKIPDIT_DEV void st_global_v4(void* p, const U128& v);
SKIPDIT_DEV void st_global_f32(float* p, float v);

}  // namespace skipdit::attn

#include "cuda/attention_fwd.cuh"

namespace emu {

using skipdit::attn::BF16;
using skipdit::attn::F16;
using skipdit::attn::U128;

// ---------------------------------------------------------------------------------
// 16-bit formats

float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float f16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: man * 2^-24
    const float f = std::ldexp(static_cast<float>(man), -24);
    return sign ? -f : f;
  }
  if (exp == 31) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf, nan
  return bits_to_float(sign | ((exp + 112) << 23) | (man << 13));
}
uint16_t float_to_f16(float f) {  // round to nearest even
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a >= 0x7f800000u) return sign | (a > 0x7f800000u ? 0x7e00 : 0x7c00);
  if (a >= 0x477ff000u) return sign | 0x7c00;  // >= 65520 rounds to inf
  if (a < 0x38800000u) {                        // below 2^-14: a multiple of 2^-24
    return sign | static_cast<uint16_t>(std::nearbyint(bits_to_float(a) * 16777216.0f));
  }
  uint32_t r = a - 0x38000000u;  // rebias the exponent (127 -> 15)
  r += 0xfffu + ((r >> 13) & 1u);
  return sign | static_cast<uint16_t>(r >> 13);
}
float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }
uint16_t float_to_bf16(float f) {  // round to nearest even
  uint32_t u = float_to_bits(f);
  if (std::isnan(f)) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
template <class E>
float to_float(uint16_t h) {
  if constexpr (std::is_same_v<E, F16>) {
    return f16_to_float(h);
  } else {
    return bf16_to_float(h);
  }
}
template <class E>
uint16_t from_float(float f) {
  if constexpr (std::is_same_v<E, F16>) {
    return float_to_f16(f);
  } else {
    return float_to_bf16(f);
  }
}
uint16_t lo16(uint32_t r) { return static_cast<uint16_t>(r & 0xffffu); }
uint16_t hi16(uint32_t r) { return static_cast<uint16_t>(r >> 16); }

// ---------------------------------------------------------------------------------
// Machine state

struct Range {
  const char* lo;
  const char* hi;  // exclusive
  const char* name;
};

struct Copy {
  char* dst;
  const char* src;
  bool valid;
};

struct Thread {
  ucontext_t ctx;
  std::vector<char> stack;
  bool done = false;
  bool at_barrier = false;  // waiting in block_sync for generation barrier_gen to end
  uint64_t barrier_gen = 0;
  int tid = 0;
  std::vector<Copy> open;               // issued since the last commit
  std::deque<std::vector<Copy>> groups;  // committed, not yet complete
};

struct Slot {
  uint32_t w[16];
};

struct Warp {
  int arrived = 0;
  uint64_t gen = 0;
  int kind = 0;
  Slot in[32];
  Slot out[32];
};

enum Kind { kLdsmX4 = 1, kLdsmX2, kLdsmX4T, kLdsmX2T, kMmaK16F16, kMmaK16BF16, kMmaK8F16, kMmaK8BF16, kShfl, kSyncWarp };

struct Machine {
  // configuration of the current launch
  int mode = 1;  // bit 0: cp.async performed at wait_group (else at issue);
                 // bit 1: warp-by-warp scheduling (else round-robin over threads)
  std::vector<Range> readable;
  std::vector<Range> writable;
  std::string error;
  // current CTA
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  ucontext_t sched;
  int cur = 0;
  int live = 0;
  char* smem = nullptr;
  size_t smem_bytes = 0;
  int bar_arrived = 0;
  uint64_t bar_gen = 0;
  uint64_t progress = 0;
  std::function<void(int)> body;
};

Machine M;

void fail(const std::string& what) {
  if (M.error.empty()) M.error = what;
}

Thread& me() { return M.threads[M.cur]; }

void yield_() { swapcontext(&M.threads[M.cur].ctx, &M.sched); }

bool in_smem(const void* p, size_t n, size_t align) {
  const char* c = static_cast<const char*>(p);
  return c >= M.smem && c + n <= M.smem + M.smem_bytes &&
         reinterpret_cast<uintptr_t>(c) % align == 0;
}
bool in_ranges(const std::vector<Range>& rs, const void* p, size_t n, size_t align) {
  const char* c = static_cast<const char*>(p);
  if (reinterpret_cast<uintptr_t>(c) % align != 0) return false;
  for (const auto& r : rs) {
    if (c >= r.lo && c + n <= r.hi) return true;
  }
  return false;
}

std::string where() { return " (thread " + std::to_string(M.cur) + ")"; }

// A warp-collective operation: every lane deposits its operands; the last lane to
// arrive computes all lanes' results (the operation happens once, with every operand
// present); each lane then takes its own result.
template <class F>
Slot collective(int kind, const Slot& in, F compute) {
  const int lane = M.cur % 32;
  Warp& w = M.warps[M.cur / 32];
  if (w.arrived == 0) {
    w.kind = kind;
  } else if (w.kind != kind) {
    fail("lanes of one warp execute different collective operations (kinds " +
         std::to_string(w.kind) + " and " + std::to_string(kind) + ")" + where());
  }
  w.in[lane] = in;
  const uint64_t gen = w.gen;
  if (++w.arrived == 32) {
    compute(w.in, w.out);
    w.arrived = 0;
    ++w.gen;
    ++M.progress;
  } else {
    while (w.gen == gen) yield_();
  }
  return w.out[lane];
}

// ldmatrix .m8n8 .b16: lane 8*i + r addresses row r of matrix i; register i of lane l
// holds row l/4, columns 2*(l%4), 2*(l%4)+1 (with .trans: rows 2*(l%4), 2*(l%4)+1 of
// column l/4).
template <int N, bool kTrans>
void ldsm(uint32_t* r, const void* p, int kind) {
  Slot in{};
  const uint64_t a = reinterpret_cast<uint64_t>(p);
  in.w[0] = static_cast<uint32_t>(a);
  in.w[1] = static_cast<uint32_t>(a >> 32);
  Slot out = collective(kind, in, [](const Slot* ins, Slot* outs) {
    const uint16_t* row[32];
    for (int l = 0; l < 8 * N; ++l) {
      const uint64_t addr = ins[l].w[0] | (static_cast<uint64_t>(ins[l].w[1]) << 32);
      row[l] = reinterpret_cast<const uint16_t*>(addr);
      if (!in_smem(row[l], 16, 16)) {
        fail("ldmatrix row address out of shared memory or not 16-byte aligned (lane " +
             std::to_string(l) + ", offset " +
             std::to_string(reinterpret_cast<const char*>(row[l]) - M.smem) + ")");
        for (int k = 0; k < 32; ++k) std::memset(&outs[k], 0, sizeof(Slot));
        return;
      }
    }
    for (int l = 0; l < 32; ++l) {
      for (int i = 0; i < N; ++i) {
        uint16_t e0, e1;
        if (!kTrans) {
          e0 = row[8 * i + l / 4][2 * (l % 4)];
          e1 = row[8 * i + l / 4][2 * (l % 4) + 1];
        } else {
          e0 = row[8 * i + 2 * (l % 4)][l / 4];
          e1 = row[8 * i + 2 * (l % 4) + 1][l / 4];
        }
        outs[l].w[i] = static_cast<uint32_t>(e0) | (static_cast<uint32_t>(e1) << 16);
      }
    }
  });
  for (int i = 0; i < N; ++i) r[i] = out.w[i];
}

// mma.m16n8k{16,8}.row.col.f32: A 16xK row-major fragments, B Kx8 col-major fragments,
// C/D 16x8 fp32. Layouts (PTX ISA, matrix fragments for mma.m16n8k16 / m16n8k8 with
// .f16/.bf16): g = lane >> 2, t = lane % 4;
//   A (k16): a0,a1: (g, 2t+i)  a2,a3: (g+8, 2t+i)  a4,a5: (g, 2t+8+i)  a6,a7: (g+8, 2t+8+i)
//   A (k8):  a0,a1: (g, 2t+i)  a2,a3: (g+8, 2t+i)
//   B (k16): b0,b1: (2t+i, g)  b2,b3: (2t+8+i, g);  B (k8): b0,b1: (2t+i, g)
//   C/D:     c0,c1: (g, 2t+i)  c2,c3: (g+8, 2t+i)
// with element pairs packed low half first.
template <class E, int K>
void mma(float (&d)[4], const uint32_t* a, const uint32_t* b, int kind) {
  Slot in{};
  for (int i = 0; i < K / 4; ++i) in.w[i] = a[i];
  for (int i = 0; i < K / 8; ++i) in.w[4 + i] = b[i];
  for (int i = 0; i < 4; ++i) in.w[8 + i] = float_to_bits(d[i]);
  Slot out = collective(kind, in, [](const Slot* ins, Slot* outs) {
    float A[16][16], B[16][8], C[16][8];
    for (int l = 0; l < 32; ++l) {
      const int g = l >> 2, t = l & 3;
      const Slot& s = ins[l];
      for (int i = 0; i < 2; ++i) {
        auto el = [&](uint32_t reg) { return to_float<E>(i == 0 ? lo16(reg) : hi16(reg)); };
        A[g][2 * t + i] = el(s.w[0]);
        A[g + 8][2 * t + i] = el(s.w[1]);
        if (K == 16) {
          A[g][2 * t + 8 + i] = el(s.w[2]);
          A[g + 8][2 * t + 8 + i] = el(s.w[3]);
        }
        B[2 * t + i][g] = el(s.w[4]);
        if (K == 16) B[2 * t + 8 + i][g] = el(s.w[5]);
        C[g][2 * t + i] = bits_to_float(s.w[8 + i]);
        C[g + 8][2 * t + i] = bits_to_float(s.w[10 + i]);
      }
    }
    for (int l = 0; l < 32; ++l) {
      const int g = l >> 2, t = l & 3;
      for (int q = 0; q < 4; ++q) {
        const int row = g + 8 * (q >> 1), col = 2 * t + (q & 1);
        float acc = C[row][col];
        for (int k = 0; k < K; ++k) acc += A[row][k] * B[k][col];  // exact 16-bit products
        outs[l].w[q] = float_to_bits(acc);
      }
    }
  });
  for (int i = 0; i < 4; ++i) d[i] = bits_to_float(out.w[i]);
}

void perform(const Copy& c) {
  if (c.valid) {
    std::memcpy(c.dst, c.src, 16);
  } else {
    std::memset(c.dst, 0, 16);
  }
}

// ---------------------------------------------------------------------------------
// Fibers

void fiber_entry() {
  const int tid = M.cur;
  M.body(tid);
  M.threads[tid].done = true;
  --M.live;
  ++M.progress;
  // The scheduler resumes no finished fiber; uc_link returns to it.
}

// Runs one CTA of `threads` threads; returns false on deadlock.
bool run_cta(int threads) {
  M.threads.assign(threads, Thread{});
  M.warps.assign((threads + 31) / 32, Warp{});
  M.live = threads;
  M.bar_arrived = 0;
  for (int i = 0; i < threads; ++i) {
    Thread& t = M.threads[i];
    t.tid = i;
    t.stack.resize(128 * 1024);
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = t.stack.data();
    t.ctx.uc_stack.ss_size = t.stack.size();
    t.ctx.uc_link = &M.sched;
    makecontext(&t.ctx, fiber_entry, 0);
  }
  auto runnable = [](const Thread& t) {
    return !t.done && !(t.at_barrier && t.barrier_gen == M.bar_gen);
  };
  auto resume = [](int i) {
    M.cur = i;
    swapcontext(&M.sched, &M.threads[i].ctx);
    // a barrier whose last missing threads have exited
    if (M.bar_arrived > 0 && M.bar_arrived == M.live) {
      M.bar_arrived = 0;
      ++M.bar_gen;
      ++M.progress;
    }
  };
  const bool by_warp = (M.mode & 2) != 0;
  int idle_passes = 0;
  while (M.live > 0) {
    const uint64_t before = M.progress;
    if (by_warp) {
      for (int w0 = 0; w0 < threads; w0 += 32) {
        const int w1 = w0 + 32 < threads ? w0 + 32 : threads;
        for (bool ran = true; ran;) {
          ran = false;
          for (int i = w0; i < w1; ++i) {
            if (!runnable(M.threads[i])) continue;
            const uint64_t p0 = M.progress;
            resume(i);
            ran = ran || M.progress != p0 || !runnable(M.threads[i]);
          }
        }
      }
    } else {
      for (int i = 0; i < threads; ++i) {
        if (!M.threads[i].done) resume(i);
      }
    }
    if (M.progress == before) {
      if (++idle_passes > 2) {
        fail("deadlock: threads wait at a barrier that not all threads reach");
        return false;
      }
    } else {
      idle_passes = 0;
    }
  }
  return true;
}

}  // namespace emu

// ---------------------------------------------------------------------------------
// The primitives

namespace skipdit::attn {

using emu::M;

void cp_async16(void* smem_dst, const void* gmem_src, bool valid) {
  if (!emu::in_smem(smem_dst, 16, 16)) {
    emu::fail("cp.async destination out of shared memory or misaligned" + emu::where());
    return;
  }
  if (valid && !emu::in_ranges(M.readable, gmem_src, 16, 16)) {
    emu::fail("cp.async reads outside the input tensors or misaligned" + emu::where());
    valid = false;
  }
  emu::Copy c{static_cast<char*>(smem_dst), static_cast<const char*>(gmem_src), valid};
  if ((M.mode & 1) == 0) {
    emu::perform(c);
  } else {
    emu::me().open.push_back(c);
  }
}

void cp_async_commit() {
  auto& t = emu::me();
  t.groups.push_back(std::move(t.open));
  t.open.clear();
}

void cp_async_wait_n(int n) {
  auto& t = emu::me();
  while (static_cast<int>(t.groups.size()) > n) {
    for (const auto& c : t.groups.front()) emu::perform(c);
    t.groups.pop_front();
  }
}

void ldsm_x4(uint32_t (&r)[4], const void* p) { emu::ldsm<4, false>(r, p, emu::kLdsmX4); }
void ldsm_x2(uint32_t (&r)[2], const void* p) { emu::ldsm<2, false>(r, p, emu::kLdsmX2); }
void ldsm_x4_trans(uint32_t (&r)[4], const void* p) { emu::ldsm<4, true>(r, p, emu::kLdsmX4T); }
void ldsm_x2_trans(uint32_t (&r)[2], const void* p) { emu::ldsm<2, true>(r, p, emu::kLdsmX2T); }

template <>
void mma_k16<F16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const uint32_t b[2] = {b0, b1};
  emu::mma<F16, 16>(d, a, b, emu::kMmaK16F16);
}
template <>
void mma_k16<BF16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const uint32_t b[2] = {b0, b1};
  emu::mma<BF16, 16>(d, a, b, emu::kMmaK16BF16);
}
template <>
void mma_k8<F16>(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t b0) {
  const uint32_t a[2] = {a0, a1};
  emu::mma<F16, 8>(d, a, &b0, emu::kMmaK8F16);
}
template <>
void mma_k8<BF16>(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t b0) {
  const uint32_t a[2] = {a0, a1};
  emu::mma<BF16, 8>(d, a, &b0, emu::kMmaK8BF16);
}

template <>
uint32_t pack2<F16>(float lo, float hi) {
  return emu::float_to_f16(lo) | (static_cast<uint32_t>(emu::float_to_f16(hi)) << 16);
}
template <>
uint32_t pack2<BF16>(float lo, float hi) {
  return emu::float_to_bf16(lo) | (static_cast<uint32_t>(emu::float_to_bf16(hi)) << 16);
}

float shfl_xor(float v, int mask) {
  emu::Slot in{};
  in.w[0] = emu::float_to_bits(v);
  in.w[1] = static_cast<uint32_t>(mask);
  emu::Slot out = emu::collective(emu::kShfl, in, [](const emu::Slot* ins, emu::Slot* outs) {
    for (int l = 0; l < 32; ++l) {
      if (ins[l].w[1] != ins[0].w[1]) emu::fail("shfl_xor with different masks across lanes");
      outs[l].w[0] = ins[l ^ (ins[0].w[1] & 31)].w[0];
    }
  });
  return emu::bits_to_float(out.w[0]);
}

void warp_sync() {
  emu::collective(emu::kSyncWarp, emu::Slot{}, [](const emu::Slot*, emu::Slot*) {});
}

void block_sync() {
  const uint64_t gen = M.bar_gen;
  if (++M.bar_arrived == M.live) {
    M.bar_arrived = 0;
    ++M.bar_gen;
    ++M.progress;
    return;
  }
  auto& t = emu::me();
  t.at_barrier = true;
  t.barrier_gen = gen;
  while (M.bar_gen == gen) emu::yield_();
  t.at_barrier = false;
}

void st_shared_u32(void* p, uint32_t v) {
  if (!emu::in_smem(p, 4, 4)) {
    emu::fail("shared store out of bounds or misaligned" + emu::where());
    return;
  }
  std::memcpy(p, &v, 4);
}

U128 ld_shared_v4(const void* p) {
  U128 v{};
  if (!emu::in_smem(p, 16, 16)) {
    emu::fail("shared 16-byte load out of bounds or misaligned" + emu::where());
    return v;
  }
  std::memcpy(&v, p, 16);
  return v;
}

void st_global_v4(void* p, const U128& v) {
  if (!emu::in_ranges(M.writable, p, 16, 16)) {
    emu::fail("global 16-byte store outside the outputs or misaligned" + emu::where());
    return;
  }
  std::memcpy(p, &v, 16);
}

void st_global_f32(float* p, float v) {
  if (!emu::in_ranges(M.writable, p, 4, 4)) {
    emu::fail("global fp32 store outside the outputs or misaligned" + emu::where());
    return;
  }
  *p = v;
}

}  // namespace skipdit::attn

// ---------------------------------------------------------------------------------
// Entry point

namespace {

template <class E>
void run_all(skipdit::attn::FwdParams p, int64_t cta_begin, int64_t cta_end, char* info, int info_len) {
  using namespace skipdit::attn;
  plan(p, [&](auto cfg, auto is_short, const LaunchShape& shape) {
    using C = typename decltype(cfg)::type;
    constexpr bool kShort = decltype(is_short)::value;
    std::snprintf(info, info_len, "%s kDh=%d grid=%lld threads=%d smem=%d", kShort ? "short" : "main",
                  C::kDh, static_cast<long long>(shape.grid), shape.threads, shape.smem);
    if (shape.smem > shape.max_smem) emu::fail("launch asks for more shared memory than allowed");
    std::vector<char> smem(shape.smem);
    M.smem = smem.data();
    M.smem_bytes = smem.size();
    const int64_t end = cta_end < 0 || cta_end > shape.grid ? shape.grid : cta_end;
    for (int64_t block = cta_begin; block < end && M.error.empty(); ++block) {
      std::memset(smem.data(), 0xff, smem.size());  // NaN in fp16 and bf16
      if constexpr (kShort) {
        M.body = [&](int tid) { fwd_short<C, E>(p, smem.data(), tid, shape.threads / 32, block); };
      } else {
        M.body = [&](int tid) { fwd_main<C, E>(p, smem.data(), tid, block); };
      }
      if (!emu::run_cta(shape.threads)) break;
    }
  });
}

}  // namespace

extern "C" {

// The emulator's 16-bit conversions, exposed for a check against torch's.
void emu_convert(int dtype, const float* in, uint16_t* out, float* back, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    out[i] = dtype == 0 ? emu::float_to_f16(in[i]) : emu::float_to_bf16(in[i]);
    back[i] = dtype == 0 ? emu::f16_to_float(out[i]) : emu::bf16_to_float(out[i]);
  }
}

// Runs the attention forward kernels on the CPU. dtype: 0 fp16, 1 bf16. mode: bits as
// in Machine::mode. strides: q, k,
// v element strides for B, N, H (9 values). ranges: [lo, hi) byte addresses of the
// storage the kernel may read (q, k, v: 6 values) and write (out, lse: 4 values).
// CTAs [cta_begin, cta_end) of the grid run (cta_end < 0: all). Returns 0, or 1 with
// the first violation in err. info receives the kernel and launch shape chosen.
int emu_attention_forward(int dtype, int mode, const void* q, const void* k, const void* v,
                          void* out, float* lse, const int64_t* strides, const uint64_t* ranges,
                          int64_t B, int H, int Nq, int Nk, int dh, double scale,
                          int64_t cta_begin, int64_t cta_end, char* err, int err_len, char* info,
                          int info_len) {
  using namespace skipdit::attn;
  M = emu::Machine{};
  M.mode = mode;
  auto rng = [&](int i, const char* name) {
    return emu::Range{reinterpret_cast<const char*>(ranges[2 * i]),
                      reinterpret_cast<const char*>(ranges[2 * i + 1]), name};
  };
  M.readable = {rng(0, "q"), rng(1, "k"), rng(2, "v")};
  M.writable = {rng(3, "out"), rng(4, "lse")};
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
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  info[0] = 0;
  if (dtype == 0) {
    run_all<F16>(p, cta_begin, cta_end, info, info_len);
  } else {
    run_all<BF16>(p, cta_begin, cta_end, info, info_len);
  }
  std::snprintf(err, err_len, "%s", M.error.c_str());
  const int rc = M.error.empty() ? 0 : 1;
  M = emu::Machine{};
  return rc;
}

}  // extern "C"
