// CPU launchers: max-unpool with switches (scatter-add per plane) and its adjoint, the switch gather.
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/ops.h"
#include "cpu/parallel.h"
#include "kernels/max_unpool.h"

namespace zfk::cpu {
namespace {

// One plane: zero it, add each value at its switch target in row-major window order (the same
// order as kernels/max_unpool.h's gather, so both give identical sums), then rectify what was
// touched. Half types accumulate in a float plane and round once. Returns the invalid switches seen.
template <typename T, typename S>
int64_t unpool_plane(const T* values, const S* switches, const PoolGeometry& g, bool relu, T* out,
                     std::vector<float>& scratch) {
  using C = compute_t<T>;
  constexpr bool kFlat = std::is_same_v<S, int64_t>;
  const int64_t in_plane = g.in_h * g.in_w;
  C* acc;
  if constexpr (std::is_same_v<C, T>) {
    acc = out;
  } else {
    scratch.resize(in_plane);
    acc = scratch.data();
  }
  std::memset(static_cast<void*>(acc), 0, sizeof(C) * in_plane);
  int64_t invalid = 0;
  for (int64_t oh = 0; oh < g.out_h; ++oh) {
    for (int64_t ow = 0; ow < g.out_w; ++ow) {
      const int64_t p = oh * g.out_w + ow;
      const int64_t t = switch_target(g, oh, ow, int64_t(switches[p]), kFlat);
      if (t < 0) {
        ++invalid;
        continue;
      }
      acc[t] += load(values + p);
    }
  }
  if constexpr (std::is_same_v<C, T>) {
    if (relu) {
      for (int64_t p = 0; p < g.out_h * g.out_w; ++p) {
        const int64_t t = switch_target(g, p / g.out_w, p % g.out_w, int64_t(switches[p]), kFlat);
        if (t >= 0) acc[t] = zfk::relu(acc[t]);
      }
    }
  } else {
    for (int64_t i = 0; i < in_plane; ++i) store(out + i, relu ? zfk::relu(acc[i]) : acc[i]);
  }
  return invalid;
}

}  // namespace

int64_t max_unpool2d(const void* values, const void* switches, void* output, DType dtype, SwitchType switch_type,
                     int64_t planes, const PoolGeometry& g, bool relu, int num_threads) {
  std::vector<int64_t> invalid_per_plane(std::max<int64_t>(planes, 1), 0);
  dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    dispatch_switch(switch_type, [&](auto s) {
      using S = decltype(s);
      const int64_t in_plane = g.in_h * g.in_w, out_plane = g.out_h * g.out_w;
      parallel_for(planes, num_threads, in_plane, [&](int64_t begin, int64_t end) {
        std::vector<float> scratch;
        for (int64_t p = begin; p < end; ++p) {
          invalid_per_plane[p] =
              unpool_plane(static_cast<const T*>(values) + p * out_plane, static_cast<const S*>(switches) + p * out_plane,
                           g, relu, static_cast<T*>(output) + p * in_plane, scratch);
        }
      });
    });
  });
  int64_t invalid = 0;
  for (int64_t n : invalid_per_plane) invalid += n;
  return invalid;
}

int64_t gather_switches(const void* source, const void* switches, void* output, DType dtype, SwitchType switch_type,
                        int64_t planes, const PoolGeometry& g, int num_threads) {
  std::vector<int64_t> invalid_per_plane(std::max<int64_t>(planes, 1), 0);
  dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    dispatch_switch(switch_type, [&](auto s) {
      using S = decltype(s);
      constexpr bool kFlat = std::is_same_v<S, int64_t>;
      const int64_t in_plane = g.in_h * g.in_w, out_plane = g.out_h * g.out_w;
      parallel_for(planes, num_threads, out_plane, [&](int64_t begin, int64_t end) {
        for (int64_t plane = begin; plane < end; ++plane) {
          const T* src = static_cast<const T*>(source) + plane * in_plane;
          const S* sw = static_cast<const S*>(switches) + plane * out_plane;
          T* dst = static_cast<T*>(output) + plane * out_plane;
          int64_t invalid = 0;
          for (int64_t p = 0; p < out_plane; ++p) {
            const int64_t target = switch_target(g, p / g.out_w, p % g.out_w, int64_t(sw[p]), kFlat);
            if (target < 0) {
              ++invalid;
              store(dst + p, compute_t<T>(0));
            } else {
              dst[p] = src[target];
            }
          }
          invalid_per_plane[plane] = invalid;
        }
      });
    });
  });
  int64_t invalid = 0;
  for (int64_t n : invalid_per_plane) invalid += n;
  return invalid;
}

}  // namespace zfk::cpu
