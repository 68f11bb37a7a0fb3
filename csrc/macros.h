// Function qualifiers shared by host C++, CUDA device code and the CPU emulator of the
// CUDA kernels (tests/emu). The one definition of each.
#pragma once

#if defined(__CUDACC__)
// Host and device (index math, tile geometry, the row indexer).
#define SKIPDIT_HD __host__ __device__ __forceinline__
// Device only (the PTX wrappers and the kernels' building blocks).
#define SKIPDIT_DEV __device__ __forceinline__
#else
#define SKIPDIT_HD inline
#define SKIPDIT_DEV inline
#endif
