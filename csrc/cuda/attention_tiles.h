// Tile configurations of the attention forward kernels and the choice among them
// (csrc/cuda/attention_kernels.cuh, attention.cu). Plain host + device C++ (no CUDA
// headers): the launcher, the CPU emulator (tests/emu/attention_kernels.cpp) and the
// limit function (cuda_limits) plan launches with the same code.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "macros.h"

namespace skipdit::attention {

struct FwdParams {
  const uint16_t* q;
  const uint16_t* k;
  const uint16_t* v;
  uint16_t* out;
  float* lse;
  int64_t q_sb, q_sn, q_sh;  // element strides of q for B, N, H (head dim: stride 1)
  int64_t k_sb, k_sn, k_sh;
  int64_t v_sb, v_sn, v_sh;
  int64_t BH;   // B * H
  int H, Nq, Nk;
  int dh;       // the real head dim (<= the kernel's tile head dim kDh)
  int q_tiles;  // attention_fwd_kernel: ceil(Nq / kBM)
  int n16;      // attention_fwd_short_kernel: ceil(max(Nq, Nk) / 16), at most 4
  float scale_log2;  // scale * log2(e)
};

// log2(e): the launcher turns the softmax scale into the log2 domain of the kernels.
constexpr double kLog2e = 1.4426950408889634;

// Shared-memory row stride (elements) for a head-dim tile: an odd number of 16-byte
// chunks, so 8 rows read by one ldmatrix phase fall into 8 distinct bank groups.
SKIPDIT_HD constexpr int smem_ld(int dh) { return (dh / 8) % 2 == 1 ? dh : dh + 8; }

// ---------------------------------------------------------------------------------
// attention_fwd_kernel (main)

template <int kDh_, int kMT_, int kBN_, int kWarps_, int kStages_, bool kQRegs_>
struct MainCfg {
  static constexpr int kDh = kDh_;        // head-dim tile (multiple of 8, <= 256)
  static constexpr int kMT = kMT_;        // m16 tiles of query rows per warp
  static constexpr int kBN = kBN_;        // keys per K/V tile (multiple of 16)
  static constexpr int kWarps = kWarps_;
  static constexpr int kStages = kStages_;  // K/V ring depth (>= 2)
  static constexpr bool kQRegs = kQRegs_;   // Q fragments stay in registers
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBM = 16 * kMT * kWarps;  // query rows per CTA
  static constexpr int kLd = smem_ld(kDh);
  static constexpr int kSmemBytes = (kBM + kStages * 2 * kBN) * kLd * 2;
  static_assert(kDh % 8 == 0 && kDh <= 256 && kBN % 16 == 0 && kStages >= 2);
};

// ---------------------------------------------------------------------------------
// attention_fwd_short_kernel

template <int kDh_, int kN16_>
struct ShortCfg {
  static constexpr int kDh = kDh_;
  static constexpr int kLd = smem_ld(kDh);
  static constexpr int kN16 = kN16_;  // Nq, Nk <= 16*kN16 (1: the N = 16 case, 4: up to 64)
  static constexpr int kMaxWarps = 4;
  // Q, K and V of one (batch, head), n16*16 rows each.
  SKIPDIT_HD static constexpr int warp_bytes(int n16) { return 3 * n16 * 16 * kLd * 2; }
  // Warps per CTA: up to 4, fewer where a CTA would need more than 64 KiB.
  SKIPDIT_HD static constexpr int warps(int n16) {
    int w = kMaxWarps;
    while (w > 1 && w * warp_bytes(n16) > 64 * 1024) --w;
    return w;
  }
  // The most dynamic shared memory a launch asks for, over n16 = 1 .. kN16.
  SKIPDIT_HD static constexpr int max_cta_bytes() {
    int most = 0;
    for (int n = 1; n <= kN16; ++n) most = warps(n) * warp_bytes(n) > most ? warps(n) * warp_bytes(n) : most;
    return most;
  }
  static_assert(kDh % 8 == 0 && kDh <= 128 && kN16 >= 1 && kN16 <= 4);
};

// ---------------------------------------------------------------------------------
// Configurations and their choice

// Head-dim tile for a head dim: 64, 72, 88, 96 and 128 run exactly; any other multiple
// of 8 runs on the next larger tile (zero-filled columns; correct, slower).
SKIPDIT_HD constexpr int dh_tile(int dh) {
  return dh <= 64 ? 64 : dh <= 72 ? 72 : dh <= 88 ? 88 : dh <= 96 ? 96 : dh <= 128 ? 128 : 256;
}

// The short path needs the whole sequence of one (batch, head) in one warp's shared
// memory: Nq, Nk <= 64 and a tile head dim <= 128.
SKIPDIT_HD constexpr bool use_short_path(int nq, int nk, int dh) {
  return nq <= 64 && nk <= 64 && dh_tile(dh) <= 128;
}

// attention_fwd_kernel tile configurations. Two m16 tiles per warp (32 rows) let every
// K/V fragment read from shared memory feed two MMAs; the K/V tile width, the ring depth
// and whether Q stays in registers are the largest choices whose O, S (and Q)
// accumulators fit in 255 registers without spills on both sm_80 and sm_90a (ptxas,
// nvcc 13.0).
template <int kDh>
struct MainFor;
template <>
struct MainFor<64> {
  using type = MainCfg<64, 2, 64, 4, 3, true>;
};
template <>
struct MainFor<72> {
  using type = MainCfg<72, 2, 32, 4, 3, true>;
};
template <>
struct MainFor<88> {
  using type = MainCfg<88, 2, 32, 4, 3, true>;
};
template <>
struct MainFor<96> {
  using type = MainCfg<96, 2, 32, 4, 3, false>;
};
template <>
struct MainFor<128> {
  using type = MainCfg<128, 1, 64, 4, 2, true>;
};
template <>
struct MainFor<256> {
  using type = MainCfg<256, 1, 32, 4, 2, false>;
};

// attention_fwd_short_kernel: sixteen-key blocks a warp's registers hold (sequences of
// at most 16 tokens, Latte's temporal attention, get their own smaller kernel).
SKIPDIT_HD constexpr int short_n16_tile(int nq, int nk) { return nq <= 16 && nk <= 16 ? 1 : 4; }

// Calls f(std::integral_constant<int, kDh>{}) with the tile head dim for dh.
template <class F>
void dispatch_dh_tile(int dh, F&& f) {
  switch (dh_tile(dh)) {
    case 64: f(std::integral_constant<int, 64>{}); break;
    case 72: f(std::integral_constant<int, 72>{}); break;
    case 88: f(std::integral_constant<int, 88>{}); break;
    case 96: f(std::integral_constant<int, 96>{}); break;
    case 128: f(std::integral_constant<int, 128>{}); break;
    default: f(std::integral_constant<int, 256>{}); break;
  }
}

struct LaunchShape {
  int64_t grid;   // CTAs (1-D grid)
  int threads;    // per CTA
  int smem;       // dynamic shared memory of this launch, bytes
  int max_smem;   // the most any launch of this kernel asks for
};

// Chooses the kernel for p (filling in p.q_tiles or p.n16) and calls
// f(std::type_identity<Cfg>{}, std::bool_constant<is_short>{}, shape): the launcher
// (attention.cu) and the CPU emulator both launch through this.
template <class F>
void plan(FwdParams& p, F&& f) {
  dispatch_dh_tile(p.dh, [&](auto dh_tile) {
    constexpr int kDh = decltype(dh_tile)::value;
    if constexpr (kDh <= 128) {
      if (use_short_path(p.Nq, p.Nk, p.dh)) {
        auto go = [&](auto cfg) {
          using C = typename decltype(cfg)::type;
          p.n16 = ((p.Nq > p.Nk ? p.Nq : p.Nk) + 15) / 16;
          const int w = C::warps(p.n16);
          f(cfg, std::true_type{},
            LaunchShape{(p.BH + w - 1) / w, 32 * w, w * C::warp_bytes(p.n16), C::max_cta_bytes()});
        };
        if (short_n16_tile(p.Nq, p.Nk) == 1) {
          go(std::type_identity<ShortCfg<kDh, 1>>{});
        } else {
          go(std::type_identity<ShortCfg<kDh, 4>>{});
        }
        return;
      }
    }
    using C = typename MainFor<kDh>::type;
    p.q_tiles = (p.Nq + C::kBM - 1) / C::kBM;
    f(std::type_identity<C>{}, std::false_type{},
      LaunchShape{p.BH * p.q_tiles, C::kThreads, C::kSmemBytes, C::kSmemBytes});
  });
}

// The most dynamic shared memory any launch for head dim dh asks for (the main kernel of
// its tile, and the short kernels when the tile has them).
inline int max_smem_bytes(int dh) {
  int most = 0;
  dispatch_dh_tile(dh, [&](auto dh_tile) {
    constexpr int kDh = decltype(dh_tile)::value;
    most = MainFor<kDh>::type::kSmemBytes;
    if constexpr (kDh <= 128) {
      most = std::max({most, ShortCfg<kDh, 1>::max_cta_bytes(), ShortCfg<kDh, 4>::max_cta_bytes()});
    }
  });
  return most;
}

}  // namespace skipdit::attention
