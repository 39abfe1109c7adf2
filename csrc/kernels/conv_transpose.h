// Transposed convolution: the col2im gather that follows the GEMM, shared by every backend.
#pragma once
#include "common.h"

namespace zfk {

// Geometry of a transposed convolution; "in" is its input (the small map), "out" the large one.
struct ConvTransposeGeometry {
  int64_t in_h, in_w, out_h, out_w;
  int64_t kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
};

// Input row iy that kernel row kh maps onto output row oy, or -1: oy = iy * stride - pad + kh * dilation.
ZFK_HOST_DEVICE int64_t conv_transpose_source(int64_t o, int64_t k, int64_t stride, int64_t pad, int64_t dilation,
                                              int64_t in_size) {
  const int64_t t = o + pad - k * dilation;
  if (t < 0 || t % stride != 0 || t / stride >= in_size) return -1;
  return t / stride;
}

}  // namespace zfk
