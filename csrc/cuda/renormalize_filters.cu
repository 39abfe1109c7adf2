// CUDA launcher: filter renormalization in place, one block per filter (a filter is contiguous in OIHW).
// The float64 sum of squares is reduced in a fixed order (strided per-thread sums, then a shared-memory
// tree), so the decision "RMS > radius" and the scale are the same on every run; the rest is
// kernels/renormalize_filters.h, as on the CPU.
#include "cuda/launch.cuh"
#include "kernels/renormalize_filters.h"

namespace zfk::cuda {
namespace {

constexpr int kReduceThreads = 256;  // a power of two: the tree halves it

template <typename T>
__global__ void __launch_bounds__(kReduceThreads)
    renormalize_kernel(T* weight, int64_t filters, int64_t filter_size, double radius) {
  __shared__ double partial[kReduceThreads];
  const int tid = threadIdx.x;
  for (int64_t f = blockIdx.x; f < filters; f += gridDim.x) {
    T* filter = weight + f * filter_size;
    double sum = 0.0;
    for (int64_t i = tid; i < filter_size; i += kReduceThreads) sum += element_square(filter + i);
    partial[tid] = sum;
    __syncthreads();
    for (int half = kReduceThreads / 2; half > 0; half /= 2) {
      if (tid < half) partial[tid] += partial[tid + half];
      __syncthreads();
    }
    const double scale = renormalize_scale(partial[0], filter_size, radius);
    __syncthreads();  // everyone has read partial[0] before the next filter overwrites it
    if (scale != 1.0)
      for (int64_t i = tid; i < filter_size; i += kReduceThreads) scale_element(filter + i, scale);
  }
}

}  // namespace

void renormalize_filters(void* weight, DType dtype, int64_t filters, int64_t filter_size, double radius,
                         void* stream) {
  if (filters == 0 || filter_size == 0) return;
  dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    const unsigned grid = static_cast<unsigned>(filters < kMaxBlocks ? filters : kMaxBlocks);
    renormalize_kernel<T><<<grid, kReduceThreads, 0, as_stream(stream)>>>(static_cast<T*>(weight), filters,
                                                                           filter_size, radius);
    check_launch("renormalize_filters_");
  });
}

}  // namespace zfk::cuda
