// CUDA launchers: max-unpool with switches (also max-pool's backward, gated by the pooled values) and its
// adjoint, the switch gather. Unpool is a gather, one thread per unpooled element summing the windows that
// cover it in row-major order (kernels/max_unpool.h): deterministic, the same sums as the CPU and the
// reference bit for bit, and no float atomics. The same loop validates one pooled switch per thread, since
// a gather never visits a switch that points nowhere.
#include "cuda/launch.cuh"
#include "kernels/max_unpool.h"

namespace zfk::cuda {
namespace {

template <typename T, typename S, typename Index>
__global__ void __launch_bounds__(kThreads)
    unpool_kernel(const T* __restrict__ values, const S* __restrict__ switches, const T* __restrict__ gate,
                  T* __restrict__ output, Index unpooled, Index pooled, PoolGeometry g, bool relu,
                  int32_t* __restrict__ invalid) {
  constexpr bool kFlat = sizeof(S) == 8;  // int64 switches are torch's flat indices
  const Index in_h = Index(g.in_h), in_w = Index(g.in_w), out_h = Index(g.out_h), out_w = Index(g.out_w);
  const Index out_plane = out_h * out_w;
  const Index total = unpooled > pooled ? unpooled : pooled;
  for (Index i = first_index<Index>(); i < total; i += grid_stride<Index>()) {
    if (i < unpooled) {
      const PlaneIndex<Index> p = split_index(i, in_h, in_w);
      const Index offset = p.plane * out_plane;
      compute_t<T> v = unpool_gather_gated(values + offset, gate ? gate + offset : nullptr, switches + offset, g,
                                           int64_t(p.y), int64_t(p.x), kFlat);
      if (relu) v = zfk::relu(v);
      store(output + i, v);
    }
    if (i < pooled) {
      const PlaneIndex<Index> p = split_index(i, out_h, out_w);
      if (invalid_switch(g, int64_t(p.y), int64_t(p.x), switches[i], kFlat)) atomicAdd(invalid, 1);
    }
  }
}

template <typename T, typename S, typename Index>
__global__ void __launch_bounds__(kThreads)
    gather_kernel(const T* __restrict__ source, const S* __restrict__ switches, T* __restrict__ output, Index pooled,
                  PoolGeometry g, int32_t* __restrict__ invalid) {
  constexpr bool kFlat = sizeof(S) == 8;
  const Index out_h = Index(g.out_h), out_w = Index(g.out_w), in_plane = Index(g.in_h * g.in_w);
  for (Index i = first_index<Index>(); i < pooled; i += grid_stride<Index>()) {
    const PlaneIndex<Index> p = split_index(i, out_h, out_w);
    const int64_t target = switch_target(g, int64_t(p.y), int64_t(p.x), int64_t(switches[i]), kFlat);
    if (target < 0) {
      atomicAdd(invalid, 1);
      store(output + i, compute_t<T>(0));
    } else {
      output[i] = source[p.plane * in_plane + Index(target)];  // a copy of the bits: NaN payloads and -0.0 kept
    }
  }
}

}  // namespace

void max_unpool2d(const void* values, const void* switches, const void* gate, void* output, DType dtype,
                  SwitchType switch_type, int64_t planes, const PoolGeometry& g, bool relu, int32_t* invalid,
                  void* stream) {
  const int64_t unpooled = planes * g.in_h * g.in_w, pooled = planes * g.out_h * g.out_w;
  const int64_t total = unpooled > pooled ? unpooled : pooled;
  if (total == 0) return;
  dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    dispatch_switch(switch_type, [&](auto s) {
      using S = decltype(s);
      const auto run = [&](auto index) {
        using Index = decltype(index);
        unpool_kernel<T, S, Index><<<grid_for(total), kThreads, 0, as_stream(stream)>>>(
            static_cast<const T*>(values), static_cast<const S*>(switches), static_cast<const T*>(gate),
            static_cast<T*>(output), Index(unpooled), Index(pooled), g, relu, invalid);
        check_launch(gate ? "max_pool2d_switches_backward" : "max_unpool2d");
      };
      if (fits_32_bits(total)) {
        run(uint32_t{});
      } else {
        run(int64_t{});
      }
    });
  });
}

void gather_switches(const void* source, const void* switches, void* output, DType dtype, SwitchType switch_type,
                     int64_t planes, const PoolGeometry& g, int32_t* invalid, void* stream) {
  const int64_t pooled = planes * g.out_h * g.out_w, unpooled = planes * g.in_h * g.in_w;
  if (pooled == 0) return;
  dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    dispatch_switch(switch_type, [&](auto s) {
      using S = decltype(s);
      const auto run = [&](auto index) {
        using Index = decltype(index);
        gather_kernel<T, S, Index><<<grid_for(pooled), kThreads, 0, as_stream(stream)>>>(
            static_cast<const T*>(source), static_cast<const S*>(switches), static_cast<T*>(output), Index(pooled),
            g, invalid);
        check_launch("gather_switches");
      };
      if (fits_32_bits(pooled) && fits_32_bits(unpooled)) {
        run(uint32_t{});
      } else {
        run(int64_t{});
      }
    });
  });
}

}  // namespace zfk::cuda
