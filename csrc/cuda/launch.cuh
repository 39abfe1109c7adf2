// Launch helpers shared by the CUDA launchers: streams, grid sizes, flat-index loops, launch-error checks.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda/ops.h"

namespace zfk::cuda {

constexpr int kThreads = 256;
// Grid-stride loops cover any size, so grids stop growing here (2^31 / 256 blocks keep 32-bit indices safe).
constexpr int64_t kMaxBlocks = (int64_t(1) << 31) / kThreads;

inline cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

inline unsigned grid_for(int64_t work, int threads = kThreads) {
  const int64_t blocks = (work + threads - 1) / threads;
  return static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

// After every launch: a bad configuration or a missing kernel image surfaces here, named, not later.
inline void check_launch(const char* kernel) {
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess)
    throw std::runtime_error(std::string("zfkernels: CUDA kernel ") + kernel + " failed to launch: " +
                             cudaGetErrorString(error));
}

// 32-bit flat indices when every index of the loop (and one grid stride past it) fits: integer division,
// which the index decompositions need, is several times cheaper in 32 bits than in 64.
inline bool fits_32_bits(int64_t n) { return n <= (int64_t(1) << 31); }

template <typename Index>
__device__ __forceinline__ Index first_index() {
  return Index(blockIdx.x) * Index(blockDim.x) + Index(threadIdx.x);
}
template <typename Index>
__device__ __forceinline__ Index grid_stride() {
  return Index(gridDim.x) * Index(blockDim.x);
}

// Flat index i of a [planes][height][width] array split into its coordinates.
template <typename Index>
struct PlaneIndex {
  Index plane, y, x;
};
template <typename Index>
__device__ __forceinline__ PlaneIndex<Index> split_index(Index i, Index height, Index width) {
  const Index row = i / width, plane = row / height;
  return {plane, row - plane * height, i - row * width};
}

}  // namespace zfk::cuda
