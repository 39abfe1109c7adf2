// CUDA launcher: switch-recording max-pool (optionally fused with a preceding ReLU). One thread per pooled
// element, consecutive threads along a pooled row (coalesced stores, overlapping window reads), each
// scanning its window with the element function the CPU kernels use (kernels/max_pool.h): the same
// NaN, tie and switch rules bit for bit.
#include "cuda/launch.cuh"
#include "kernels/max_pool.h"

namespace zfk::cuda {
namespace {

template <typename T, typename S, typename Index>
__global__ void __launch_bounds__(kThreads)
    max_pool_kernel(const T* __restrict__ input, T* __restrict__ values, S* __restrict__ switches, Index total,
                    PoolGeometry g, bool relu) {
  const Index out_h = Index(g.out_h), out_w = Index(g.out_w), in_plane = Index(g.in_h * g.in_w);
  for (Index i = first_index<Index>(); i < total; i += grid_stride<Index>()) {
    const PlaneIndex<Index> p = split_index(i, out_h, out_w);
    max_pool_window(input + p.plane * in_plane, g, int64_t(p.y), int64_t(p.x), relu, values + i, switches + i);
  }
}

template <typename T, typename S, typename Index>
void launch(const void* input, void* values, void* switches, int64_t total, const PoolGeometry& g, bool relu,
            cudaStream_t stream) {
  max_pool_kernel<T, S, Index><<<grid_for(total), kThreads, 0, stream>>>(
      static_cast<const T*>(input), static_cast<T*>(values), static_cast<S*>(switches), Index(total), g, relu);
  check_launch("max_pool2d_switches");
}

}  // namespace

void max_pool2d_switches(const void* input, void* values, void* switches, DType dtype, SwitchType switch_type,
                         int64_t planes, const PoolGeometry& g, bool relu, void* stream) {
  const int64_t total = planes * g.out_h * g.out_w;
  if (total == 0) return;
  // 32-bit indices need the input's flat offsets to fit too (plane * in_plane).
  const bool narrow = fits_32_bits(total) && fits_32_bits(planes * g.in_h * g.in_w);
  dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    dispatch_switch(switch_type, [&](auto s) {
      using S = decltype(s);
      if (narrow) {
        launch<T, S, uint32_t>(input, values, switches, total, g, relu, as_stream(stream));
      } else {
        launch<T, S, int64_t>(input, values, switches, total, g, relu, as_stream(stream));
      }
    });
  });
}

}  // namespace zfk::cuda
