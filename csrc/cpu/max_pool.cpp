// CPU launcher: switch-recording max-pool (optionally fused with ReLU), one plane per task.
#include <algorithm>
#include <limits>
#include <type_traits>

#include "cpu/ops.h"
#include "cpu/parallel.h"
#include "cpu/simd.h"
#include "kernels/max_pool.h"

namespace zfk::cpu {
namespace {

constexpr int64_t kChunk = 64;  // output columns scanned together; their running maxima stay in L1

// Interior windows (fully inside the plane) of one output row, vectorized across output columns.
// kStride > 0 fixes the column stride at compile time so the strided loads become shuffles.
template <int kStride, bool kRelu, typename T>
ZFK_VECTORIZED void interior_row(const T* plane, const PoolGeometry& g,
                                                                    int64_t oh, int64_t ow_begin, int64_t n,
                                                                    T* values, int32_t* switches) {
  const int64_t stride = kStride > 0 ? kStride : g.stride_w;
  const T* origin = plane + (oh * g.stride_h - g.pad_h) * g.in_w + (ow_begin * stride - g.pad_w);
  T best[kChunk];
  int32_t offset[kChunk];
  for (int64_t j = 0; j < n; ++j) {
    best[j] = -std::numeric_limits<T>::infinity();
    offset[j] = 0;
  }
  int32_t k = 0;
  for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
    for (int64_t kw = 0; kw < g.kernel_w; ++kw, ++k) {
      const T* row = origin + kh * g.in_w + kw;
      for (int64_t j = 0; j < n; ++j) {
        T v = row[j * stride];
        if (kRelu) v = v < T(0) ? T(0) : v;
        const bool take = (v > best[j]) | (v != v);  // same order and NaN rule as torch
        best[j] = take ? v : best[j];
        offset[j] = take ? k : offset[j];
      }
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    values[j] = best[j];
    switches[j] = offset[j];
  }
}

template <typename T, typename S>
void pool_plane(const T* plane, const PoolGeometry& g, bool relu, T* values, S* switches) {
  // Half types take the element path only: they compare in float and store the winner exactly.
  constexpr bool kVectorizable = std::is_same_v<T, float> || std::is_same_v<T, double>;
  // Output columns [ow_lo, ow_hi) have windows fully inside the plane's width.
  const int64_t ow_lo = std::min(g.out_w, (g.pad_w + g.stride_w - 1) / g.stride_w);
  const int64_t ow_hi = std::max(ow_lo, std::min(g.out_w, (g.in_w + g.pad_w - g.kernel_w) / g.stride_w + 1));
  int32_t offsets[kChunk];
  for (int64_t oh = 0; oh < g.out_h; ++oh) {
    T* value_row = values + oh * g.out_w;
    S* switch_row = switches + oh * g.out_w;
    const int64_t h0 = oh * g.stride_h - g.pad_h;
    const bool fast_row = kVectorizable && h0 >= 0 && h0 + g.kernel_h <= g.in_h && ow_lo < ow_hi;
    const int64_t fast_begin = fast_row ? ow_lo : g.out_w, fast_end = fast_row ? ow_hi : g.out_w;
    for (int64_t ow = 0; ow < fast_begin; ++ow) max_pool_window(plane, g, oh, ow, relu, value_row + ow, switch_row + ow);
    if constexpr (kVectorizable) {
      for (int64_t c0 = fast_begin; c0 < fast_end; c0 += kChunk) {
        const int64_t n = std::min(kChunk, fast_end - c0);
        if (g.stride_w == 2) {
          relu ? interior_row<2, true>(plane, g, oh, c0, n, value_row + c0, offsets)
               : interior_row<2, false>(plane, g, oh, c0, n, value_row + c0, offsets);
        } else if (g.stride_w == 1) {
          relu ? interior_row<1, true>(plane, g, oh, c0, n, value_row + c0, offsets)
               : interior_row<1, false>(plane, g, oh, c0, n, value_row + c0, offsets);
        } else {
          relu ? interior_row<0, true>(plane, g, oh, c0, n, value_row + c0, offsets)
               : interior_row<0, false>(plane, g, oh, c0, n, value_row + c0, offsets);
        }
        for (int64_t j = 0; j < n; ++j) switch_row[c0 + j] = S(offsets[j]);
      }
    }
    for (int64_t ow = fast_end; ow < g.out_w; ++ow) max_pool_window(plane, g, oh, ow, relu, value_row + ow, switch_row + ow);
  }
}

template <typename T, typename S>
void launch(const void* input, void* values, void* switches, int64_t planes, const PoolGeometry& g, bool relu,
            int num_threads) {
  const int64_t in_plane = g.in_h * g.in_w, out_plane = g.out_h * g.out_w;
  parallel_for(planes, num_threads, in_plane, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      pool_plane(static_cast<const T*>(input) + p * in_plane, g, relu, static_cast<T*>(values) + p * out_plane,
                 static_cast<S*>(switches) + p * out_plane);
    }
  });
}

}  // namespace

void max_pool2d_switches(const void* input, void* values, void* switches, DType dtype, SwitchType switch_type,
                         int64_t planes, const PoolGeometry& g, bool relu, int num_threads) {
  dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    dispatch_switch(switch_type, [&](auto s) {
      using S = decltype(s);
      launch<T, S>(input, values, switches, planes, g, relu, num_threads);
    });
  });
}

}  // namespace zfk::cpu
