// CPU launcher: switch-recording max-pool (optionally fused with ReLU), one plane per task.
#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/ops.h"
#include "cpu/parallel.h"
#include "cpu/simd.h"
#include "kernels/max_pool.h"
#if ZFK_HAS_AVX512
#include <immintrin.h>
#endif

namespace zfk::cpu {
namespace {

// Loads for one vector of L adjacent windows: lanes row[0], row[s], ..., row[(L-1)s], for a
// compile-time stride s of 1 or 2. kLoad picks how, so no load passes the last element needed:
//   Partial: only the first n lanes (the rest are -inf), one element at a time;
//   Forward: L * s elements from row[0] (one element past the last lane when s = 2);
//   Back:    for s = 2, 2L elements from row[-1], keeping the odd ones (needs row[-1] to exist).
enum class Load { Partial, Forward, Back };

template <int kStride, Load kLoad, typename T>
__attribute__((always_inline)) inline typename Simd<T>::Vec strided_lanes(const T* row, int n) {
  using V = typename Simd<T>::Vec;
  using I = typename Simd<T>::Int;
  constexpr int L = Simd<T>::kLanes;
  if constexpr (kLoad == Load::Partial) {
    V v = V{} - __builtin_huge_val();
    for (int j = 0; j < n; ++j) v[j] = row[j * kStride];
    return v;
  } else if constexpr (kStride == 1) {
    return load_vec<V>(row);
  } else {
    static_assert(kStride == 2, "vectorized strides are 1 and 2");
    constexpr int kFirst = kLoad == Load::Back ? 1 : 0;
    const T* from = row - kFirst;
    I pick;
    for (int j = 0; j < L; ++j) pick[j] = 2 * j + kFirst;
    return __builtin_shuffle(load_vec<V>(from), load_vec<V>(from + L), pick);
  }
}

// Stores L window offsets (< 256 for uint8 switches) as switches. The common case, 8 int32 lanes to
// uint8, is two SSE2 pack instructions (GCC 12 narrows vectors lane by lane through the stack).
template <typename S, typename I>
__attribute__((always_inline)) inline void store_switches(S* switches, const I& offsets) {
#if defined(__x86_64__)
  if constexpr (std::is_same_v<S, uint8_t> && sizeof(I) == 32 && sizeof(offsets[0]) == 4) {
    __m128i low, high;
    std::memcpy(&low, &offsets, 16);
    std::memcpy(&high, reinterpret_cast<const char*>(&offsets) + 16, 16);
    const __m128i words = _mm_packs_epi32(low, high);  // offsets fit in int16 exactly
    _mm_storel_epi64(reinterpret_cast<__m128i*>(switches), _mm_packus_epi16(words, words));
    return;
  }
#endif
  for (int j = 0; j < int(sizeof(I) / sizeof(offsets[0])); ++j) switches[j] = S(offsets[j]);
}

// kBlocks * L adjacent windows of one output row (n < L of them when kLoad is Partial), whose columns
// lie inside the plane and whose rows are clipped alike to [kh_begin, kh_end); `first_row` points at
// row kh_begin of the first window. Same result as max_pool_window: the first element is taken
// unconditionally (it beats the initial -inf or is -inf itself), then take when v > best or v is NaN.
// With the ReLU fused only the first element needs rectifying: once best >= 0 (or NaN), a negative
// input loses exactly as its rectified zero would. Block 0 may load Forward (at the row start) while
// the others load Back. Independent blocks interleave so their serial select chains overlap.
template <int kStride, Load kLoad, Load kFirstLoad, bool kRelu, bool kNaN, int kBlocks, typename T, typename S>
__attribute__((always_inline)) inline void window_block(const T* first_row, const PoolGeometry& g, int64_t kh_begin, int64_t kh_end, int n,
                                 T* values, S* switches) {
  using V = typename Simd<T>::Vec;
  using I = typename Simd<T>::Int;
  using Lane = typename Simd<T>::Lane;
  constexpr int L = Simd<T>::kLanes;
  static_assert(kLoad != Load::Partial || kBlocks == 1, "a partial block stands alone");
  const auto lanes = [&](const T* row, int b) {
    return b == 0 ? strided_lanes<kStride, kFirstLoad>(row, n) : strided_lanes<kStride, kLoad>(row + b * L * kStride, n);
  };
  V best[kBlocks];
  I offset[kBlocks];
  const V zero = V{};
#pragma GCC unroll 4
  for (int b = 0; b < kBlocks; ++b) {
    best[b] = lanes(first_row, b);
    if (kRelu) best[b] = best[b] < zero ? zero : best[b];
    offset[b] = I{} + Lane(kh_begin * g.kernel_w);
  }
  for (int64_t kh = kh_begin; kh < kh_end; ++kh) {
    const T* row = first_row + (kh - kh_begin) * g.in_w;
    for (int64_t kw = (kh == kh_begin ? 1 : 0); kw < g.kernel_w; ++kw) {
      const I here = I{} + Lane(kh * g.kernel_w + kw);
#pragma GCC unroll 4
      for (int b = 0; b < kBlocks; ++b) {
        const V v = lanes(row + kw, b);
        const I take = kNaN ? (v > best[b]) | (v != v) : (v > best[b]);  // kNaN: the rows hold a NaN
        best[b] = take ? v : best[b];
        offset[b] = take ? here : offset[b];
      }
    }
  }
  for (int b = 0; b < kBlocks; ++b) {
    if constexpr (kLoad == Load::Partial) {
      for (int j = 0; j < n; ++j) values[j] = best[b][j];
      for (int j = 0; j < n; ++j) switches[j] = S(offset[b][j]);
    } else {
      store_vec(values + b * L, best[b]);
      store_switches(switches + b * L, offset[b]);
    }
  }
}

template <typename T>
__attribute__((always_inline)) inline bool contains_nan(const T* data, int64_t n) {
  using V = typename Simd<T>::Vec;
  using I = typename Simd<T>::Int;
  constexpr int L = Simd<T>::kLanes;
  // Four independent accumulators: one compare-and-or per vector, no loop-carried chain to wait on.
  I any[4] = {};
  int64_t i = 0;
  for (; i + 4 * L <= n; i += 4 * L) {
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) {
      const V v = load_vec<V>(data + i + u * L);
      any[u] |= (v != v);
    }
  }
  for (; i + L <= n; i += L) {
    const V v = load_vec<V>(data + i);
    any[0] |= (v != v);
  }
  any[0] |= any[1] | any[2] | any[3];
  bool nan = false;
  for (int j = 0; j < L; ++j) nan |= any[0][j] != 0;
  for (; i < n; ++i) nan |= data[i] != data[i];
  return nan;
}

// The windows of output column `ow` (clipped by the plane's left or right edge, so the column-lane vectors
// cannot take it) for n <= L output rows at a time, lanes = rows [oh, oh + n), all with full-height windows
// (lanes past n repeat row oh and are not stored). Same decisions as window_block: the first element taken
// (rectified if kRelu), then take when v > best, or v is NaN (kNaN); the switch counts from the unclipped
// window origin.
template <bool kRelu, bool kNaN, typename T, typename S>
__attribute__((always_inline)) inline void border_column(const T* plane, const PoolGeometry& g, int64_t oh, int n,
                                                         int64_t ow, int64_t out_w, T* values, S* switches) {
  using V = typename Simd<T>::Vec;
  using I = typename Simd<T>::Int;
  using Lane = typename Simd<T>::Lane;
  constexpr int L = Simd<T>::kLanes;
  const int64_t w0 = ow * g.stride_w - g.pad_w, h0 = oh * g.stride_h - g.pad_h;
  const int64_t iw_begin = std::max<int64_t>(0, w0), iw_end = std::min(g.in_w, w0 + g.kernel_w);
  const int64_t lane_stride = g.stride_h * g.in_w;  // input rows between neighbouring output rows
  V best = {};  // set by the window's first element
  I offset = I{} + Lane(iw_begin - w0);
  for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
    for (int64_t iw = iw_begin; iw < iw_end; ++iw) {
      const T* at = plane + (h0 + kh) * g.in_w + iw;
      V v;
      for (int j = 0; j < L; ++j) v[j] = at[(j < n ? j : 0) * lane_stride];
      if (kh == 0 && iw == iw_begin) {
        best = kRelu ? (v < V{} ? V{} : v) : v;
        continue;
      }
      const I take = kNaN ? (v > best) | (v != v) : (v > best);
      best = take ? v : best;
      offset = take ? I{} + Lane(kh * g.kernel_w + (iw - w0)) : offset;
    }
  }
  T best_lanes[L];
  Lane offset_lanes[L];
  store_vec(best_lanes, best);
  store_vec(offset_lanes, offset);
  for (int j = 0; j < n; ++j) {
    values[j * out_w] = best_lanes[j];
    switches[j * out_w] = S(offset_lanes[j]);
  }
}

// 3x3 windows at stride 2 in both directions (ZFNet's and AlexNet's pools), float: each input row is folded
// horizontally once and shared by the two output rows whose windows contain it, walking down the plane
// one group of W output columns at a time. Folding a window by rows gives max_pool_window's answer: a later
// row's fold replaces the running best exactly when its own first maximum would have (v > best or NaN).
// Memory to pull into the cache while a plane is pooled (the plane after the next), as 64-byte lines from `begin`.
// (Prefetching the next plane's outputs for writing as well measured no faster.)
struct Prefetch {
  const char* begin = nullptr;
  int64_t lines = 0;
};

namespace s2 {
// Float vectors of W lanes and the shuffles that split 2W adjacent elements into even and odd ones.
template <int W> struct Lanes;
template <> struct Lanes<8> {  // AVX2: in-lane shuffles, which leave the windows in order 0,1,4,5,2,3,6,7
  typedef float V __attribute__((vector_size(32)));
  typedef int32_t I __attribute__((vector_size(32)));
  static constexpr I kEven = {0, 2, 8, 10, 4, 6, 12, 14}, kOdd = {1, 3, 9, 11, 5, 7, 13, 15};
  static constexpr I kWindowOrder = {0, 1, 4, 5, 2, 3, 6, 7};  // undoes that order at the store
};
template <> struct Lanes<16> {  // AVX-512: one two-source permute per split, windows in order
  typedef float V __attribute__((vector_size(64)));
  typedef int32_t I __attribute__((vector_size(64)));
  static constexpr I kEven = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
  static constexpr I kOdd = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
};

constexpr bool kMaskedLoads = false;  // the default and AVX2 clones: the walk never clips a column
#include "cpu/max_pool_walk.inc"
}  // namespace s2

#if ZFK_HAS_AVX512
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
namespace s2_avx512 {
using s2::Lanes;
constexpr bool kMaskedLoads = true;  // a masked load stops at the row's end: the walk takes a clipped column
#include "cpu/max_pool_walk.inc"

// The 3x3 stride-2 walk of one float plane with 16-lane vectors, on CPUs with AVX-512 (twice the
// windows per instruction of the AVX2 clone).
template <bool kRelu>
__attribute__((noinline)) void walk_plane(const float* plane, const PoolGeometry& g, int64_t oh_lo, int64_t oh_hi,
                                          bool clipped_row, int64_t ow_lo, int64_t ow_hi, bool clipped_column,
                                          float* values, uint8_t* switches, const Prefetch& prefetch) {
  walk_rows<16, kRelu>(plane, g, oh_lo, oh_hi, clipped_row, ow_lo, ow_hi, clipped_column, values, switches, prefetch);
}
}  // namespace s2_avx512
#pragma GCC pop_options
#endif

// One call per plane, compiled per target (window_block, contains_nan and the dispatch lambdas are
// forced inline into each clone; a lambda left out of line would be compiled for the default target):
// a call per group of windows used to cost about a vector's work in prologue and spills.
template <int kStride, bool kRelu, typename T, typename S>
ZFK_VECTORIZED void pool_plane_vectorized(const T* plane, const PoolGeometry& g, T* values, S* switches,
                                          const Prefetch& prefetch) {
  constexpr int L = Simd<T>::kLanes;
  // Columns [ow_lo, ow_hi) have windows inside the plane's width; they go in groups of kBlocks vectors,
  // the last group shifted left to end at ow_hi (recomputing a few windows is cheaper than a ragged
  // tail). Clipped border columns take the element path.
  const int64_t ow_lo = std::min(g.out_w, (g.pad_w + kStride - 1) / kStride);
  const int64_t ow_hi = std::max(ow_lo, std::min(g.out_w, (g.in_w + g.pad_w - g.kernel_w) / kStride + 1));
  const int64_t span = ow_hi - ow_lo;
  // A group starting at input column 0 loads its first block Forward, which reads one element past
  // that block's last window column when s = 2: allowed only if the row still has it.
  const bool forward_fits = kStride == 1 || (L - 1) * kStride + g.kernel_w < g.in_w;
  const bool grouped = span >= L && forward_fits;
  // Rows [oh_lo, oh_hi) have full-height windows: their clipped border columns go L rows at a time
  // (border_column) after the row loop; other rows take the element path.
  const int64_t oh_lo = std::min(g.out_h, (g.pad_h + g.stride_h - 1) / g.stride_h);
  const int64_t oh_hi = std::max(oh_lo, std::min(g.out_h, (g.in_h + g.pad_h - g.kernel_h) / g.stride_h + 1));
  // 3x3 stride-2 float pools: the rows with full-height windows go column group by column group (s2::walk).
  constexpr bool kCanWalk = std::is_same_v<T, float> && std::is_same_v<S, uint8_t> && kStride == 2;
  const bool walked = kCanWalk && g.kernel_h == 3 && g.kernel_w == 3 && g.stride_h == 2 && span >= L;
  // The walk also takes the next row (column) when its windows lack only their last input row (column), as
  // ceil_mode's do on an even-sized plane: the bottom row (right column) is then no border. The column takes
  // masked loads, in the AVX-512 walk only.
  const bool clipped_row = walked && oh_hi < g.out_h && oh_hi * 2 - g.pad_h + 2 == g.in_h;
  bool clipped_column = walked && ow_hi < g.out_w && ow_hi * 2 - g.pad_w + 2 == g.in_w;
#if ZFK_HAS_AVX512
  clipped_column = clipped_column && cpu_has_avx512();
#else
  clipped_column = false;
#endif
  const int64_t walk_oh_hi = oh_hi + clipped_row, walk_ow_hi = ow_hi + clipped_column;
  // A plane free of NaN (the usual case) skips the NaN test in the windows' inner loop: one vector
  // pass over the plane costs less than that test in every window. The walk checks its own inputs as it
  // goes, so a walked plane skips that pass and its few border windows always take the NaN test.
  bool nan = true;
  if constexpr (kCanWalk) {
    if (walked && walk_oh_hi > oh_lo) {
#if ZFK_HAS_AVX512
      if (cpu_has_avx512()) {
        s2_avx512::walk_plane<kRelu>(plane, g, oh_lo, oh_hi, clipped_row, ow_lo, walk_ow_hi, clipped_column, values,
                                     switches, prefetch);
      } else
#endif
      {
        s2::walk_rows<8, kRelu>(plane, g, oh_lo, oh_hi, clipped_row, ow_lo, ow_hi, false, values, switches, prefetch);
      }
    }
  }
  if (!walked) nan = contains_nan(plane, g.in_h * g.in_w);
  for (int64_t oh = 0; oh < g.out_h; ++oh) {
    if (walked && oh == oh_lo) oh = oh_hi;  // the walk did these rows, border_column their border columns
    if (oh >= g.out_h) break;
    const bool border_by_column = oh >= oh_lo && oh < oh_hi;
    const bool row_walked = oh >= oh_hi && oh < walk_oh_hi;  // the clipped row: columns [ow_lo, walk_ow_hi) walked
    T* value_row = values + oh * g.out_w;
    S* switch_row = switches + oh * g.out_w;
    const int64_t h0 = oh * g.stride_h - g.pad_h;
    const int64_t kh_begin = std::max<int64_t>(0, -h0), kh_end = std::min(g.kernel_h, g.in_h - h0);
    const T* first_row = plane + (h0 + kh_begin) * g.in_w - g.pad_w;
    for (int64_t ow = 0; ow < (border_by_column ? 0 : ow_lo); ++ow)
      max_pool_window(plane, g, oh, ow, kRelu, value_row + ow, switch_row + ow);
    if (row_walked) {
      // the walk did columns [ow_lo, walk_ow_hi)
    } else if (grouped) {
      // Groups of 4 vectors; the tail group takes just enough vectors to cover what is left (a row of 54
      // windows costs 4 + 3 vectors, not 4 + 4), shifted left to end at ow_hi. Fewer, longer calls: a call
      // has a fixed cost of about a vector's work.
      for (int64_t ow = ow_lo; ow < ow_hi;) {
        const int64_t left = ow_hi - ow;
        const int blocks = int(std::min<int64_t>({4, (left + L - 1) / L, span / L}));
        const int64_t start = std::min(ow, ow_hi - blocks * L);
        const bool at_row_start = start * kStride - g.pad_w == 0;
        const T* origin = first_row + start * kStride;
        const auto run = [&](auto first_load, auto with_nan, auto group) __attribute__((always_inline)) {
          window_block<kStride, Load::Back, decltype(first_load)::value, kRelu, decltype(with_nan)::value,
                       decltype(group)::value>(origin, g, kh_begin, kh_end, L, value_row + start, switch_row + start);
        };
        const auto with_blocks = [&](auto first_load, auto with_nan) __attribute__((always_inline)) {
          switch (blocks) {
            case 4: return run(first_load, with_nan, std::integral_constant<int, 4>{});
            case 3: return run(first_load, with_nan, std::integral_constant<int, 3>{});
            case 2: return run(first_load, with_nan, std::integral_constant<int, 2>{});
            default: return run(first_load, with_nan, std::integral_constant<int, 1>{});
          }
        };
        const auto with_nan = [&](auto first_load) __attribute__((always_inline)) {
          nan ? with_blocks(first_load, std::true_type{}) : with_blocks(first_load, std::false_type{});
        };
        at_row_start ? with_nan(std::integral_constant<Load, Load::Forward>{})
                     : with_nan(std::integral_constant<Load, Load::Back>{});
        ow = start + blocks * L;
      }
    } else if (span > 0) {
      for (int64_t ow = ow_lo; ow < ow_hi; ow += L) {
        window_block<kStride, Load::Partial, Load::Partial, kRelu, true, 1>(first_row + ow * kStride, g, kh_begin, kh_end,
                                                                      int(std::min<int64_t>(L, ow_hi - ow)),
                                                                      value_row + ow, switch_row + ow);
      }
    }
    for (int64_t ow = border_by_column ? g.out_w : (row_walked ? walk_ow_hi : ow_hi); ow < g.out_w; ++ow)
      max_pool_window(plane, g, oh, ow, kRelu, value_row + ow, switch_row + ow);
  }
  for (int64_t ow = 0; ow < g.out_w; ++ow) {
    if (ow == ow_lo) ow = walk_ow_hi;  // the clipped columns the walk left: [0, ow_lo) and [walk_ow_hi, out_w)
    if (ow >= g.out_w) break;
    for (int64_t oh = oh_lo; oh < oh_hi; oh += L) {
      const int n = int(std::min<int64_t>(L, oh_hi - oh));
      T* value_at = values + oh * g.out_w + ow;
      S* switch_at = switches + oh * g.out_w + ow;
      nan ? border_column<kRelu, true>(plane, g, oh, n, ow, g.out_w, value_at, switch_at)
          : border_column<kRelu, false>(plane, g, oh, n, ow, g.out_w, value_at, switch_at);
    }
  }
}

template <typename T, typename S>
void pool_plane_scalar(const T* plane, const PoolGeometry& g, bool relu, T* values, S* switches) {
  for (int64_t oh = 0; oh < g.out_h; ++oh)
    for (int64_t ow = 0; ow < g.out_w; ++ow)
      max_pool_window(plane, g, oh, ow, relu, values + oh * g.out_w + ow, switches + oh * g.out_w + ow);
}

template <typename T, typename S>
void pool_plane(const T* plane, const PoolGeometry& g, bool relu, T* values, S* switches, const Prefetch& prefetch) {
  // Vectorized for uint8 switches only (windows of at most 256 elements, every pool a CNN uses): each
  // instantiation inlines a dozen window_block variants into two target clones.
  if constexpr ((std::is_same_v<T, float> || std::is_same_v<T, double>) && std::is_same_v<S, uint8_t>) {
    if (g.stride_w == 2) {
      return relu ? pool_plane_vectorized<2, true>(plane, g, values, switches, prefetch)
                  : pool_plane_vectorized<2, false>(plane, g, values, switches, prefetch);
    }
    if (g.stride_w == 1) {
      return relu ? pool_plane_vectorized<1, true>(plane, g, values, switches, prefetch)
                  : pool_plane_vectorized<1, false>(plane, g, values, switches, prefetch);
    }
  }
  // Other strides, windows over 256 elements and the half types (which compare in float) take the
  // element path.
  pool_plane_scalar(plane, g, relu, values, switches);
}

template <typename T, typename S>
void launch(const void* input, void* values, void* switches, int64_t planes, const PoolGeometry& g, bool relu,
            int num_threads) {
  const int64_t in_plane = g.in_h * g.in_w, out_plane = g.out_h * g.out_w;
  // Half types compare in float: each plane is widened into a cache-resident float copy and pooled by the
  // float vector path, and the maxima (inputs, or the ReLU's zero: exact in T) narrowed back. The element
  // path compares in float too, so results are the same; it stays for strides the vector path lacks.
  constexpr bool kWiden = !std::is_same_v<T, float> && !std::is_same_v<T, double> && std::is_same_v<S, uint8_t>;
  const bool widened = kWiden && (g.stride_w == 1 || g.stride_w == 2);
  parallel_for(planes, num_threads, in_plane, [&](int64_t begin, int64_t end) {
    std::vector<float> plane_f(widened ? in_plane : 0), values_f(widened ? out_plane : 0);
    for (int64_t p = begin; p < end; ++p) {
      const T* plane = static_cast<const T*>(input) + p * in_plane;
      T* value_plane = static_cast<T*>(values) + p * out_plane;
      S* switch_plane = static_cast<S*>(switches) + p * out_plane;
      // Two planes ahead: the next one was prefetched while the previous plane was pooled.
      const Prefetch next{reinterpret_cast<const char*>(plane + 2 * in_plane),
                          p + 2 < end ? (in_plane * int64_t(sizeof(T)) + 63) / 64 : 0};
      if (widened) {
        widen(plane, plane_f.data(), in_plane);
        pool_plane(plane_f.data(), g, relu, values_f.data(), switch_plane, next);
        narrow(values_f.data(), value_plane, out_plane);
      } else {
        pool_plane(plane, g, relu, value_plane, switch_plane, next);
      }
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
