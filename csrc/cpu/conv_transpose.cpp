// CPU launcher: col2im for transposed convolution. The GEMM itself goes to the vendor BLAS through torch.mm.
#include <vector>

#include "cpu/ops.h"
#include "cpu/parallel.h"
#include "cpu/simd.h"
#include "kernels/conv_transpose.h"

namespace zfk::cpu {
namespace {

struct Tap {
  int64_t k, source;  // kernel offset and the input row/column it reads
};

// For every output row (or column), the kernel taps that reach it, so the inner loop has no division.
std::vector<std::vector<Tap>> taps_for(int64_t out_size, int64_t kernel, int64_t stride, int64_t pad, int64_t dilation,
                                       int64_t in_size) {
  std::vector<std::vector<Tap>> taps(out_size);
  for (int64_t o = 0; o < out_size; ++o) {
    for (int64_t k = 0; k < kernel; ++k) {
      const int64_t s = conv_transpose_source(o, k, stride, pad, dilation, in_size);
      if (s >= 0) taps[o].push_back({k, s});
    }
  }
  return taps;
}

}  // namespace

void col2im(const void* cols, const void* bias, void* output, DType dtype, int64_t batch, int64_t channels,
            const ConvTransposeGeometry& g, int num_threads) {
  const auto row_taps = taps_for(g.out_h, g.kernel_h, g.stride_h, g.pad_h, g.dilation_h, g.in_h);
  const auto col_taps = taps_for(g.out_w, g.kernel_w, g.stride_w, g.pad_w, g.dilation_w, g.in_w);
  dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    using C = compute_t<T>;
    const int64_t in_plane = g.in_h * g.in_w, out_plane = g.out_h * g.out_w;
    const int64_t cols_per_channel = g.kernel_h * g.kernel_w * in_plane;
    parallel_for(batch * channels, num_threads, out_plane * 4, [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const T* channel_cols = static_cast<const T*>(cols) + plane * cols_per_channel;
        T* out = static_cast<T*>(output) + plane * out_plane;
        const C b = bias ? load(static_cast<const T*>(bias) + plane % channels) : C(0);
        for (int64_t oy = 0; oy < g.out_h; ++oy) {
          for (int64_t ox = 0; ox < g.out_w; ++ox) {
            C sum = 0;
            for (const Tap& r : row_taps[oy]) {
              const T* row = channel_cols + r.k * g.kernel_w * in_plane + r.source * g.in_w;
              for (const Tap& c : col_taps[ox]) sum += load(row + c.k * in_plane + c.source);
            }
            store(out + oy * g.out_w + ox, sum + b);
          }
        }
      }
    });
  });
}

}  // namespace zfk::cpu
