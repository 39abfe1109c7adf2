// Tiled output-stationary transposed convolution: the per-block algorithm of the CUDA kernel, written once
// over (block, thread) indices and a shared-memory pointer so that the CPU build can run it too (thread by
// thread between barriers, emulate_conv_tiles below) and the CPU tests exercise the code the GPU runs.
//
// Phases: output row oy with oy + pad_h = stride_h * a + r only meets kernel rows kh with
// kh * dilation_h = stride_h * q + r, each reading input row a - q. So the outputs of one residue pair
// (r_h, r_w) form a dense grid over (a, b) that is a plain stride-1 correlation with that phase's taps, and
// no thread visits a tap that cannot reach its output (stride 2 would otherwise waste 3/4 of them).
// A block computes one phase's tile of kConvTileRows x kConvTileCols positions (a thread each) for
// co_tile output channels (registers), staging ci_chunk input channels at a time in shared memory: the
// input tile with its halo (zero outside the input) and the phase's weights.
#pragma once
#include <algorithm>
#include <type_traits>
#include <vector>

#include "common.h"
#include "conv_transpose.h"
#include "max_unpool.h"

#if defined(__CUDA_ARCH__)
#define ZFK_UNROLL _Pragma("unroll")
#elif defined(__CUDACC__)  // nvcc's host pass: no host code of a .cu file runs these loops
#define ZFK_UNROLL
#else
#define ZFK_UNROLL _Pragma("GCC unroll 16")
#endif

namespace zfk {

constexpr int kConvTileRows = 8, kConvTileCols = 32, kConvThreads = kConvTileRows * kConvTileCols;
// Without the opt-in attribute a CUDA block gets at most 48 KiB of dynamic shared memory.
constexpr int64_t kConvSharedBytes = 48 * 1024;

// One kernel tap of an axis: kernel index and input shift (input = phase coordinate - shift).
struct ConvTap {
  int32_t k, shift;
};

// The taps of one axis that reach outputs of `residue`: k * dilation = stride * shift + residue. `taps`
// has room for `kernel` entries; returns how many there are.
ZFK_HOST_DEVICE int axis_taps(int64_t kernel, int64_t stride, int64_t dilation, int64_t residue, ConvTap* taps) {
  int n = 0;
  for (int64_t k = 0; k < kernel; ++k) {
    const int64_t d = k * dilation - residue;  // > -stride: divisible only when >= 0
    if (d >= 0 && d % stride == 0) taps[n++] = ConvTap{int32_t(k), int32_t(d / stride)};
  }
  return n;
}

// Phase coordinates a in [begin, begin + count) of one axis's outputs o = stride * a + residue - pad in [0, out).
struct AxisPhase {
  int64_t begin, count;
};

ZFK_HOST_DEVICE AxisPhase axis_phase(int64_t out, int64_t pad, int64_t stride, int64_t residue) {
  const int64_t low = pad - residue, high = out + pad - residue;  // o >= 0 <=> stride * a >= low, o < out likewise
  const int64_t begin = low <= 0 ? 0 : (low + stride - 1) / stride;
  const int64_t end = high <= 0 ? 0 : (high + stride - 1) / stride;
  return {begin, end > begin ? end - begin : 0};
}

// A grouped transposed convolution: weight [in_channels][out_per_group][kernel_h][kernel_w].
struct ConvShape {
  ConvTransposeGeometry g;
  int64_t batch, groups, in_per_group, out_per_group;
};

// The launch plan: block b of `blocks` is (image, group, phase, output-channel block, spatial tile).
struct ConvTiling {
  ConvShape shape;
  int64_t co_tile;               // output channels per block (the kernel's kCo)
  int64_t ci_chunk;              // input channels per shared-memory stage
  int64_t halo_h, halo_w;        // the largest input shift of any tap
  int64_t max_taps_h, max_taps_w;
  int64_t tiles_h, tiles_w;      // spatial tiles per phase, enough for the largest phase
  int64_t co_blocks, blocks;
};

// Output channels per block: few-channel outputs (an RGB first layer) would leave a wide tile's registers idle.
ZFK_HOST_DEVICE int conv_co_tile(int64_t out_per_group) { return out_per_group <= 4 ? 4 : out_per_group <= 8 ? 8 : 16; }

ZFK_HOST_DEVICE int64_t conv_tile_in_h(const ConvTiling& t) { return kConvTileRows + t.halo_h; }
ZFK_HOST_DEVICE int64_t conv_tile_in_w(const ConvTiling& t) { return kConvTileCols + t.halo_w; }

// Shared memory of one block, in this order (compute-type arrays first keep them aligned).
template <typename C>
struct ConvShared {
  C* input;           // [ci_chunk][tile_in_h][tile_in_w]
  C* weight;          // [ci_chunk][taps_h][taps_w][co_tile], the phase's taps only
  ConvTap* taps_h;    // [kernel_h]
  ConvTap* taps_w;    // [kernel_w]
  int32_t* tap_count; // [2]: taps_h, taps_w in use
};

template <typename C>
ZFK_HOST_DEVICE int64_t conv_shared_bytes(const ConvTiling& t, int64_t ci_chunk) {
  const int64_t input = ci_chunk * conv_tile_in_h(t) * conv_tile_in_w(t);
  const int64_t weight = ci_chunk * t.max_taps_h * t.max_taps_w * t.co_tile;
  return (input + weight) * int64_t(sizeof(C)) + (t.shape.g.kernel_h + t.shape.g.kernel_w) * int64_t(sizeof(ConvTap)) +
         2 * int64_t(sizeof(int32_t));
}

template <typename C>
ZFK_HOST_DEVICE ConvShared<C> conv_shared(void* base, const ConvTiling& t) {
  ConvShared<C> s;
  s.input = static_cast<C*>(base);
  s.weight = s.input + t.ci_chunk * conv_tile_in_h(t) * conv_tile_in_w(t);
  s.taps_h = reinterpret_cast<ConvTap*>(s.weight + t.ci_chunk * t.max_taps_h * t.max_taps_w * t.co_tile);
  s.taps_w = s.taps_h + t.shape.g.kernel_h;
  s.tap_count = reinterpret_cast<int32_t*>(s.taps_w + t.shape.g.kernel_w);
  return s;
}

// The plan for a shape, or false when even one input channel per stage would not fit in shared memory
// (huge kernels or dilations): the caller then runs conv_transpose_element per output instead.
template <typename C>
inline bool plan_conv_tiles(const ConvShape& shape, ConvTiling* out) {
  const ConvTransposeGeometry& g = shape.g;
  ConvTiling t{};
  t.shape = shape;
  t.co_tile = conv_co_tile(shape.out_per_group);
  t.halo_h = (g.kernel_h - 1) * g.dilation_h / g.stride_h;
  t.halo_w = (g.kernel_w - 1) * g.dilation_w / g.stride_w;
  int64_t rows = 0, cols = 0;
  std::vector<ConvTap> taps(g.kernel_h > g.kernel_w ? g.kernel_h : g.kernel_w);
  for (int64_t r = 0; r < g.stride_h; ++r) {
    t.max_taps_h = std::max<int64_t>(t.max_taps_h, axis_taps(g.kernel_h, g.stride_h, g.dilation_h, r, taps.data()));
    rows = std::max(rows, axis_phase(g.out_h, g.pad_h, g.stride_h, r).count);
  }
  for (int64_t r = 0; r < g.stride_w; ++r) {
    t.max_taps_w = std::max<int64_t>(t.max_taps_w, axis_taps(g.kernel_w, g.stride_w, g.dilation_w, r, taps.data()));
    cols = std::max(cols, axis_phase(g.out_w, g.pad_w, g.stride_w, r).count);
  }
  t.tiles_h = (rows + kConvTileRows - 1) / kConvTileRows;
  t.tiles_w = (cols + kConvTileCols - 1) / kConvTileCols;
  t.co_blocks = (shape.out_per_group + t.co_tile - 1) / t.co_tile;
  t.blocks = shape.batch * shape.groups * g.stride_h * g.stride_w * t.co_blocks * t.tiles_h * t.tiles_w;
  t.ci_chunk = 0;
  for (int64_t chunk = 16; chunk >= 1; chunk /= 2) {
    if ((chunk <= shape.in_per_group || chunk == 1) && conv_shared_bytes<C>(t, chunk) <= kConvSharedBytes) {
      t.ci_chunk = chunk;
      break;
    }
  }
  *out = t;
  return t.ci_chunk > 0;
}

// Where block `block` works. Spatial tiles vary fastest, then output-channel blocks: neighbouring blocks
// share their input tile through the cache.
struct ConvBlock {
  int64_t n, group, residue_h, residue_w, co0;  // co0: first output channel within the group
  AxisPhase phase_h, phase_w;
  int64_t a0, b0;                               // phase coordinates of the tile's first position
  bool active;                                  // false when the tile lies past this phase's last position
};

ZFK_HOST_DEVICE ConvBlock conv_block(const ConvTiling& t, int64_t block) {
  const ConvTransposeGeometry& g = t.shape.g;
  ConvBlock b;
  const int64_t tile_w = block % t.tiles_w;
  block /= t.tiles_w;
  const int64_t tile_h = block % t.tiles_h;
  block /= t.tiles_h;
  b.co0 = block % t.co_blocks * t.co_tile;
  block /= t.co_blocks;
  b.residue_w = block % g.stride_w;
  block /= g.stride_w;
  b.residue_h = block % g.stride_h;
  block /= g.stride_h;
  b.group = block % t.shape.groups;
  b.n = block / t.shape.groups;
  b.phase_h = axis_phase(g.out_h, g.pad_h, g.stride_h, b.residue_h);
  b.phase_w = axis_phase(g.out_w, g.pad_w, g.stride_w, b.residue_w);
  b.a0 = b.phase_h.begin + tile_h * kConvTileRows;
  b.b0 = b.phase_w.begin + tile_w * kConvTileCols;
  b.active = tile_h * kConvTileRows < b.phase_h.count && tile_w * kConvTileCols < b.phase_w.count;
  return b;
}

// Stage 0 (one thread): the block's phase taps into shared memory.
template <typename C>
ZFK_HOST_DEVICE void conv_block_taps(const ConvTiling& t, const ConvBlock& b, const ConvShared<C>& s) {
  const ConvTransposeGeometry& g = t.shape.g;
  s.tap_count[0] = axis_taps(g.kernel_h, g.stride_h, g.dilation_h, b.residue_h, s.taps_h);
  s.tap_count[1] = axis_taps(g.kernel_w, g.stride_w, g.dilation_w, b.residue_w, s.taps_w);
}

// Stage 1 (all threads, strided): input channels [c0, c0 + chunk) of the group into shared memory, the
// input tile read through `source(n, channel, y, x)` (zero outside the input) and the phase's weights
// (zero for output channels past the group's). Consecutive threads read consecutive columns.
template <typename C, typename T, typename Source>
ZFK_HOST_DEVICE void conv_load_stage(const ConvTiling& t, const ConvBlock& b, const ConvShared<C>& s,
                                     const Source& source, const T* weight, int64_t c0, int thread, int threads) {
  const ConvTransposeGeometry& g = t.shape.g;
  const int64_t chunk = t.shape.in_per_group - c0 < t.ci_chunk ? t.shape.in_per_group - c0 : t.ci_chunk;
  const int64_t tile_w = conv_tile_in_w(t), tile = conv_tile_in_h(t) * tile_w;
  const int64_t y0 = b.a0 - t.halo_h, x0 = b.b0 - t.halo_w, channel0 = b.group * t.shape.in_per_group + c0;
  for (int64_t i = thread; i < chunk * tile; i += threads) {
    const int64_t c = i / tile, r = i - c * tile, ty = r / tile_w;
    const int64_t y = y0 + ty, x = x0 + (r - ty * tile_w);
    s.input[i] = (y >= 0 && y < g.in_h && x >= 0 && x < g.in_w) ? C(source(b.n, channel0 + c, y, x)) : C(0);
  }
  const int64_t taps_w = s.tap_count[1], per_channel = s.tap_count[0] * taps_w * t.co_tile;
  const int64_t kernel = g.kernel_h * g.kernel_w;
  for (int64_t i = thread; i < chunk * per_channel; i += threads) {
    const int64_t c = i / per_channel, r = i - c * per_channel, tap = r / t.co_tile, co = b.co0 + (r - tap * t.co_tile);
    const int64_t th = tap / taps_w, tw = tap - th * taps_w;
    const int64_t k = s.taps_h[th].k * g.kernel_w + s.taps_w[tw].k;
    const int64_t at = ((channel0 + c) * t.shape.out_per_group + co) * kernel + k;  // read only when co is in range
    s.weight[i] = co < t.shape.out_per_group ? C(load(weight + at)) : C(0);
  }
}

// The taps [h_begin, h_end) x [w_begin, w_end) of the phase whose input lies inside the input map for thread
// `thread`'s position. Only those are multiplied: the tile's zero halo times a NaN or infinite weight would
// be NaN where torch forms no product at all. Shifts ascend with the tap index, so the taps whose input
// row a - shift lies in [0, in_h) are one run (likewise columns): a few compares per stage.
struct ConvThreadTaps {
  int h_begin, h_end, w_begin, w_end;
};

template <typename C>
ZFK_HOST_DEVICE ConvThreadTaps conv_thread_taps(const ConvTiling& t, const ConvBlock& b, const ConvShared<C>& s,
                                                int thread) {
  const int ty = thread / kConvTileCols, tx = thread - ty * kConvTileCols;
  const int64_t a = b.a0 + ty, bb = b.b0 + tx;
  ConvThreadTaps r{0, s.tap_count[0], 0, s.tap_count[1]};
  while (r.h_begin < r.h_end && a - s.taps_h[r.h_begin].shift >= t.shape.g.in_h) ++r.h_begin;
  while (r.h_end > r.h_begin && a - s.taps_h[r.h_end - 1].shift < 0) --r.h_end;
  while (r.w_begin < r.w_end && bb - s.taps_w[r.w_begin].shift >= t.shape.g.in_w) ++r.w_begin;
  while (r.w_end > r.w_begin && bb - s.taps_w[r.w_end - 1].shift < 0) --r.w_end;
  return r;
}

// Stage 2 (thread `thread`): its position's sums over the staged channels and its taps, in a fixed order.
template <typename C, int kCo>
ZFK_HOST_DEVICE void conv_accumulate_stage(const ConvTiling& t, const ConvBlock& b, const ConvShared<C>& s, int64_t c0,
                                           int thread, C (&acc)[kCo]) {
  const ConvThreadTaps taps = conv_thread_taps(t, b, s, thread);
  const int64_t chunk = t.shape.in_per_group - c0 < t.ci_chunk ? t.shape.in_per_group - c0 : t.ci_chunk;
  const int ty = thread / kConvTileCols, tx = thread - ty * kConvTileCols;
  const int taps_h = s.tap_count[0], taps_w = s.tap_count[1];
  const int64_t tile_w = conv_tile_in_w(t), tile = conv_tile_in_h(t) * tile_w;
  for (int64_t c = 0; c < chunk; ++c) {
    const C* channel_weights = s.weight + c * taps_h * taps_w * kCo;
    for (int th = taps.h_begin; th < taps.h_end; ++th) {
      const C* row = s.input + c * tile + (ty + t.halo_h - s.taps_h[th].shift) * tile_w + tx + t.halo_w;
      const C* w = channel_weights + (th * taps_w + taps.w_begin) * kCo;
      for (int tw = taps.w_begin; tw < taps.w_end; ++tw, w += kCo) {
        const C x = row[-s.taps_w[tw].shift];
        ZFK_UNROLL
        for (int o = 0; o < kCo; ++o) acc[o] += x * w[o];
      }
    }
  }
}

// Stage 3 (thread `thread`): bias added, rounded once, stored, when the position lies inside the phase.
template <typename T, typename C, int kCo>
ZFK_HOST_DEVICE void conv_store_stage(const ConvTiling& t, const ConvBlock& b, int thread, const C (&acc)[kCo],
                                      const T* bias, T* out) {
  const ConvTransposeGeometry& g = t.shape.g;
  const int ty = thread / kConvTileCols, tx = thread - ty * kConvTileCols;
  const int64_t a = b.a0 + ty, bb = b.b0 + tx;
  if (a - b.phase_h.begin >= b.phase_h.count || bb - b.phase_w.begin >= b.phase_w.count) return;
  const int64_t oy = a * g.stride_h + b.residue_h - g.pad_h, ox = bb * g.stride_w + b.residue_w - g.pad_w;
  const int64_t out_channels = t.shape.groups * t.shape.out_per_group;
  ZFK_UNROLL
  for (int o = 0; o < kCo; ++o) {
    const int64_t co = b.co0 + o;
    if (co >= t.shape.out_per_group) break;
    const int64_t channel = b.group * t.shape.out_per_group + co;
    const C v = bias ? acc[o] + C(load(bias + channel)) : acc[o];
    store(out + ((b.n * out_channels + channel) * g.out_h + oy) * g.out_w + ox, v);
  }
}

// One output element computed directly (all kernel taps, input channels outer): the fallback when no
// tile plan fits, and the definition the tiled result is compared with.
template <typename T, typename Source>
ZFK_HOST_DEVICE compute_t<T> conv_transpose_element(const ConvShape& shape, const Source& source, const T* weight,
                                                    const T* bias, int64_t n, int64_t channel, int64_t oy,
                                                    int64_t ox) {
  using C = compute_t<T>;
  const ConvTransposeGeometry& g = shape.g;
  const int64_t group = channel / shape.out_per_group, co = channel - group * shape.out_per_group;
  const int64_t a = (oy + g.pad_h) / g.stride_h, residue_h = (oy + g.pad_h) - a * g.stride_h;
  const int64_t b = (ox + g.pad_w) / g.stride_w, residue_w = (ox + g.pad_w) - b * g.stride_w;
  C acc = C(0);
  for (int64_t c = 0; c < shape.in_per_group; ++c) {
    const int64_t ci = group * shape.in_per_group + c;
    const T* w = weight + (ci * shape.out_per_group + co) * g.kernel_h * g.kernel_w;
    for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
      const int64_t dh = kh * g.dilation_h - residue_h;
      if (dh < 0 || dh % g.stride_h != 0) continue;
      const int64_t y = a - dh / g.stride_h;
      if (y < 0 || y >= g.in_h) continue;
      for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
        const int64_t dw = kw * g.dilation_w - residue_w;
        if (dw < 0 || dw % g.stride_w != 0) continue;
        const int64_t x = b - dw / g.stride_w;
        if (x < 0 || x >= g.in_w) continue;
        acc += C(source(n, ci, y, x)) * C(load(w + kh * g.kernel_w + kw));
      }
    }
  }
  return bias ? acc + C(load(bias + channel)) : acc;
}

// Input sources: a dense NCHW map, or the unpooled map computed on the fly from pooled values and switches.
template <typename T>
struct DenseInput {
  const T* data;
  int64_t channels, height, width;
  ZFK_HOST_DEVICE compute_t<T> operator()(int64_t n, int64_t c, int64_t y, int64_t x) const {
    return load(data + ((n * channels + c) * height + y) * width + x);
  }
};

// max_unpool2d(values, switches, relu) at (y, x), rounded to T as the unfused op stores it; never materialized.
template <typename T, typename S>
struct UnpooledInput {
  const T* values;
  const S* switches;
  PoolGeometry pool;  // in = the unpooled map (the convolution's input), out = the pooled map
  int64_t channels;
  bool flat_indices, rectify;
  ZFK_HOST_DEVICE compute_t<T> operator()(int64_t n, int64_t c, int64_t y, int64_t x) const {
    const int64_t offset = (n * channels + c) * pool.out_h * pool.out_w;
    return unpooled_element(values + offset, switches + offset, pool, y, x, flat_indices, rectify);
  }
};

// The CPU's run of blocks [begin, end) of the tiled algorithm: each stage runs for every thread of the block
// before the next stage starts, which is what the CUDA kernel's barriers guarantee.
template <typename T, int kCo, typename Source>
void emulate_conv_tiles(const ConvTiling& t, const Source& source, const T* weight, const T* bias, T* out,
                        int64_t begin, int64_t end) {
  using C = compute_t<T>;
  struct Acc {
    C v[kCo];
  };
  // 8-byte words: aligned for every compute type, as the kernel's dynamic shared memory is.
  std::vector<double> shared_words((conv_shared_bytes<C>(t, t.ci_chunk) + 7) / 8);
  std::vector<Acc> acc(kConvThreads);
  const ConvShared<C> s = conv_shared<C>(shared_words.data(), t);
  for (int64_t block = begin; block < end; ++block) {
    const ConvBlock b = conv_block(t, block);
    if (!b.active) continue;
    conv_block_taps(t, b, s);
    for (Acc& a : acc)
      for (C& v : a.v) v = C(0);
    for (int64_t c0 = 0; c0 < t.shape.in_per_group; c0 += t.ci_chunk) {
      for (int thread = 0; thread < kConvThreads; ++thread)
        conv_load_stage(t, b, s, source, weight, c0, thread, kConvThreads);
      for (int thread = 0; thread < kConvThreads; ++thread)
        conv_accumulate_stage<C, kCo>(t, b, s, c0, thread, acc[thread].v);
    }
    for (int thread = 0; thread < kConvThreads; ++thread)
      conv_store_stage<T, C, kCo>(t, b, thread, acc[thread].v, bias, out);
  }
}

// The CPU's run of a whole convolution, choosing as the CUDA launcher does (tiled when a plan fits and
// !force_elements, else per element); `parallel(n, work_per_item, body)` runs body(begin, end) over [0, n).
// Returns whether the tiled algorithm ran.
template <typename T, typename Source, typename Parallel>
bool emulate_conv_transpose(const ConvShape& shape, const Source& source, const T* weight, const T* bias, T* out,
                            bool force_elements, const Parallel& parallel) {
  using C = compute_t<T>;
  ConvTiling t;
  if (!force_elements && plan_conv_tiles<C>(shape, &t)) {
    const int64_t work = kConvThreads * t.co_tile * shape.in_per_group;
    const auto run = [&](auto co_tile) {
      parallel(t.blocks, work, [&](int64_t begin, int64_t end) {
        emulate_conv_tiles<T, decltype(co_tile)::value>(t, source, weight, bias, out, begin, end);
      });
    };
    if (t.co_tile == 4) {
      run(std::integral_constant<int, 4>{});
    } else if (t.co_tile == 8) {
      run(std::integral_constant<int, 8>{});
    } else {
      run(std::integral_constant<int, 16>{});
    }
    return true;
  }
  const ConvTransposeGeometry& g = shape.g;
  const int64_t channels = shape.groups * shape.out_per_group, planes = shape.batch * channels;
  parallel(planes, g.out_h * g.out_w * shape.in_per_group, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / channels, channel = plane % channels;
      for (int64_t oy = 0; oy < g.out_h; ++oy)
        for (int64_t ox = 0; ox < g.out_w; ++ox)
          store(out + (plane * g.out_h + oy) * g.out_w + ox,
                conv_transpose_element<T>(shape, source, weight, bias, n, channel, oy, ox));
    }
  });
  return false;
}

}  // namespace zfk
