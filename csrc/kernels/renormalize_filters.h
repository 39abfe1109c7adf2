// Filter renormalization (Zeiler & Fergus, Sec. 3): a filter whose RMS exceeds the radius is rescaled to it.
// Element math shared by every backend.
#pragma once
#include <cmath>

#include "common.h"

namespace zfk {

// Sum of squares of one filter, accumulated in double whatever the storage type: the decision
// "RMS > radius" must not depend on the summation order of a few thousand squares.
template <typename T>
ZFK_HOST_DEVICE double filter_sum_of_squares(const T* filter, int64_t size) {
  double sum = 0.0;
  for (int64_t i = 0; i < size; ++i) {
    const double v = double(load(filter + i));
    sum += v * v;
  }
  return sum;
}

// The factor that brings the filter's RMS down to `radius`, or 1 when it is already within (the caller
// then leaves the filter untouched, bit for bit). NaN RMS compares false: a NaN filter is left as is.
ZFK_HOST_DEVICE double renormalize_scale(double sum_of_squares, int64_t size, double radius) {
  const double rms = std::sqrt(sum_of_squares / double(size));
  return rms > radius ? radius / rms : 1.0;
}

template <typename T>
ZFK_HOST_DEVICE void scale_filter(T* filter, int64_t size, double scale) {
  using C = compute_t<T>;
  for (int64_t i = 0; i < size; ++i) store(filter + i, C(load(filter + i)) * C(scale));
}

}  // namespace zfk
