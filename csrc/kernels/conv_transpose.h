// Transposed convolution geometry, shared by every backend.
#pragma once
#include "common.h"

namespace zfk {

// Geometry of a transposed convolution; "in" is its input (the small map), "out" the large one.
struct ConvTransposeGeometry {
  int64_t in_h, in_w, out_h, out_w;
  int64_t kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
};

}  // namespace zfk
