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

// Lanes row[0], row[s], ..., row[(L-1)s] for a compile-time stride s. A full load reads L*s elements;
// a partial one reads only the first n lanes (the rest are -inf), so the row's end is never passed.
template <int kStride, bool kPartial, typename T>
__attribute__((always_inline)) inline typename Simd<T>::Vec strided_lanes(const T* row, int n) {
  using V = typename Simd<T>::Vec;
  using I = typename Simd<T>::Int;
  constexpr int L = Simd<T>::kLanes;
  if constexpr (kPartial) {
    V v = V{} - __builtin_huge_val();
    for (int j = 0; j < n; ++j) v[j] = row[j * kStride];
    return v;
  } else if constexpr (kStride == 1) {
    return load_vec<V>(row);
  } else {
    static_assert(kStride == 2, "vectorized strides are 1 and 2");
    I evens;
    for (int j = 0; j < L; ++j) evens[j] = 2 * j;
    return __builtin_shuffle(load_vec<V>(row), load_vec<V>(row + L), evens);
  }
}

// kBlocks * L adjacent windows of one output row (or n < L of them when kPartial), whose columns lie
// inside the plane and whose rows are clipped alike to [kh_begin, kh_end); `first_row` points at row
// kh_begin of the first window. Same scan order, initial switch and NaN rule as max_pool_window; the
// ReLU keeps -0.0 and NaN. Several blocks run interleaved: each block's compare-and-select chain is
// serial, so independent chains keep the vector units busy.
template <int kStride, bool kRelu, bool kPartial, int kBlocks, typename T, typename S>
ZFK_VECTORIZED void window_block(const T* first_row, const PoolGeometry& g, int64_t kh_begin, int64_t kh_end, int n,
                                 T* values, S* switches) {
  using V = typename Simd<T>::Vec;
  using I = typename Simd<T>::Int;
  using Lane = typename Simd<T>::Lane;
  constexpr int L = Simd<T>::kLanes;
  static_assert(!kPartial || kBlocks == 1, "a partial block stands alone");
  V best[kBlocks];
  I offset[kBlocks];
  for (int b = 0; b < kBlocks; ++b) {
    best[b] = V{} - __builtin_huge_val();
    offset[b] = I{} + Lane(kh_begin * g.kernel_w);
  }
  const V zero = V{};
  for (int64_t kh = kh_begin; kh < kh_end; ++kh) {
    const T* row = first_row + (kh - kh_begin) * g.in_w;
    for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
      const I here = I{} + Lane(kh * g.kernel_w + kw);
#pragma GCC unroll 4
      for (int b = 0; b < kBlocks; ++b) {
        V v = strided_lanes<kStride, kPartial>(row + kw + b * L * kStride, n);
        if (kRelu) v = v < zero ? zero : v;
        const I take = (v > best[b]) | (v != v);
        best[b] = take ? v : best[b];
        offset[b] = take ? here : offset[b];
      }
    }
  }
  for (int b = 0; b < kBlocks; ++b) {
    if constexpr (kPartial) {
      for (int j = 0; j < n; ++j) values[j] = best[b][j];
    } else {
      store_vec(values + b * L, best[b]);
    }
    for (int j = 0; j < (kPartial ? n : L); ++j) switches[b * L + j] = S(offset[b][j]);
  }
}

template <int kStride, bool kRelu, typename T, typename S>
void pool_plane_vectorized(const T* plane, const PoolGeometry& g, T* values, S* switches) {
  constexpr int L = Simd<T>::kLanes;
  // Columns [ow_lo, ow_hi) have windows inside the plane's width. Full blocks also need their vector
  // loads (L * stride elements from each window column) to end inside the row; a partial block
  // covers what is left, and the clipped border columns take the element path.
  const int64_t ow_lo = std::min(g.out_w, (g.pad_w + kStride - 1) / kStride);
  const int64_t ow_hi = std::max(ow_lo, std::min(g.out_w, (g.in_w + g.pad_w - g.kernel_w) / kStride + 1));
  const int64_t last_read = g.kernel_w - 1 + int64_t(L) * kStride - 1;  // relative to the window origin
  for (int64_t oh = 0; oh < g.out_h; ++oh) {
    T* value_row = values + oh * g.out_w;
    S* switch_row = switches + oh * g.out_w;
    const int64_t h0 = oh * g.stride_h - g.pad_h;
    const int64_t kh_begin = std::max<int64_t>(0, -h0), kh_end = std::min(g.kernel_h, g.in_h - h0);
    const T* first_row = plane + (h0 + kh_begin) * g.in_w - g.pad_w;
    int64_t ow = 0;
    for (; ow < ow_lo; ++ow) max_pool_window(plane, g, oh, ow, kRelu, value_row + ow, switch_row + ow);
    constexpr int kWide = 4;  // blocks per interleaved group
    for (; ow + kWide * L <= ow_hi && (ow + (kWide - 1) * L) * kStride - g.pad_w + last_read < g.in_w; ow += kWide * L) {
      window_block<kStride, kRelu, false, kWide>(first_row + ow * kStride, g, kh_begin, kh_end, L, value_row + ow,
                                                 switch_row + ow);
    }
    for (; ow + L <= ow_hi && ow * kStride - g.pad_w + last_read < g.in_w; ow += L) {
      window_block<kStride, kRelu, false, 1>(first_row + ow * kStride, g, kh_begin, kh_end, L, value_row + ow,
                                             switch_row + ow);
    }
    if (ow < ow_hi) {  // fewer than L columns are left
      window_block<kStride, kRelu, true, 1>(first_row + ow * kStride, g, kh_begin, kh_end, int(ow_hi - ow),
                                            value_row + ow, switch_row + ow);
      ow = ow_hi;
    }
    for (; ow < g.out_w; ++ow) max_pool_window(plane, g, oh, ow, kRelu, value_row + ow, switch_row + ow);
  }
}

template <typename T, typename S>
void pool_plane_scalar(const T* plane, const PoolGeometry& g, bool relu, T* values, S* switches) {
  for (int64_t oh = 0; oh < g.out_h; ++oh)
    for (int64_t ow = 0; ow < g.out_w; ++ow)
      max_pool_window(plane, g, oh, ow, relu, values + oh * g.out_w + ow, switches + oh * g.out_w + ow);
}

template <typename T, typename S>
void pool_plane(const T* plane, const PoolGeometry& g, bool relu, T* values, S* switches) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    if (g.stride_w == 2) {
      return relu ? pool_plane_vectorized<2, true>(plane, g, values, switches)
                  : pool_plane_vectorized<2, false>(plane, g, values, switches);
    }
    if (g.stride_w == 1) {
      return relu ? pool_plane_vectorized<1, true>(plane, g, values, switches)
                  : pool_plane_vectorized<1, false>(plane, g, values, switches);
    }
  }
  // Other strides and the half types (which compare in float) take the element path.
  pool_plane_scalar(plane, g, relu, values, switches);
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
