// CPU launcher: paste windows into image-sized maps (DeconvNet's last step), clipped at the borders.
#include <algorithm>
#include <cstring>

#include "cpu/ops.h"
#include "cpu/parallel.h"

namespace zfk::cpu {

void paste_windows(const void* windows, void* images, const int64_t* targets, const int64_t* origins, DType dtype,
                   int64_t count, int64_t channels, int64_t window_h, int64_t window_w, int64_t image_h,
                   int64_t image_w, int64_t image_count, int num_threads) {
  dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    const int64_t window_size = channels * window_h * window_w, image_size = channels * image_h * image_w;
    // Each window writes only its own target image, and targets are distinct: windows run in parallel.
    parallel_for(count, num_threads, window_size, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t target = targets[i], top = origins[2 * i], left = origins[2 * i + 1];
        if (target < 0 || target >= image_count) continue;  // checked by the caller; never written
        const int64_t y0 = std::max<int64_t>(top, 0), y1 = std::min(top + window_h, image_h);
        const int64_t x0 = std::max<int64_t>(left, 0), x1 = std::min(left + window_w, image_w);
        if (y0 >= y1 || x0 >= x1) continue;
        const T* src = static_cast<const T*>(windows) + i * window_size;
        T* dst = static_cast<T*>(images) + target * image_size;
        for (int64_t c = 0; c < channels; ++c) {
          for (int64_t y = y0; y < y1; ++y) {
            std::memcpy(dst + (c * image_h + y) * image_w + x0,
                        src + (c * window_h + (y - top)) * window_w + (x0 - left), (x1 - x0) * sizeof(T));
          }
        }
      }
    });
  });
}

}  // namespace zfk::cpu
