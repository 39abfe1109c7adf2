// CPU launcher: paste windows into maps (DeconvNet's last step), clipped at the maps' borders and, optionally,
// to a per-window valid rectangle; optionally every element of each target map is written (zeros where no
// window pixel lands), so the maps need not be zeroed first.
#include <algorithm>
#include <cstring>

#include "cpu/ops.h"
#include "cpu/parallel.h"

namespace zfk::cpu {

void paste_windows(const void* windows, void* images, const int64_t* targets, const int64_t* origins,
                   const int64_t* valid, bool fill, DType dtype, int64_t count, int64_t channels, int64_t window_h,
                   int64_t window_w, int64_t image_h, int64_t image_w, int64_t image_count, int num_threads) {
  dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    const int64_t window_size = channels * window_h * window_w, image_size = channels * image_h * image_w;
    // Each window writes only its own target map, and targets are distinct: windows run in parallel.
    parallel_for(count, num_threads, fill ? image_size : window_size, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t target = targets[i], top = origins[2 * i], left = origins[2 * i + 1];
        if (target < 0 || target >= image_count) continue;  // checked by the caller; never written
        // The copied rectangle, in map coordinates: the window within the map, within its valid part.
        int64_t y0 = std::max<int64_t>(top, 0), y1 = std::min(top + window_h, image_h);
        int64_t x0 = std::max<int64_t>(left, 0), x1 = std::min(left + window_w, image_w);
        if (valid != nullptr) {
          y0 = std::max(y0, top + valid[4 * i]), x0 = std::max(x0, left + valid[4 * i + 1]);
          y1 = std::min(y1, top + valid[4 * i + 2]), x1 = std::min(x1, left + valid[4 * i + 3]);
        }
        const bool copies = y0 < y1 && x0 < x1;
        T* dst = static_cast<T*>(images) + target * image_size;
        if (!copies) {
          if (fill) std::memset(static_cast<void*>(dst), 0, image_size * sizeof(T));
          continue;
        }
        const T* src = static_cast<const T*>(windows) + i * window_size;
        for (int64_t c = 0; c < channels; ++c) {
          T* plane = dst + c * image_h * image_w;
          if (fill) std::memset(static_cast<void*>(plane), 0, y0 * image_w * sizeof(T));
          for (int64_t y = y0; y < y1; ++y) {
            T* row = plane + y * image_w;
            if (fill) std::memset(static_cast<void*>(row), 0, x0 * sizeof(T));
            std::memcpy(row + x0, src + (c * window_h + (y - top)) * window_w + (x0 - left), (x1 - x0) * sizeof(T));
            if (fill) std::memset(static_cast<void*>(row + x1), 0, (image_w - x1) * sizeof(T));
          }
          if (fill) std::memset(static_cast<void*>(plane + y1 * image_w), 0, (image_h - y1) * image_w * sizeof(T));
        }
      }
    });
  });
}

}  // namespace zfk::cpu
