// CUDA launcher: the fused deconvnet step conv_transpose2d(relu(max_unpool2d(values, switches)), weight).
// The tiled transposed convolution (conv_transpose.cuh) builds each input tile on the fly from the pooled
// map (kernels/max_unpool.h's gather, rectified, rounded to the storage type as the unfused unpool stores
// it), so the unpooled map is never written to memory. A first small kernel counts invalid switches, which
// the gather never visits.
#include "cuda/conv_transpose.cuh"
#include "kernels/max_unpool.h"

namespace zfk::cuda {
namespace {

template <typename S, typename Index>
__global__ void __launch_bounds__(kThreads)
    count_invalid_kernel(const S* __restrict__ switches, Index pooled, PoolGeometry g, int32_t* __restrict__ invalid) {
  constexpr bool kFlat = sizeof(S) == 8;  // int64 switches are torch's flat indices
  const Index out_h = Index(g.out_h), out_w = Index(g.out_w);
  for (Index i = first_index<Index>(); i < pooled; i += grid_stride<Index>()) {
    const PlaneIndex<Index> p = split_index(i, out_h, out_w);
    if (invalid_switch(g, int64_t(p.y), int64_t(p.x), switches[i], kFlat)) atomicAdd(invalid, 1);
  }
}

}  // namespace

bool unpool_conv_transpose2d(const void* values, const void* switches, const void* weight, void* output, DType dtype,
                             SwitchType switch_type, int64_t batch, int64_t in_channels, int64_t out_channels,
                             const PoolGeometry& pool, const ConvTransposeGeometry& g, bool relu,
                             bool force_elements, int32_t* invalid, void* stream) {
  if (pool.in_h != g.in_h || pool.in_w != g.in_w)
    throw std::invalid_argument("zfkernels: unpool_conv_transpose2d's unpooled size must be the convolution's input");
  const ConvShape shape{g, batch, 1, in_channels, out_channels};
  const int64_t pooled = batch * in_channels * pool.out_h * pool.out_w;
  bool tiled = !force_elements;
  dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    dispatch_switch(switch_type, [&](auto s) {
      using S = decltype(s);
      if (pooled > 0) {
        if (fits_32_bits(pooled)) {
          count_invalid_kernel<S, uint32_t><<<grid_for(pooled), kThreads, 0, as_stream(stream)>>>(
              static_cast<const S*>(switches), uint32_t(pooled), pool, invalid);
        } else {
          count_invalid_kernel<S, int64_t><<<grid_for(pooled), kThreads, 0, as_stream(stream)>>>(
              static_cast<const S*>(switches), pooled, pool, invalid);
        }
        check_launch("unpool_conv_transpose2d (switch check)");
      }
      const UnpooledInput<T, S> source{static_cast<const T*>(values), static_cast<const S*>(switches), pool,
                                       in_channels, sizeof(S) == 8, relu};
      tiled = launch_conv_transpose(shape, source, static_cast<const T*>(weight), static_cast<const T*>(nullptr),
                                    static_cast<T*>(output), force_elements, as_stream(stream),
                                    "unpool_conv_transpose2d");
    });
  });
  return tiled;
}

}  // namespace zfk::cuda
