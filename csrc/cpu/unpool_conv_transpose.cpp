// CPU launcher: the fused deconvnet step conv_transpose2d(relu(max_unpool2d(values, switches)), weight).
// It never builds the unpooled map: each image's unpooled activations are kept as short sparse lists
// (one per unpooled position, the channels whose switch points there), and each output pixel gathers
// only those, so the work follows the switches instead of the dense unpooled size.
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/ops.h"
#include "cpu/parallel.h"
#include "cpu/simd.h"
#include "cpu/switch_decoder.h"
#include "kernels/conv_transpose.h"

namespace zfk::cpu {
namespace {

template <typename C>
struct Entry {
  int32_t channel;
  C value;
};

// Sparse unpooled activations of one image: entries[offsets[t] .. offsets[t + 1]) belong to unpooled position t.
template <typename C>
struct SparseUnpooled {
  std::vector<int64_t> offsets;
  std::vector<Entry<C>> entries;
  std::vector<int32_t> last_channel;
};

// Switch targets summed in row-major window order per channel (as max_unpool2d does), then rectified;
// entries that rectify to zero are dropped since they add nothing. Returns the invalid switches seen.
template <typename T, typename S, typename C>
int64_t build_sparse(const T* values, const S* switches, int64_t in_channels, const PoolGeometry& pool,
                     const SwitchDecoder<S>& decoder, bool relu, SparseUnpooled<C>& sparse) {
  const int64_t positions = pool.in_h * pool.in_w, pooled = pool.out_h * pool.out_w;
  sparse.offsets.assign(positions + 1, 0);
  sparse.last_channel.assign(positions, -1);
  int64_t invalid = 0;
  for (int64_t c = 0; c < in_channels; ++c) {  // count distinct (channel, position) pairs
    for (int64_t p = 0; p < pooled; ++p) {
      const int64_t t = decoder.target(p / pool.out_w, p % pool.out_w, switches[c * pooled + p]);
      if (t < 0) {
        ++invalid;
      } else if (sparse.last_channel[t] != c) {
        sparse.last_channel[t] = int32_t(c);
        ++sparse.offsets[t + 1];
      }
    }
  }
  for (int64_t t = 0; t < positions; ++t) sparse.offsets[t + 1] += sparse.offsets[t];
  sparse.entries.resize(sparse.offsets[positions]);
  std::vector<int64_t> fill(sparse.offsets.begin(), sparse.offsets.end() - 1);
  sparse.last_channel.assign(positions, -1);
  for (int64_t c = 0; c < in_channels; ++c) {
    for (int64_t p = 0; p < pooled; ++p) {
      const int64_t t = decoder.target(p / pool.out_w, p % pool.out_w, switches[c * pooled + p]);
      if (t < 0) continue;
      const C v = load(values + c * pooled + p);
      if (sparse.last_channel[t] == c) {
        sparse.entries[fill[t] - 1].value += v;  // a shared argmax: sum, like the gradient of max-pool
      } else {
        sparse.last_channel[t] = int32_t(c);
        sparse.entries[fill[t]++] = {int32_t(c), v};
      }
    }
  }
  // Rectify and compact in place; positions keep their order.
  int64_t kept = 0;
  for (int64_t t = 0; t < positions; ++t) {
    const int64_t begin = sparse.offsets[t], end = sparse.offsets[t + 1];
    sparse.offsets[t] = kept;
    for (int64_t e = begin; e < end; ++e) {
      Entry<C> entry = sparse.entries[e];
      if (relu) entry.value = zfk::relu(entry.value);
      if (entry.value != C(0)) sparse.entries[kept++] = entry;
    }
  }
  sparse.offsets[positions] = kept;
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
      for (int64_t iy = 0; iy < g.in_h; ++iy) {
        const int64_t oy = iy * g.stride_h - g.pad_h + kh * g.dilation_h;
        if (oy < 0 || oy >= g.out_h) continue;
        for (int64_t ix = 0; ix < g.in_w; ++ix) {
          const int64_t ox = ix * g.stride_w - g.pad_w + kw * g.dilation_w;
          const int64_t t = iy * g.in_w + ix;
          if (ox < 0 || ox >= g.out_w || sparse.offsets[t] == sparse.offsets[t + 1]) continue;
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
  }
  for (int64_t co = 0; co < out_channels; ++co)
    for (int64_t p = 0; p < out_plane; ++p) store(out + co * out_plane + p, pixels[p * out_padded + co]);
}

// Few output channels (an RGB first layer): vectorized along kernel rows instead of output channels, which
// would leave most lanes empty. For each unpooled position holding entries and each (output channel, kernel
// row), the entries' weight rows (zero-padded to kRowVecs vectors) are summed in registers and added once
// into `frame`, the full transposed-conv result [co][(in_h - 1) * s_h + K_h][(in_w - 1) * s_w + padded K_w]
// before cropping, so no write needs a bounds check. `row_weights` is [co][kh][ci][padded kw].
template <int kRowVecs, typename T, typename C>
ZFK_VECTORIZED void scatter_image_rows(const SparseUnpooled<C>& sparse, const C* row_weights, int64_t in_channels,
                                       int64_t out_channels, const ConvTransposeGeometry& g, int64_t frame_h,
                                       int64_t frame_w, C* frame, T* out) {
  using V = typename Simd<C>::Vec;
  constexpr int L = Simd<C>::kLanes, kRow = kRowVecs * L;
  std::fill(frame, frame + out_channels * frame_h * frame_w, C(0));
  for (int64_t iy = 0; iy < g.in_h; ++iy) {
    for (int64_t ix = 0; ix < g.in_w; ++ix) {
      const int64_t t = iy * g.in_w + ix;
      const Entry<C>* first = sparse.entries.data() + sparse.offsets[t];
      const Entry<C>* end = sparse.entries.data() + sparse.offsets[t + 1];
      if (first == end) continue;
      for (int64_t co = 0; co < out_channels; ++co) {
        for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
          const C* rows = row_weights + (co * g.kernel_h + kh) * in_channels * kRow;
          // Two accumulator sets take alternate entries: one would wait on the FMA latency every entry.
          V acc[kRowVecs] = {}, acc_odd[kRowVecs] = {};
          const Entry<C>* e = first;
          for (; e + 1 < end; e += 2) {
            const V u = broadcast<V>(e[0].value), u_odd = broadcast<V>(e[1].value);
            const C* w = rows + e[0].channel * kRow;
            const C* w_odd = rows + e[1].channel * kRow;
#pragma GCC unroll 4
            for (int v = 0; v < kRowVecs; ++v) {
              acc[v] += u * load_vec<V>(w + v * L);
              acc_odd[v] += u_odd * load_vec<V>(w_odd + v * L);
            }
          }
          if (e < end) {
            const V u = broadcast<V>(e->value);
            const C* w = rows + e->channel * kRow;
#pragma GCC unroll 4
            for (int v = 0; v < kRowVecs; ++v) acc[v] += u * load_vec<V>(w + v * L);
          }
          C* dst = frame + (co * frame_h + iy * g.stride_h + kh) * frame_w + ix * g.stride_w;
#pragma GCC unroll 4
          for (int v = 0; v < kRowVecs; ++v) store_vec(dst + v * L, load_vec<V>(dst + v * L) + acc[v] + acc_odd[v]);
        }
      }
    }
  }
  // Crop by the padding; rows or columns past the frame (output_padding) are zeros.
  for (int64_t co = 0; co < out_channels; ++co) {
    for (int64_t oy = 0; oy < g.out_h; ++oy) {
      const int64_t fy = oy + g.pad_h;
      T* dst = out + (co * g.out_h + oy) * g.out_w;
      for (int64_t ox = 0; ox < g.out_w; ++ox) {
        const int64_t fx = ox + g.pad_w;
        const bool inside = fy < frame_h && fx < frame_w;
        store(dst + ox, inside ? frame[(co * frame_h + fy) * frame_w + fx] : C(0));
      }
    }
  }
}

template <typename T, typename S, int kRowVecs>
int64_t launch_rows(const void* values, const void* switches, const void* weight, void* output, int64_t batch,
                    int64_t in_channels, int64_t out_channels, const PoolGeometry& pool,
                    const ConvTransposeGeometry& g, bool relu, int num_threads) {
  using C = compute_t<T>;
  constexpr int kRow = kRowVecs * Simd<C>::kLanes;
  std::vector<C> row_weights(out_channels * g.kernel_h * in_channels * kRow, C(0));
  const T* w = static_cast<const T*>(weight);  // [ci][co][kh][kw]
  for (int64_t ci = 0; ci < in_channels; ++ci)
    for (int64_t co = 0; co < out_channels; ++co)
      for (int64_t kh = 0; kh < g.kernel_h; ++kh)
        for (int64_t kw = 0; kw < g.kernel_w; ++kw)
          row_weights[((co * g.kernel_h + kh) * in_channels + ci) * kRow + kw] =
              load(w + ((ci * out_channels + co) * g.kernel_h + kh) * g.kernel_w + kw);
  const int64_t frame_h = (g.in_h - 1) * g.stride_h + g.kernel_h, frame_w = (g.in_w - 1) * g.stride_w + kRow;
  const int64_t pooled = pool.out_h * pool.out_w, out_image = out_channels * g.out_h * g.out_w;
  std::vector<int64_t> invalid(std::max<int64_t>(batch, 1), 0);
  const SwitchDecoder<S> decoder(pool);
  parallel_for(batch, num_threads, out_image * in_channels, [&](int64_t begin, int64_t end) {
    SparseUnpooled<C> sparse;
    std::vector<C> frame(out_channels * frame_h * frame_w);
    for (int64_t b = begin; b < end; ++b) {
      invalid[b] = build_sparse(static_cast<const T*>(values) + b * in_channels * pooled,
                                static_cast<const S*>(switches) + b * in_channels * pooled, in_channels, pool, decoder,
                                relu, sparse);
      scatter_image_rows<kRowVecs, T>(sparse, row_weights.data(), in_channels, out_channels, g, frame_h, frame_w,
                                      frame.data(), static_cast<T*>(output) + b * out_image);
    }
  });
  int64_t total = 0;
  for (int64_t n : invalid) total += n;
  return total;
}

template <typename T, typename S, int kVecs>
int64_t launch(const void* values, const void* switches, const void* weight, void* output, int64_t batch,
               int64_t in_channels, int64_t out_channels, const PoolGeometry& pool, const ConvTransposeGeometry& g,
               bool relu, int num_threads) {
  using C = compute_t<T>;
  constexpr int kBlock = kVecs * Simd<C>::kLanes;
  const int64_t taps = g.kernel_h * g.kernel_w;
  const int64_t out_padded = (out_channels + kBlock - 1) / kBlock * kBlock;
  std::vector<C> weights(taps * in_channels * out_padded, C(0));  // [kh][kw][ci][co], zero-padded in co
  const T* w = static_cast<const T*>(weight);
  for (int64_t ci = 0; ci < in_channels; ++ci)
    for (int64_t co = 0; co < out_channels; ++co)
      for (int64_t k = 0; k < taps; ++k)
        weights[(k * in_channels + ci) * out_padded + co] = load(w + (ci * out_channels + co) * taps + k);

  const int64_t pooled = pool.out_h * pool.out_w, out_image = out_channels * g.out_h * g.out_w;
  std::vector<int64_t> invalid(std::max<int64_t>(batch, 1), 0);
  const SwitchDecoder<S> decoder(pool);
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

int64_t unpool_conv_transpose2d(const void* values, const void* switches, const void* weight, void* output,
                                DType dtype, SwitchType switch_type, int64_t batch, int64_t in_channels,
                                int64_t out_channels, const PoolGeometry& pool, const ConvTransposeGeometry& g,
                                bool relu, int num_threads) {
  int64_t invalid = 0;
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
      const bool narrow = out_channels <= 4 && g.dilation_h == 1 && g.dilation_w == 1;
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
  return invalid;
}

}  // namespace zfk::cpu
