// CPU launcher: direct transposed convolution for few output channels. Wider ones go to oneDNN through torch.
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu/ops.h"
#include "cpu/parallel.h"
#include "cpu/simd.h"
#include "kernels/conv_transpose_tiled.h"

namespace zfk::cpu {

namespace {

template <typename T>
ZFK_VECTORIZED bool finite_elements(const T* data, int64_t n) {
  int bad = 0;  // or-ed flags, not a float sum: vectorizes without reassociating anything
  if constexpr (std::is_same_v<T, Half> || std::is_same_v<T, BFloat16>) {
    // Half types by their bits (no conversion): non-finite means an all-ones exponent.
    constexpr uint16_t kExponent = std::is_same_v<T, Half> ? 0x7C00 : 0x7F80;
    for (int64_t i = 0; i < n; ++i) bad |= int((data[i].bits & kExponent) == kExponent);
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const T d = data[i] - data[i];  // 0 for a finite element, NaN otherwise
      bad |= int(d != d);
    }
  }
  return bad == 0;
}

// Direct transposed convolution for few output channels (ZFNet's layer 1 projects 96 maps to 3), where
// a GEMM is all overhead. Output column ox = stride * m + r only meets kernel columns kw = r + pad (mod
// stride), each reading input column m + d(kw): so for one output row and residue r, a vector over m
// reads contiguous input. Rows are copied with a zero halo so those loads need no bounds checks.
template <int kOut, int kVecs, typename T>
ZFK_VECTORIZED void direct_image(const T* input, const T* weights, const T* bias, T* output, int64_t in_channels,
                                 const ConvTransposeGeometry& g, int64_t halo, int64_t padded_w, T* padded,
                                 T* row_out) {
  using V = typename Simd<T>::Vec;
  constexpr int L = Simd<T>::kLanes, kChunk = kVecs * L;
  for (int64_t c = 0; c < in_channels; ++c) {
    for (int64_t y = 0; y < g.in_h; ++y) {
      T* dst = padded + (y * in_channels + c) * padded_w;  // [y][c][x]: one input row of every channel together
      std::fill(dst, dst + padded_w, T(0));
      std::copy(input + (c * g.in_h + y) * g.in_w, input + (c * g.in_h + y + 1) * g.in_w, dst + halo);
    }
  }
  // Taps that reach each output row (kernel row, input row) and each column residue r (kernel column,
  // input-column shift), listed once so the hot loops never test parity or divide.
  struct Tap {
    int64_t k, offset;
  };
  // Residues past the output's width have no columns: a stride wider than the output sizes nothing here.
  std::vector<std::vector<Tap>> row_taps(g.out_h), column_taps(std::min(g.stride_w, g.out_w));
  for (int64_t oy = 0; oy < g.out_h; ++oy) {
    for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
      const int64_t ty = oy + g.pad_h - kh;
      if (ty >= 0 && ty % g.stride_h == 0 && ty / g.stride_h < g.in_h) row_taps[oy].push_back({kh, ty / g.stride_h});
    }
  }
  for (int64_t r = 0; r < int64_t(column_taps.size()); ++r) {
    for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
      const int64_t tx = r + g.pad_w - kw;  // ix = m + tx / stride when divisible
      const int64_t shift = tx >= 0 ? tx / g.stride_w : -((-tx) / g.stride_w);
      if (tx - shift * g.stride_w == 0) column_taps[r].push_back({kw, shift + halo});
    }
  }
  for (int64_t oy = 0; oy < g.out_h; ++oy) {
    for (int64_t r = 0; r < g.stride_w && r < g.out_w; ++r) {
      const int64_t columns = (g.out_w - r + g.stride_w - 1) / g.stride_w;  // ox = r, r + stride, ...
      for (int64_t m0 = 0; m0 < columns; m0 += kChunk) {
        V acc[kOut][kVecs] = {};
        for (const Tap& row : row_taps[oy]) {
          for (const Tap& column : column_taps[r]) {
            // [tap][c][out][lane]: each weight stored already broadcast, so it feeds the FMA as a plain load.
            const T* w = weights + (row.k * g.kernel_w + column.k) * in_channels * kOut * L;
            const T* x = padded + row.offset * in_channels * padded_w + column.offset + m0;
            for (int64_t c = 0; c < in_channels; ++c, x += padded_w, w += kOut * L) {
              V xv[kVecs];
              for (int v = 0; v < kVecs; ++v) xv[v] = load_vec<V>(x + v * L);
              for (int o = 0; o < kOut; ++o) {
                const V wv = load_vec<V>(w + o * L);
                for (int v = 0; v < kVecs; ++v) acc[o][v] += wv * xv[v];
              }
            }
          }
        }
        const int64_t n = std::min<int64_t>(kChunk, columns - m0);
        for (int o = 0; o < kOut; ++o) {
          T* row = row_out + o * kChunk;
          for (int v = 0; v < kVecs; ++v) store_vec(row + v * L, acc[o][v]);
          T* out = output + (o * g.out_h + oy) * g.out_w + r + m0 * g.stride_w;
          const T b = bias ? bias[o] : T(0);
          for (int64_t j = 0; j < n; ++j) out[j * g.stride_w] = row[j] + b;
        }
      }
    }
  }
}

// Returns false, having written nothing, when the weight holds a NaN or an infinity: the zero halo times
// such a weight would be NaN where torch forms no product at all, so the caller runs the exact (torch) path.
template <int kOut, typename T>
bool direct_launch(const T* input, const T* weight, const T* bias, T* output, int64_t batch, int64_t in_channels,
                   const ConvTransposeGeometry& g, int num_threads) {
  // Accumulators, input vectors and one weight broadcast must fit the 16 vector registers.
  constexpr int L = Simd<T>::kLanes, kVecs = std::min(4, 15 / (kOut + 1)), kChunk = kVecs * L;
  const int64_t taps = g.kernel_h * g.kernel_w;
  std::vector<T> weights(taps * in_channels * kOut * L);  // [tap][c][out][lane], each weight broadcast
  bool finite = true;  // checked while copying: the copy reads every weight anyway
  for (int64_t c = 0; c < in_channels; ++c) {
    for (int o = 0; o < kOut; ++o) {
      for (int64_t k = 0; k < taps; ++k) {
        const T w = weight[(c * kOut + o) * taps + k];
        finite &= std::isfinite(w);
        std::fill_n(weights.begin() + ((k * in_channels + c) * kOut + o) * L, L, w);
      }
    }
  }
  if (!finite) return false;
  // Halo: the farthest input column a chunk reads left of 0 or right of in_w, plus a chunk of slack.
  const int64_t reach = (g.kernel_w + g.pad_w) / g.stride_w + 1;
  const int64_t halo = reach + 1, padded_w = halo + g.in_w + reach + kChunk + 1;
  parallel_for(batch, num_threads, in_channels * g.out_h * g.out_w * kOut, [&](int64_t begin, int64_t end) {
    std::vector<T> padded(in_channels * g.in_h * padded_w), row_out(kOut * kChunk);
    for (int64_t b = begin; b < end; ++b) {
      direct_image<kOut, kVecs>(input + b * in_channels * g.in_h * g.in_w, weights.data(), bias,
                                output + b * kOut * g.out_h * g.out_w, in_channels, g, halo, padded_w, padded.data(),
                                row_out.data());
    }
  });
  return true;
}

}  // namespace

bool conv_transpose2d_direct(const void* input, const void* weight, const void* bias, void* output, DType dtype,
                             int64_t batch, int64_t in_channels, int64_t out_channels, const ConvTransposeGeometry& g,
                             int num_threads) {
  if (out_channels < 1 || out_channels > 4 || g.dilation_h != 1 || g.dilation_w != 1) return false;
  if (dtype != DType::Float32 && dtype != DType::Float64) return false;
  bool ran = false;
  dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
      const auto run = [&](auto out) {
        ran = direct_launch<decltype(out)::value>(static_cast<const T*>(input), static_cast<const T*>(weight),
                                                  static_cast<const T*>(bias), static_cast<T*>(output), batch,
                                                  in_channels, g, num_threads);
      };
      switch (out_channels) {
        case 1: return run(std::integral_constant<int, 1>{});
        case 2: return run(std::integral_constant<int, 2>{});
        case 3: return run(std::integral_constant<int, 3>{});
        default: return run(std::integral_constant<int, 4>{});
      }
    }
  });
  return ran;
}

bool all_finite(const void* data, DType dtype, int64_t n) {
  bool finite = true;
  dispatch_dtype(dtype, [&](auto t) { finite = finite_elements(static_cast<const decltype(t)*>(data), n); });
  return finite;
}

// The CUDA kernels' algorithm on the CPU (test entry point, not a fast path): the tiled block algorithm of
// kernels/conv_transpose_tiled.h run thread by thread between its barriers, or, when no tile plan fits or
// `force_elements`, its per-output definition. Returns whether the tiled algorithm ran.
bool conv_transpose2d_tiled(const void* input, const void* weight, const void* bias, void* output, DType dtype,
                            int64_t batch, int64_t in_channels, int64_t out_channels, int64_t groups,
                            const ConvTransposeGeometry& g, bool force_elements, int num_threads) {
  if (groups < 1 || in_channels % groups != 0 || out_channels % groups != 0)
    throw std::invalid_argument("zfkernels: conv_transpose2d channels must divide into groups");
  const ConvShape shape{g, batch, groups, in_channels / groups, out_channels / groups};
  const auto parallel = [num_threads](int64_t n, int64_t work, const auto& body) {
    parallel_for(n, num_threads, work, body);
  };
  bool tiled = false;
  dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    const DenseInput<T> source{static_cast<const T*>(input), in_channels, g.in_h, g.in_w};
    tiled = emulate_conv_transpose(shape, source, static_cast<const T*>(weight), static_cast<const T*>(bias),
                                   static_cast<T*>(output), force_elements, parallel);
  });
  return tiled;
}

}  // namespace zfk::cpu
