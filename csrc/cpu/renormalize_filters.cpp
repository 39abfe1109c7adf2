// CPU launcher: filter renormalization in place, one filter per task (a filter is contiguous in OIHW).
#include "cpu/ops.h"
#include "cpu/parallel.h"
#include "kernels/renormalize_filters.h"

namespace zfk::cpu {

void renormalize_filters(void* weight, DType dtype, int64_t filters, int64_t filter_size, double radius,
                         int num_threads) {
  dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    parallel_for(filters, num_threads, filter_size, [&](int64_t begin, int64_t end) {
      for (int64_t f = begin; f < end; ++f) {
        T* filter = static_cast<T*>(weight) + f * filter_size;
        const double scale = renormalize_scale(filter_sum_of_squares(filter, filter_size), filter_size, radius);
        if (scale != 1.0) scale_filter(filter, filter_size, scale);
      }
    });
  });
}

}  // namespace zfk::cpu
