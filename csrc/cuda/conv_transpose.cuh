// The transposed-convolution kernels shared by conv_transpose.cu and unpool_conv_transpose.cu: the tiled
// kernel runs the block algorithm of kernels/conv_transpose_tiled.h (which the CPU build emulates and tests),
// the element kernel its per-output definition when no tile fits in shared memory. They differ between the
// two ops only in where the input comes from (`Source`: a dense map, or the unpooled map built on the fly).
#pragma once
#include "cuda/launch.cuh"
#include "kernels/conv_transpose_tiled.h"

namespace zfk::cuda {

template <typename T, int kCo, typename Source>
__global__ void __launch_bounds__(kConvThreads, 1)
    conv_transpose_tiled_kernel(ConvTiling t, Source source, const T* __restrict__ weight,
                                const T* __restrict__ bias, T* __restrict__ out) {
  using C = compute_t<T>;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  const ConvShared<C> s = conv_shared<C>(shared_bytes, t);
  const int thread = threadIdx.x;
  for (int64_t block = blockIdx.x; block < t.blocks; block += gridDim.x) {
    const ConvBlock b = conv_block(t, block);
    if (!b.active) continue;  // uniform over the block: no barrier is skipped by only some threads
    if (thread == 0) conv_block_taps(t, b, s);
    __syncthreads();
    C acc[kCo];
#pragma unroll
    for (int o = 0; o < kCo; ++o) acc[o] = C(0);
    for (int64_t c0 = 0; c0 < t.shape.in_per_group; c0 += t.ci_chunk) {
      conv_load_stage(t, b, s, source, weight, c0, thread, kConvThreads);
      __syncthreads();
      conv_accumulate_stage<C, kCo>(t, b, s, c0, thread, acc);
      __syncthreads();  // the next stage (or block's taps) overwrites what was just read
    }
    conv_store_stage<T, C, kCo>(t, b, thread, acc, bias, out);
  }
}

template <typename T, typename Source>
__global__ void __launch_bounds__(kThreads, 1)
    conv_transpose_element_kernel(ConvShape shape, Source source, const T* __restrict__ weight,
                                  const T* __restrict__ bias, T* __restrict__ out, int64_t total) {
  const int64_t out_h = shape.g.out_h, out_w = shape.g.out_w, channels = shape.groups * shape.out_per_group;
  for (int64_t i = first_index<int64_t>(); i < total; i += grid_stride<int64_t>()) {
    const int64_t row = i / out_w, ox = i - row * out_w, plane = row / out_h, oy = row - plane * out_h;
    const int64_t n = plane / channels, channel = plane - n * channels;
    store(out + i, conv_transpose_element<T>(shape, source, weight, bias, n, channel, oy, ox));
  }
}

// Runs the tiled kernel when its plan fits in shared memory (and !force_elements), else the element kernel;
// returns whether the tiled one ran.
template <typename T, typename Source>
bool launch_conv_transpose(const ConvShape& shape, const Source& source, const T* weight, const T* bias, T* out,
                           bool force_elements, cudaStream_t stream, const char* name) {
  using C = compute_t<T>;
  const int64_t total = shape.batch * shape.groups * shape.out_per_group * shape.g.out_h * shape.g.out_w;
  if (total == 0) return !force_elements;
  ConvTiling t;
  if (!force_elements && plan_conv_tiles<C>(shape, &t)) {
    const size_t bytes = static_cast<size_t>(conv_shared_bytes<C>(t, t.ci_chunk));
    const unsigned grid = static_cast<unsigned>(t.blocks < kMaxBlocks ? t.blocks : kMaxBlocks);
    switch (t.co_tile) {
      case 4:
        conv_transpose_tiled_kernel<T, 4, Source><<<grid, kConvThreads, bytes, stream>>>(t, source, weight, bias, out);
        break;
      case 8:
        conv_transpose_tiled_kernel<T, 8, Source><<<grid, kConvThreads, bytes, stream>>>(t, source, weight, bias, out);
        break;
      default:
        conv_transpose_tiled_kernel<T, 16, Source><<<grid, kConvThreads, bytes, stream>>>(t, source, weight, bias, out);
        break;
    }
    check_launch(name);
    return true;
  }
  conv_transpose_element_kernel<T, Source><<<grid_for(total), kThreads, 0, stream>>>(shape, source, weight, bias, out,
                                                                                      total);
  check_launch(name);
  return false;
}

}  // namespace zfk::cuda
