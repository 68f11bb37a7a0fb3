// Constants of the CPU skip_fuse kernel (cpu/skip_fuse.cpp), exported in build_info.
#pragma once

#include <cstdint>

namespace skipdit::skip_fuse {

// The forward normalizes row chunks into one buffer of at most this many bytes (in the
// operand dtype) and runs one GEMM per chunk; the (M, 2D) tensor never exists.
constexpr int64_t kCpuFwdChunkBytes = int64_t{16} << 20;
// The backward's chunk buffers (dh and the normalized rows, in the accumulation dtype)
// hold at most this many bytes each: its weight-gradient GEMM needs tall chunks to run
// at BLAS speed.
constexpr int64_t kCpuBwdChunkBytes = int64_t{24} << 20;

}  // namespace skipdit::skip_fuse
