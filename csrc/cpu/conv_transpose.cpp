// CPU launcher: col2im for transposed convolution. The GEMM itself goes to the vendor BLAS through torch.mm.
#include <algorithm>
#include <vector>

#include "cpu/ops.h"
#include "cpu/parallel.h"

namespace zfk::cpu {

// Columns come from the GEMM input^T @ weight, laid out [image][group][in_h * in_w][channel in group][kh][kw]:
// that orientation keeps the GEMM's long dimension (pixels) as its rows, where the BLAS is fastest. The
// columns are then read in order, each pixel's row added into its output window (an image's output stays
// in cache while its columns stream by), one thread per (image, group) so the sums are deterministic.
void col2im(const void* cols, const void* bias, void* output, DType dtype, int64_t batch, int64_t channels,
            int64_t groups, const ConvTransposeGeometry& g, int num_threads) {
  dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    using C = compute_t<T>;
    const int64_t in_plane = g.in_h * g.in_w, out_plane = g.out_h * g.out_w;
    const int64_t taps = g.kernel_h * g.kernel_w, per_group = channels / groups;
    const int64_t pixel_stride = per_group * taps;  // between adjacent input pixels in the columns
    parallel_for(batch * groups, num_threads, in_plane * pixel_stride, [&](int64_t begin, int64_t end) {
      std::vector<C> acc(per_group * out_plane);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t image = task / groups, group = task % groups;
        for (int64_t j = 0; j < per_group; ++j) {
          const C b = bias ? load(static_cast<const T*>(bias) + group * per_group + j) : C(0);
          std::fill(acc.begin() + j * out_plane, acc.begin() + (j + 1) * out_plane, b);
        }
        const T* pixel = static_cast<const T*>(cols) + task * in_plane * pixel_stride;
        for (int64_t iy = 0; iy < g.in_h; ++iy) {
          for (int64_t ix = 0; ix < g.in_w; ++ix, pixel += pixel_stride) {
            for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
              const int64_t oy = iy * g.stride_h - g.pad_h + kh * g.dilation_h;
              if (oy < 0 || oy >= g.out_h) continue;
              for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
                const int64_t ox = ix * g.stride_w - g.pad_w + kw * g.dilation_w;
                if (ox < 0 || ox >= g.out_w) continue;
                C* target = acc.data() + oy * g.out_w + ox;
                const T* source = pixel + kh * g.kernel_w + kw;
                for (int64_t j = 0; j < per_group; ++j) target[j * out_plane] += load(source + j * taps);
              }
            }
          }
        }
        T* out = static_cast<T*>(output) + (image * channels + group * per_group) * out_plane;
        for (int64_t i = 0; i < per_group * out_plane; ++i) store(out + i, acc[i]);
      }
    });
  });
}

}  // namespace zfk::cpu
