// The thread model of the CPU emulator of the CUDA kernels: one CTA at a time, every
// CUDA thread a fiber (ucontext) on one OS thread.
//
// Fibers switch only at synchronizing operations (a warp-collective instruction, a
// barrier, the end of the thread), so the emulation is deterministic and a warp
// collective sees all 32 lanes' operands at once: the last lane to arrive computes the
// results of every lane (collective()). Two schedules (Machine::mode bit 1):
//   round-robin  threads take turns at every switch, so warps advance in near lockstep;
//   warp by warp each warp runs until it blocks at a CTA barrier before the next one
//                runs, so a warp that overwrites a buffer other warps still read (a
//                missing barrier) is seen.
// A barrier counts the threads that have not exited (as __syncthreads does); a barrier
// that some live thread never reaches is reported as a deadlock.
//
// Also here: the machine state the instructions of ptx_emu.h act on (shared memory,
// each thread's pending cp.async groups, the global ranges a launch may read and
// write) and the first violation, which voids the launch (error()).
#pragma once

#include <ucontext.h>

#include <cstdint>
#include <cstring>
#include <deque>
#include <functional>
#include <string>
#include <vector>

namespace skipdit::emu {

struct Dim3 {
  unsigned x = 0, y = 1, z = 1;
};

// A global memory range [lo, hi) a launch may read or write.
struct Range {
  const char* lo;
  const char* hi;
};

// One cp.async: 16 bytes from src (or zeros when !valid) to dst.
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
  std::vector<Copy> open;                // cp.async issued since the last commit
  std::deque<std::vector<Copy>> groups;  // committed, not yet complete
};

// Operands / results of one lane in a warp-collective operation.
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

struct Machine {
  // configuration of the current launch
  int mode = 1;  // bit 0: cp.async lands at wait_group (else at issue); bit 1: warp by warp
  std::vector<Range> readable;
  std::vector<Range> writable;
  std::string error;
  Dim3 grid, block, block_idx;
  // current CTA
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  ucontext_t sched;
  int cur = 0;
  int live = 0;
  std::vector<char> smem_buf;
  char* smem = nullptr;
  size_t smem_bytes = 0;
  int bar_arrived = 0;
  uint64_t bar_gen = 0;
  uint64_t progress = 0;
  std::function<void()> body;
};

inline Machine M;

inline void fail(const std::string& what) {
  if (M.error.empty()) M.error = what;
}
inline bool failed() { return !M.error.empty(); }
inline std::string where() {
  return " (block " + std::to_string(M.block_idx.x) + ", thread " + std::to_string(M.cur) + ")";
}

inline Thread& me() { return M.threads[M.cur]; }
inline int lane_id() { return M.cur % 32; }
inline unsigned char* dynamic_smem() { return reinterpret_cast<unsigned char*>(M.smem); }

inline void yield_() { swapcontext(&M.threads[M.cur].ctx, &M.sched); }

inline bool in_smem(const void* p, size_t n, size_t align) {
  const char* c = static_cast<const char*>(p);
  return c >= M.smem && c + n <= M.smem + M.smem_bytes &&
         reinterpret_cast<uintptr_t>(c) % align == 0;
}
inline bool in_ranges(const std::vector<Range>& rs, const void* p, size_t n, size_t align) {
  const char* c = static_cast<const char*>(p);
  if (reinterpret_cast<uintptr_t>(c) % align != 0) return false;
  for (const auto& r : rs) {
    if (c >= r.lo && c + n <= r.hi) return true;
  }
  return false;
}
template <class T>
Range range_of(const T* p, size_t n) {
  return {reinterpret_cast<const char*>(p), reinterpret_cast<const char*>(p + n)};
}

// A warp-collective operation: every lane deposits its operands; the last lane to
// arrive computes all lanes' results (the operation happens once, with every operand
// present); each lane then takes its own result.
template <class F>
Slot collective(int kind, const Slot& in, F compute) {
  const int lane = lane_id();
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

// __syncthreads over the threads that have not exited.
inline void cta_barrier() {
  const uint64_t gen = M.bar_gen;
  if (++M.bar_arrived == M.live) {
    M.bar_arrived = 0;
    ++M.bar_gen;
    ++M.progress;
    return;
  }
  Thread& t = me();
  t.at_barrier = true;
  t.barrier_gen = gen;
  while (M.bar_gen == gen) yield_();
  t.at_barrier = false;
}

inline void fiber_entry() {
  const int tid = M.cur;
  M.body();
  Thread& t = M.threads[tid];
  bool pending = !t.open.empty();
  for (const auto& g : t.groups) pending = pending || !g.empty();
  if (pending) fail("a thread exits with cp.async copies it never waited for" + where());
  t.done = true;
  --M.live;
  ++M.progress;
  // The scheduler resumes no finished fiber; uc_link returns to it.
}

// Runs the current CTA (M.block_idx) with `threads` threads; false on a deadlock.
inline bool run_cta(int threads) {
  if (static_cast<int>(M.threads.size()) != threads) M.threads.resize(threads);
  M.warps.assign((threads + 31) / 32, Warp{});
  M.live = threads;
  M.bar_arrived = 0;
  for (int i = 0; i < threads; ++i) {
    Thread& t = M.threads[i];
    t.done = false;
    t.at_barrier = false;
    t.open.clear();
    t.groups.clear();
    if (t.stack.empty()) t.stack.resize(128 * 1024);
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
        fail("deadlock: threads wait at a barrier that not all threads reach" + where());
        return false;
      }
    } else {
      idle_passes = 0;
    }
  }
  return true;
}

// Resets the machine for a launch: schedule mode, the global memory it may read and
// write. The first violation of a launch is in M.error afterwards.
inline void reset(int mode, std::vector<Range> readable, std::vector<Range> writable) {
  M.mode = mode;
  M.readable = std::move(readable);
  M.writable = std::move(writable);
  M.error.clear();
  M.threads.clear();
}

// Runs CTAs [cta_begin, cta_end) of a 1-D grid of `grid` CTAs with `block` threads each
// and smem_bytes of dynamic shared memory (filled with 0xff bytes, NaN in every float
// format, at the start of every CTA); body() is the kernel. Stops at the first
// violation; returns whether there was none.
inline bool launch(int64_t grid, int block, size_t smem_bytes, std::function<void()> body,
                   int64_t cta_begin = 0, int64_t cta_end = -1) {
  M.grid = {static_cast<unsigned>(grid), 1, 1};
  M.block = {static_cast<unsigned>(block), 1, 1};
  M.smem_buf.assign(smem_bytes + 128, 0);
  const uintptr_t base = reinterpret_cast<uintptr_t>(M.smem_buf.data());
  M.smem = M.smem_buf.data() + (128 - base % 128) % 128;  // 128-byte aligned
  M.smem_bytes = smem_bytes;
  M.body = std::move(body);
  const int64_t end = cta_end < 0 || cta_end > grid ? grid : cta_end;
  for (int64_t b = cta_begin; b < end && !failed(); ++b) {
    M.block_idx = {static_cast<unsigned>(b), 0, 0};
    std::memset(M.smem, 0xff, smem_bytes);
    if (!run_cta(block)) break;
  }
  M.body = nullptr;
  return !failed();
}

}  // namespace skipdit::emu
