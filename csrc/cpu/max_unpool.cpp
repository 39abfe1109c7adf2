// CPU launchers: max-unpool with switches (scatter-add per plane) and its adjoint, the switch gather.
#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu/ops.h"
#include "cpu/parallel.h"
#include "cpu/simd.h"
#include "cpu/switch_decoder.h"
#include "kernels/max_unpool.h"

namespace zfk::cpu {
namespace {

template <typename T>
ZFK_VECTORIZED void relu_plane(T* data, int64_t n) {
  for (int64_t i = 0; i < n; ++i) data[i] = zfk::relu(data[i]);
}

// One plane: zero an accumulator (the output plane itself, or a cache-resident buffer when the output is
// streamed or of a half type), add each value at its switch target in row-major
// window order (the order kernels/max_unpool.h's gather sums in, so both agree bit for bit), rectify,
// then copy the plane out (half types round once here). Returns the invalid switches seen (skipped).
template <typename V, typename S>
int64_t scatter_add(const V* values, const S* switches, const V* gate, const SwitchDecoder<S>& decoder, V* acc) {
  int64_t invalid = 0;
  decoder.for_each_target(switches, [&](int64_t p, int64_t t) {
    if (t < 0) {
      ++invalid;
    } else if (!gate || !(gate[p] <= 0)) {  // a gated-off value adds +0, which changes no sum
      acc[t] += values[p];
    }
  });
  return invalid;
}

// Half types: the plane's values (and gate) are widened to float first, so the scatter loop does no
// conversions, and the sums are rounded once on the way out: the same sums as converting element-wise.
template <typename T, typename S>
int64_t unpool_plane(const T* values, const S* switches, const T* gate, const PoolGeometry& g,
                     const SwitchDecoder<S>& decoder, bool relu, bool stream, T* out, std::vector<compute_t<T>>& acc,
                     std::vector<float>& widened) {
  using C = compute_t<T>;
  const int64_t in_plane = g.in_h * g.in_w, out_plane = g.out_h * g.out_w;
  if constexpr (std::is_same_v<C, T>) {
    if (!stream) {  // the output plane is the accumulator: no copy pass (a plane is small enough for L1/L2)
      std::fill(out, out + in_plane, T(0));
      const int64_t invalid = scatter_add(values, switches, gate, decoder, out);
      if (relu) relu_plane(out, in_plane);
      return invalid;
    }
  }
  std::fill(acc.begin(), acc.end(), C(0));
  int64_t invalid;
  if constexpr (std::is_same_v<C, T>) {
    invalid = scatter_add(values, switches, gate, decoder, acc.data());
  } else {
    widen(values, widened.data(), out_plane);
    if (gate) widen(gate, widened.data() + out_plane, out_plane);
    invalid = scatter_add(widened.data(), switches, gate ? widened.data() + out_plane : nullptr, decoder, acc.data());
  }
  if (relu) relu_plane(acc.data(), in_plane);
  if constexpr (std::is_same_v<C, T>) {
    if (stream) {
      stream_copy(out, acc.data(), in_plane);
    } else {
      std::copy(acc.begin(), acc.end(), out);
    }
  } else {
    narrow(acc.data(), out, in_plane);
  }
  return invalid;
}

}  // namespace

int64_t max_unpool2d(const void* values, const void* switches, const void* gate, void* output, DType dtype,
                     SwitchType switch_type, int64_t planes, const PoolGeometry& g, bool relu, int num_threads) {
  std::vector<int64_t> invalid_per_plane(std::max<int64_t>(planes, 1), 0);
  dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    dispatch_switch(switch_type, [&](auto s) {
      using S = decltype(s);
      const int64_t in_plane = g.in_h * g.in_w, out_plane = g.out_h * g.out_w;
      const SwitchDecoder<S> decoder(g, planes * out_plane);
      // Stream past the cache only an output far larger than it: a smaller one is better left in cache
      // for its reader, and small planes would leave partial lines that stall the write-combining buffers.
      const bool stream = planes * in_plane * int64_t(sizeof(T)) >= (int64_t(64) << 20) && in_plane >= 1024;
      parallel_for(planes, num_threads, in_plane, [&](int64_t begin, int64_t end) {
        std::vector<compute_t<T>> acc(in_plane);
        std::vector<float> widened(std::is_same_v<compute_t<T>, T> ? 0 : 2 * out_plane);
        for (int64_t p = begin; p < end; ++p) {
          invalid_per_plane[p] = unpool_plane(
              static_cast<const T*>(values) + p * out_plane, static_cast<const S*>(switches) + p * out_plane,
              gate ? static_cast<const T*>(gate) + p * out_plane : nullptr, g, decoder, relu, stream,
              static_cast<T*>(output) + p * in_plane, acc, widened);
        }
        stream_fence();
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
      const int64_t in_plane = g.in_h * g.in_w, out_plane = g.out_h * g.out_w;
      const SwitchDecoder<S> decoder(g, planes * out_plane);
      parallel_for(planes, num_threads, out_plane, [&](int64_t begin, int64_t end) {
        for (int64_t plane = begin; plane < end; ++plane) {
          const T* src = static_cast<const T*>(source) + plane * in_plane;
          const S* sw = static_cast<const S*>(switches) + plane * out_plane;
          T* dst = static_cast<T*>(output) + plane * out_plane;
          int64_t invalid = 0;
          decoder.for_each_target(sw, [&](int64_t p, int64_t t) {
            if (t < 0) {
              ++invalid;
              store(dst + p, compute_t<T>(0));
            } else {
              dst[p] = src[t];
            }
          });
          invalid_per_plane[plane] = invalid;
        }
      });
    });
  });
  int64_t invalid = 0;
  for (int64_t n : invalid_per_plane) invalid += n;
  return invalid;
}

// The CUDA kernel's formulation on the CPU (test entry point, not a fast path): each unpooled element gathers
// the windows covering it with kernels/max_unpool.h's unpool_gather_gated, and every switch is validated with
// invalid_switch, exactly as csrc/cuda/max_unpool.cu does per thread. Returns the invalid switches seen.
int64_t max_unpool2d_gather(const void* values, const void* switches, const void* gate, void* output, DType dtype,
                            SwitchType switch_type, int64_t planes, const PoolGeometry& g, bool relu,
                            int num_threads) {
  std::vector<int64_t> invalid_per_plane(std::max<int64_t>(planes, 1), 0);
  dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    dispatch_switch(switch_type, [&](auto s) {
      using S = decltype(s);
      constexpr bool kFlat = std::is_same_v<S, int64_t>;
      const int64_t in_plane = g.in_h * g.in_w, out_plane = g.out_h * g.out_w;
      parallel_for(planes, num_threads, in_plane * 4, [&](int64_t begin, int64_t end) {
        for (int64_t plane = begin; plane < end; ++plane) {
          const T* v = static_cast<const T*>(values) + plane * out_plane;
          const T* gt = gate ? static_cast<const T*>(gate) + plane * out_plane : nullptr;
          const S* sw = static_cast<const S*>(switches) + plane * out_plane;
          T* out = static_cast<T*>(output) + plane * in_plane;
          for (int64_t ih = 0; ih < g.in_h; ++ih) {
            for (int64_t iw = 0; iw < g.in_w; ++iw) {
              compute_t<T> sum = unpool_gather_gated(v, gt, sw, g, ih, iw, kFlat);
              if (relu) sum = zfk::relu(sum);
              store(out + ih * g.in_w + iw, sum);
            }
          }
          int64_t invalid = 0;
          for (int64_t oh = 0; oh < g.out_h; ++oh)
            for (int64_t ow = 0; ow < g.out_w; ++ow) invalid += invalid_switch(g, oh, ow, sw[oh * g.out_w + ow], kFlat);
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
