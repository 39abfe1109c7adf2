// CPU launchers: ReLU forward (in place when input == output) and backward.
#include "cpu/ops.h"
#include "cpu/parallel.h"
#include "cpu/simd.h"
#include "kernels/relu.h"

namespace zfk::cpu {
namespace {

constexpr int64_t kBlock = 1 << 16;  // elements per parallel task

template <typename T>
ZFK_VECTORIZED void relu_block(const T* input, T* output, int64_t n) {
  for (int64_t i = 0; i < n; ++i) output[i] = relu_element(input[i]);
}

template <typename T>
ZFK_VECTORIZED void relu_backward_block(const T* grad, const T* output, T* grad_input, int64_t n, ReluRule rule) {
  if (rule == ReluRule::Deconvnet) {  // no output needed (and none may be passed)
    for (int64_t i = 0; i < n; ++i) grad_input[i] = relu_element(grad[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) grad_input[i] = relu_backward_element(grad[i], output[i], rule);
  }
}

}  // namespace

void relu(const void* input, void* output, DType dtype, int64_t numel, int num_threads) {
  dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    const int64_t blocks = (numel + kBlock - 1) / kBlock;
    parallel_for(blocks, num_threads, kBlock, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t start = b * kBlock, n = std::min(kBlock, numel - start);
        relu_block(static_cast<const T*>(input) + start, static_cast<T*>(output) + start, n);
      }
    });
  });
}

void relu_backward(const void* grad, const void* output, void* grad_input, DType dtype, int64_t numel, int rule,
                   int num_threads) {
  dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    const int64_t blocks = (numel + kBlock - 1) / kBlock;
    parallel_for(blocks, num_threads, kBlock, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t start = b * kBlock, n = std::min(kBlock, numel - start);
        relu_backward_block(static_cast<const T*>(grad) + start,
                            output ? static_cast<const T*>(output) + start : nullptr,
                            static_cast<T*>(grad_input) + start, n, static_cast<ReluRule>(rule));
      }
    });
  });
}

}  // namespace zfk::cpu
