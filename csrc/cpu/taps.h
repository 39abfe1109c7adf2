// Transposed-convolution taps per output row or column, precomputed so inner loops never divide.
#pragma once
#include <vector>

#include "kernels/conv_transpose.h"

namespace zfk::cpu {

struct Tap {
  int64_t k, source;  // kernel offset and the input row/column it reads
};

inline std::vector<std::vector<Tap>> taps_for(int64_t out_size, int64_t kernel, int64_t stride, int64_t pad,
                                              int64_t dilation, int64_t in_size) {
  std::vector<std::vector<Tap>> taps(out_size);
  for (int64_t o = 0; o < out_size; ++o) {
    for (int64_t k = 0; k < kernel; ++k) {
      const int64_t s = conv_transpose_source(o, k, stride, pad, dilation, in_size);
      if (s >= 0) taps[o].push_back({k, s});
    }
  }
  return taps;
}

}  // namespace zfk::cpu
