// CPU launcher: the fused deconvnet step conv_transpose2d(relu(max_unpool2d(values, switches)), weight).
// It never builds the unpooled map: each image's unpooled activations are kept as short sparse lists
// (one per unpooled position, the channels whose switch points there), and each output pixel gathers
// only those, so the work follows the switches instead of the dense unpooled size.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/ops.h"
#include "cpu/parallel.h"
#include "cpu/simd.h"
#include "cpu/switch_decoder.h"
#include "kernels/conv_transpose.h"
#include "kernels/conv_transpose_tiled.h"
#include "kernels/max_unpool.h"

namespace zfk::cpu {
namespace {

template <typename C>
struct Entry {
  int32_t channel;
  C value;
};

template <typename C>
struct Contribution {
  int32_t position;  // unpooled position the switch points at
  int32_t channel;
  C value;
};

// Sparse unpooled activations of one image: entries[offsets[t] .. offsets[t + 1]) belong to unpooled position
// t, ascending in channel; `occupied` lists the positions holding any, ascending; `finite`: no entry is NaN or
// infinite. Buffers are reused across images, so building allocates nothing after the first image.
template <typename C>
struct SparseUnpooled {
  bool finite = true;
  std::vector<int64_t> offsets;
  std::vector<Entry<C>> entries;
  std::vector<int64_t> occupied;
  std::vector<Contribution<C>> contributions;
  std::vector<int64_t> cursor;
};

// Switch targets summed in row-major window order per channel (as max_unpool2d does), then rectified; values
// that are zero add nothing to any sum and are skipped before sorting (a windowed deconvnet signal is mostly
// zeros), entries that rectify to zero are dropped. Every switch is still validated. Returns the invalid
// switches seen.
template <typename T, typename S, typename C>
int64_t build_sparse(const T* values, const S* switches, int64_t in_channels, const PoolGeometry& pool,
                     const SwitchDecoder<S>& decoder, bool relu, SparseUnpooled<C>& sparse) {
  const int64_t positions = pool.in_h * pool.in_w, pooled = pool.out_h * pool.out_w;
  int64_t invalid = 0, count = 0;
  sparse.contributions.resize(in_channels * pooled);  // the most there can be: no growth checks below
  for (int64_t c = 0; c < in_channels; ++c) {  // channel-major, row-major: the order sums are taken in
    const T* channel_values = values + c * pooled;
    decoder.for_each_target(switches + c * pooled, [&](int64_t p, int64_t t) {
      if (t < 0) {
        ++invalid;
        return;
      }
      const C v = load(channel_values + p);
      if (v != C(0)) sparse.contributions[count++] = {int32_t(t), int32_t(c), v};
    });
  }
  // Stable counting sort by position keeps each position's contributions in (channel, pooled) order.
  const Contribution<C>* contributions = sparse.contributions.data();
  sparse.offsets.assign(positions + 1, 0);
  for (int64_t i = 0; i < count; ++i) ++sparse.offsets[contributions[i].position + 1];
  for (int64_t t = 0; t < positions; ++t) sparse.offsets[t + 1] += sparse.offsets[t];
  sparse.cursor.assign(sparse.offsets.begin(), sparse.offsets.end() - 1);
  sparse.entries.resize(count);
  for (int64_t i = 0; i < count; ++i)
    sparse.entries[sparse.cursor[contributions[i].position]++] = {contributions[i].channel, contributions[i].value};
  // Sum a channel's shared argmaxes (adjacent after the sort), rectify, drop zeros; compact in place.
  sparse.occupied.clear();
  bool finite = true;
  int64_t kept = 0;
  for (int64_t t = 0; t < positions; ++t) {
    const int64_t begin = sparse.offsets[t], end = sparse.offsets[t + 1];
    sparse.offsets[t] = kept;
    for (int64_t e = begin; e < end; ++e) {
      Entry<C> entry = sparse.entries[e];
      while (e + 1 < end && sparse.entries[e + 1].channel == entry.channel) entry.value += sparse.entries[++e].value;
      if (relu) entry.value = zfk::relu(entry.value);
      if (entry.value != C(0)) {
        finite &= bool(std::isfinite(entry.value));
        sparse.entries[kept++] = entry;
      }
    }
    if (kept > sparse.offsets[t]) sparse.occupied.push_back(t);
  }
  sparse.offsets[positions] = kept;
  sparse.finite = finite;
  return invalid;
}

// One image, tap by tap: for kernel tap (kh, kw) and unpooled position t, a block of kVecs vectors of
// output channels sums t's sparse entries against the tap's weights in registers, then adds into the
// output pixel t reaches through that tap. Going tap by tap keeps the tap's weights ([in][out_padded],
// ~100 KB at ZFNet's layer 2) in L2 while every position streams past. `pixels` is a channels-last
// accumulator [out_h * out_w][out_padded], transposed into the NCHW output at the end.
template <int kVecs, typename T, typename C>
ZFK_VECTORIZED void scatter_image(const SparseUnpooled<C>& sparse, const C* weights, int64_t in_channels,
                                  int64_t out_channels, int64_t out_padded, const ConvTransposeGeometry& g,
                                  C* pixels, T* out) {
  using V = typename Simd<C>::Vec;
  constexpr int L = Simd<C>::kLanes, kBlock = kVecs * L;
  const int64_t out_plane = g.out_h * g.out_w;
  std::fill(pixels, pixels + out_plane * out_padded, C(0));
  for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
    for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
      const C* tap = weights + (kh * g.kernel_w + kw) * in_channels * out_padded;
      for (const int64_t t : sparse.occupied) {
        const int64_t iy = t / g.in_w, ix = t % g.in_w;
        const int64_t oy = iy * g.stride_h - g.pad_h + kh * g.dilation_h;
        const int64_t ox = ix * g.stride_w - g.pad_w + kw * g.dilation_w;
        if (oy < 0 || oy >= g.out_h || ox < 0 || ox >= g.out_w) continue;
        const Entry<C>* first = sparse.entries.data() + sparse.offsets[t];
        const Entry<C>* end = sparse.entries.data() + sparse.offsets[t + 1];
        C* pixel = pixels + (oy * g.out_w + ox) * out_padded;
        for (int64_t co0 = 0; co0 < out_padded; co0 += kBlock) {
          // Two accumulator sets take alternate entries: one would wait on the FMA latency every entry.
          V acc[kVecs] = {}, acc_odd[kVecs] = {};
          const Entry<C>* e = first;
          for (; e + 1 < end; e += 2) {
            const V u = broadcast<V>(e[0].value), u_odd = broadcast<V>(e[1].value);
            const C* w = tap + e[0].channel * out_padded + co0;
            const C* w_odd = tap + e[1].channel * out_padded + co0;
#pragma GCC unroll 8
            for (int v = 0; v < kVecs; ++v) {
              acc[v] += u * load_vec<V>(w + v * L);
              acc_odd[v] += u_odd * load_vec<V>(w_odd + v * L);
            }
          }
          if (e < end) {
            const V u = broadcast<V>(e->value);
            const C* w = tap + e->channel * out_padded + co0;
#pragma GCC unroll 8
            for (int v = 0; v < kVecs; ++v) acc[v] += u * load_vec<V>(w + v * L);
          }
#pragma GCC unroll 8
          for (int v = 0; v < kVecs; ++v) {
            C* dst = pixel + co0 + v * L;
            store_vec(dst, load_vec<V>(dst) + acc[v] + acc_odd[v]);
          }
        }
      }
    }
  }
  for (int64_t co = 0; co < out_channels; ++co)
    for (int64_t p = 0; p < out_plane; ++p) store(out + co * out_plane + p, pixels[p * out_padded + co]);
}

// Few output channels (an RGB first layer): vectorized along kernel rows instead of output channels, which
// would leave most lanes empty. An output "row" r = (co, kh) of one unpooled position is a kernel row of
// weights (zero-padded to kRowVecs vectors) scaled by each entry's value and added into `frame`, the full
// transposed-conv result [co][(in_h - 1) * s_h + K_h][(in_w - 1) * s_w + padded K_w] before cropping, so no
// write needs a bounds check. A position holds few entries (a handful of channels), so the loop runs over
// blocks of kRowsPerBlock rows with every row of the block in registers, entries innermost: each entry's
// weights for a block are contiguous in `row_weights` ([ci][padded rows][kRow]). Rows are padded to whole
// blocks with zero weights aimed at row 0 (adding zeros there changes nothing). An image holding a NaN or an
// infinity takes a scalar loop over the real taps only: the padding weights would turn it into NaN elsewhere.
template <int kRowVecs>
constexpr int kRowsPerBlock = kRowVecs == 1 ? 12 : kRowVecs == 2 ? 6 : 3;  // 12 accumulators of 16 registers

template <int kRowVecs, typename T, typename C>
ZFK_VECTORIZED void scatter_image_rows(const SparseUnpooled<C>& sparse, const C* row_weights,
                                       const int64_t* row_offsets, int64_t padded_rows, int64_t out_channels,
                                       const ConvTransposeGeometry& g, int64_t frame_h, int64_t frame_w, C* frame,
                                       T* out) {
  using V = typename Simd<C>::Vec;
  constexpr int L = Simd<C>::kLanes, kRow = kRowVecs * L, kBlock = kRowsPerBlock<kRowVecs>;
  std::fill(frame, frame + out_channels * frame_h * frame_w, C(0));
  if (!sparse.finite) {
    const int64_t rows = out_channels * g.kernel_h;
    for (const int64_t t : sparse.occupied) {
      const int64_t iy = t / g.in_w, ix = t % g.in_w;
      C* base = frame + iy * g.stride_h * frame_w + ix * g.stride_w;
      for (int64_t e = sparse.offsets[t]; e < sparse.offsets[t + 1]; ++e) {
        const Entry<C> entry = sparse.entries[e];
        for (int64_t r = 0; r < rows; ++r) {
          const C* w = row_weights + (entry.channel * padded_rows + r) * kRow;
          C* dst = base + row_offsets[r];
          for (int64_t kw = 0; kw < g.kernel_w; ++kw) dst[kw] += entry.value * w[kw];
        }
      }
    }
  } else {
    // Block-major: one block's weights for every channel (kBlock rows x kRow x channels: 24 KB at AlexNet's
    // conv1) stay in L1 while every position streams past; position-major reloaded them from L2 per entry.
    for (int64_t block = 0; block < padded_rows; block += kBlock) {
      for (const int64_t t : sparse.occupied) {
        const int64_t iy = t / g.in_w, ix = t % g.in_w;
        C* base = frame + iy * g.stride_h * frame_w + ix * g.stride_w;
        const Entry<C>* first = sparse.entries.data() + sparse.offsets[t];
        const Entry<C>* end = sparse.entries.data() + sparse.offsets[t + 1];
        V acc[kBlock][kRowVecs] = {};
        for (const Entry<C>* e = first; e < end; ++e) {
          const V u = broadcast<V>(e->value);
          const C* w = row_weights + (e->channel * padded_rows + block) * kRow;
#pragma GCC unroll 12
          for (int i = 0; i < kBlock; ++i) {
#pragma GCC unroll 4
            for (int v = 0; v < kRowVecs; ++v) acc[i][v] += u * load_vec<V>(w + i * kRow + v * L);
          }
        }
#pragma GCC unroll 12
        for (int i = 0; i < kBlock; ++i) {
          C* dst = base + row_offsets[block + i];
#pragma GCC unroll 4
          for (int v = 0; v < kRowVecs; ++v) store_vec(dst + v * L, load_vec<V>(dst + v * L) + acc[i][v]);
        }
      }
    }
  }
  // Crop by the padding, row by row; rows or columns past the frame (output_padding) are zeros.
  const int64_t inside_w = std::clamp<int64_t>(frame_w - g.pad_w, 0, g.out_w);
  for (int64_t co = 0; co < out_channels; ++co) {
    for (int64_t oy = 0; oy < g.out_h; ++oy) {
      const int64_t fy = oy + g.pad_h;
      T* dst = out + (co * g.out_h + oy) * g.out_w;
      const int64_t n = fy < frame_h ? inside_w : 0;
      const C* src = frame + (co * frame_h + fy) * frame_w + g.pad_w;
      for (int64_t ox = 0; ox < n; ++ox) store(dst + ox, src[ox]);
      for (int64_t ox = n; ox < g.out_w; ++ox) store(dst + ox, C(0));
    }
  }
}

// Both launchers return the invalid switches seen, or nothing (having written nothing) when the weight holds a
// NaN or an infinity: torch's dense composition multiplies it by every zero of the unpooled map, which the
// sparse lists leave out, so the caller runs that composition instead (checked while the weights are copied).
template <typename T, typename S, int kRowVecs>
std::optional<int64_t> launch_rows(const void* values, const void* switches, const void* weight, void* output, int64_t batch,
                    int64_t in_channels, int64_t out_channels, const PoolGeometry& pool,
                    const ConvTransposeGeometry& g, bool relu, int num_threads) {
  using C = compute_t<T>;
  constexpr int kRow = kRowVecs * Simd<C>::kLanes, kBlock = kRowsPerBlock<kRowVecs>;
  const int64_t frame_h = (g.in_h - 1) * g.stride_h + g.kernel_h, frame_w = (g.in_w - 1) * g.stride_w + kRow;
  const int64_t rows = out_channels * g.kernel_h, padded_rows = (rows + kBlock - 1) / kBlock * kBlock;
  std::vector<int64_t> row_offsets(padded_rows, 0);  // padding rows add zeros into row 0
  for (int64_t co = 0; co < out_channels; ++co)
    for (int64_t kh = 0; kh < g.kernel_h; ++kh) row_offsets[co * g.kernel_h + kh] = (co * frame_h + kh) * frame_w;
  std::vector<C> row_weights(in_channels * padded_rows * kRow, C(0));
  const T* w = static_cast<const T*>(weight);  // [ci][co][kh][kw]
  bool finite = true;
  for (int64_t ci = 0; ci < in_channels; ++ci) {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
        const C value = load(w + (ci * rows + r) * g.kernel_w + kw);
        finite &= bool(std::isfinite(value));
        row_weights[(ci * padded_rows + r) * kRow + kw] = value;
      }
    }
  }
  if (!finite) return std::nullopt;
  const int64_t pooled = pool.out_h * pool.out_w, out_image = out_channels * g.out_h * g.out_w;
  std::vector<int64_t> invalid(std::max<int64_t>(batch, 1), 0);
  const SwitchDecoder<S> decoder(pool, batch * in_channels * pooled);
  parallel_for(batch, num_threads, out_image * in_channels, [&](int64_t begin, int64_t end) {
    SparseUnpooled<C> sparse;
    std::vector<C> frame(out_channels * frame_h * frame_w);
    for (int64_t b = begin; b < end; ++b) {
      invalid[b] = build_sparse(static_cast<const T*>(values) + b * in_channels * pooled,
                                static_cast<const S*>(switches) + b * in_channels * pooled, in_channels, pool, decoder,
                                relu, sparse);
      scatter_image_rows<kRowVecs, T>(sparse, row_weights.data(), row_offsets.data(), padded_rows, out_channels, g,
                                      frame_h, frame_w, frame.data(), static_cast<T*>(output) + b * out_image);
    }
  });
  int64_t total = 0;
  for (int64_t n : invalid) total += n;
  return total;
}

template <typename T, typename S, int kVecs>
std::optional<int64_t> launch(const void* values, const void* switches, const void* weight, void* output, int64_t batch,
               int64_t in_channels, int64_t out_channels, const PoolGeometry& pool, const ConvTransposeGeometry& g,
               bool relu, int num_threads) {
  using C = compute_t<T>;
  constexpr int kBlock = kVecs * Simd<C>::kLanes;
  const int64_t taps = g.kernel_h * g.kernel_w;
  const int64_t out_padded = (out_channels + kBlock - 1) / kBlock * kBlock;
  std::vector<C> weights(taps * in_channels * out_padded, C(0));  // [kh][kw][ci][co], zero-padded in co
  const T* w = static_cast<const T*>(weight);
  bool finite = true;
  for (int64_t ci = 0; ci < in_channels; ++ci) {
    for (int64_t co = 0; co < out_channels; ++co) {
      for (int64_t k = 0; k < taps; ++k) {
        const C value = load(w + (ci * out_channels + co) * taps + k);
        finite &= bool(std::isfinite(value));
        weights[(k * in_channels + ci) * out_padded + co] = value;
      }
    }
  }
  if (!finite) return std::nullopt;

  const int64_t pooled = pool.out_h * pool.out_w, out_image = out_channels * g.out_h * g.out_w;
  std::vector<int64_t> invalid(std::max<int64_t>(batch, 1), 0);
  const SwitchDecoder<S> decoder(pool, batch * in_channels * pooled);
  parallel_for(batch, num_threads, out_image * in_channels, [&](int64_t begin, int64_t end) {
    SparseUnpooled<C> sparse;
    std::vector<C> pixels(g.out_h * g.out_w * out_padded);
    for (int64_t b = begin; b < end; ++b) {
      invalid[b] = build_sparse(static_cast<const T*>(values) + b * in_channels * pooled,
                                static_cast<const S*>(switches) + b * in_channels * pooled, in_channels, pool, decoder,
                                relu, sparse);
      scatter_image<kVecs, T>(sparse, weights.data(), in_channels, out_channels, out_padded, g, pixels.data(),
                              static_cast<T*>(output) + b * out_image);
    }
  });
  int64_t total = 0;
  for (int64_t n : invalid) total += n;
  return total;
}

}  // namespace

std::pair<int64_t, bool> unpool_conv_transpose2d(const void* values, const void* switches, const void* weight,
                                                void* output, DType dtype, SwitchType switch_type, int64_t batch,
                                                int64_t in_channels, int64_t out_channels, const PoolGeometry& pool,
                                                const ConvTransposeGeometry& g, bool relu, int num_threads) {
  std::optional<int64_t> invalid;
  dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    dispatch_switch(switch_type, [&](auto s) {
      using S = decltype(s);
      // Block width: the widest (two sets of at most 6 accumulators fit the 16 vector registers) that divides
      // the output channels, so little of the zero padding is computed; narrow outputs take one vector.
      constexpr int L = Simd<compute_t<T>>::kLanes;
      const auto run = [&](auto vecs) {
        invalid = launch<T, S, decltype(vecs)::value>(values, switches, weight, output, batch, in_channels,
                                                        out_channels, pool, g, relu, num_threads);
      };
      const auto run_rows = [&](auto row_vecs) {
        invalid = launch_rows<T, S, decltype(row_vecs)::value>(values, switches, weight, output, batch, in_channels,
                                                               out_channels, pool, g, relu, num_threads);
      };
      // The rows path accumulates the uncropped result: not where the padding crops most of it away (a frame
      // sized by the padding rather than by the output). Counted in double: no overflow for any geometry.
      const double frame_h = double(g.in_h - 1) * double(g.stride_h) + double(g.kernel_h);
      const double frame_w = double(g.in_w - 1) * double(g.stride_w) + double(4 * L);
      const bool frame_fits = frame_h * frame_w <= 4.0 * double(g.out_h) * double(g.out_w) + double(1 << 16);
      const bool narrow = out_channels <= 4 && g.dilation_h == 1 && g.dilation_w == 1 && frame_fits;
      if (narrow && g.kernel_w <= L) {
        run_rows(std::integral_constant<int, 1>{});
      } else if (narrow && g.kernel_w <= 2 * L) {
        run_rows(std::integral_constant<int, 2>{});
      } else if (narrow && g.kernel_w <= 4 * L) {
        run_rows(std::integral_constant<int, 4>{});
      } else if (out_channels % (6 * L) == 0) {
        run(std::integral_constant<int, 6>{});
      } else if (out_channels >= 4 * L) {
        run(std::integral_constant<int, 4>{});
      } else if (out_channels >= 2 * L) {
        run(std::integral_constant<int, 2>{});
      } else {
        run(std::integral_constant<int, 1>{});
      }
    });
  });
  return {invalid.value_or(0), invalid.has_value()};
}

// The CUDA kernels' algorithm on the CPU (test entry point, not a fast path): the tiled transposed
// convolution of kernels/conv_transpose_tiled.h whose input tiles are built from the pooled map by
// UnpooledInput (gather, rectify, round to the storage type), or its per-output definition when no tile plan
// fits or `force_elements`; switches validated with invalid_switch. Returns (invalid switches, tiled ran).
std::pair<int64_t, bool> unpool_conv_transpose2d_tiled(const void* values, const void* switches, const void* weight,
                                                       void* output, DType dtype, SwitchType switch_type,
                                                       int64_t batch, int64_t in_channels, int64_t out_channels,
                                                       const PoolGeometry& pool, const ConvTransposeGeometry& g,
                                                       bool relu, bool force_elements, int num_threads) {
  if (pool.in_h != g.in_h || pool.in_w != g.in_w)
    throw std::invalid_argument("zfkernels: unpool_conv_transpose2d's unpooled size must be the convolution's input");
  const ConvShape shape{g, batch, 1, in_channels, out_channels};
  const auto parallel = [num_threads](int64_t n, int64_t work, const auto& body) {
    parallel_for(n, num_threads, work, body);
  };
  int64_t invalid = 0;
  bool tiled = false;
  dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    dispatch_switch(switch_type, [&](auto s) {
      using S = decltype(s);
      constexpr bool kFlat = std::is_same_v<S, int64_t>;
      const S* sw = static_cast<const S*>(switches);
      for (int64_t plane = 0; plane < batch * in_channels; ++plane)
        for (int64_t oh = 0; oh < pool.out_h; ++oh)
          for (int64_t ow = 0; ow < pool.out_w; ++ow)
            invalid += invalid_switch(pool, oh, ow, sw[(plane * pool.out_h + oh) * pool.out_w + ow], kFlat);
      const UnpooledInput<T, S> source{static_cast<const T*>(values), sw, pool, in_channels, kFlat, relu};
      tiled = emulate_conv_transpose(shape, source, static_cast<const T*>(weight), static_cast<const T*>(nullptr),
                                     static_cast<T*>(output), force_elements, parallel);
    });
  });
  return {invalid, tiled};
}

}  // namespace zfk::cpu
