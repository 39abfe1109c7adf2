// Filter renormalization (Zeiler & Fergus, Sec. 3): a filter whose RMS exceeds the radius is rescaled to it.
// Element math shared by every backend.
#pragma once
#include <cmath>

#include "common.h"

namespace zfk {

// One element's square in double: the term of a filter's sum of squares.
template <typename T>
ZFK_HOST_DEVICE double element_square(const T* p) {
  const double v = double(load(p));
  return v * v;
}

// Sum of squares of one filter, accumulated in double whatever the storage type: the decision
// "RMS > radius" must not depend on the summation order of a few thousand squares.
template <typename T>
ZFK_HOST_DEVICE double filter_sum_of_squares(const T* filter, int64_t size) {
  double sum = 0.0;
  for (int64_t i = 0; i < size; ++i) sum += element_square(filter + i);
  return sum;
}

// The factor that brings the filter's RMS down to `radius`, or 1 when it is already within (the caller
// then leaves the filter untouched, bit for bit). NaN RMS compares false: a NaN filter is left as is.
ZFK_HOST_DEVICE double renormalize_scale(double sum_of_squares, int64_t size, double radius) {
  const double rms = std::sqrt(sum_of_squares / double(size));
  return rms > radius ? radius / rms : 1.0;
}

// One element scaled in the compute type (float for half types) and rounded once.
template <typename T>
ZFK_HOST_DEVICE void scale_element(T* p, double scale) {
  using C = compute_t<T>;
  store(p, C(load(p)) * C(scale));
}

template <typename T>
ZFK_HOST_DEVICE void scale_filter(T* filter, int64_t size, double scale) {
  for (int64_t i = 0; i < size; ++i) scale_element(filter + i, scale);
}

}  // namespace zfk
