// CUDA launchers: ReLU forward (in place when input == output) and its three backward rules, with the element
// functions of kernels/relu.h. Memory-bound: each thread moves 16-byte packs when every pointer is 16-byte
// aligned (one load instruction per operand for 4 fp32, 2 fp64 or 8 fp16/bf16), then a scalar loop takes
// the tail; misaligned views (a sliced tensor's offset) take the scalar loop throughout.
#include "cuda/launch.cuh"
#include "kernels/relu.h"

namespace zfk::cuda {
namespace {

template <typename T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

template <typename T, bool kVector>
__global__ void __launch_bounds__(kThreads) relu_kernel(const T* input, T* output, int64_t numel) {
  using P = Pack<T>;
  int64_t scalar_begin = 0;
  if constexpr (kVector) {
    const int64_t packs = numel / P::kSize;
    for (int64_t i = first_index<int64_t>(); i < packs; i += grid_stride<int64_t>()) {
      P p = reinterpret_cast<const P*>(input)[i];
#pragma unroll
      for (int j = 0; j < P::kSize; ++j) p.v[j] = relu_element(p.v[j]);
      reinterpret_cast<P*>(output)[i] = p;
    }
    scalar_begin = packs * P::kSize;
  }
  for (int64_t i = scalar_begin + first_index<int64_t>(); i < numel; i += grid_stride<int64_t>())
    output[i] = relu_element(input[i]);
}

// grad_input = rule(grad, output); the deconvnet rule reads no output (`output` may be null there).
template <typename T, bool kVector>
__global__ void __launch_bounds__(kThreads)
    relu_backward_kernel(const T* __restrict__ grad, const T* __restrict__ output, T* __restrict__ grad_input,
                         int64_t numel, ReluRule rule) {
  using P = Pack<T>;
  const bool deconvnet = rule == ReluRule::Deconvnet;
  int64_t scalar_begin = 0;
  if constexpr (kVector) {
    const int64_t packs = numel / P::kSize;
    for (int64_t i = first_index<int64_t>(); i < packs; i += grid_stride<int64_t>()) {
      P g = reinterpret_cast<const P*>(grad)[i];
      if (deconvnet) {
#pragma unroll
        for (int j = 0; j < P::kSize; ++j) g.v[j] = relu_element(g.v[j]);
      } else {
        const P o = reinterpret_cast<const P*>(output)[i];
#pragma unroll
        for (int j = 0; j < P::kSize; ++j) g.v[j] = relu_backward_element(g.v[j], o.v[j], rule);
      }
      reinterpret_cast<P*>(grad_input)[i] = g;
    }
    scalar_begin = packs * P::kSize;
  }
  for (int64_t i = scalar_begin + first_index<int64_t>(); i < numel; i += grid_stride<int64_t>())
    grad_input[i] = deconvnet ? relu_element(grad[i]) : relu_backward_element(grad[i], output[i], rule);
}

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

void relu(const void* input, void* output, DType dtype, int64_t numel, void* stream) {
  if (numel == 0) return;
  dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    const auto* in = static_cast<const T*>(input);
    auto* out = static_cast<T*>(output);
    const unsigned grid = grid_for((numel + Pack<T>::kSize - 1) / Pack<T>::kSize);
    if (aligned16(input) && aligned16(output)) {
      relu_kernel<T, true><<<grid, kThreads, 0, as_stream(stream)>>>(in, out, numel);
    } else {
      relu_kernel<T, false><<<grid_for(numel), kThreads, 0, as_stream(stream)>>>(in, out, numel);
    }
    check_launch("relu");
  });
}

void relu_backward(const void* grad, const void* output, void* grad_input, DType dtype, int64_t numel, int rule,
                   void* stream) {
  if (numel == 0) return;
  if (rule < 0 || rule > 2) throw std::invalid_argument("zfkernels: relu_backward rule must be 0, 1 or 2");
  if (output == nullptr && ReluRule(rule) != ReluRule::Deconvnet)
    throw std::invalid_argument("zfkernels: relu_backward needs the forward output for this rule");
  dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    const auto* g = static_cast<const T*>(grad);
    const auto* o = static_cast<const T*>(output);
    auto* gi = static_cast<T*>(grad_input);
    if (aligned16(grad) && aligned16(output) && aligned16(grad_input)) {
      const unsigned grid = grid_for((numel + Pack<T>::kSize - 1) / Pack<T>::kSize);
      relu_backward_kernel<T, true><<<grid, kThreads, 0, as_stream(stream)>>>(g, o, gi, numel, ReluRule(rule));
    } else {
      relu_backward_kernel<T, false><<<grid_for(numel), kThreads, 0, as_stream(stream)>>>(g, o, gi, numel,
                                                                                           ReluRule(rule));
    }
    check_launch("relu_backward");
  });
}

}  // namespace zfk::cuda
