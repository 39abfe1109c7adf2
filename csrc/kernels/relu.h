// ReLU forward and its three backward rules: element math shared by every backend.
#pragma once
#include "common.h"

namespace zfk {

// Backward rules (codes shared with zfkernels/ops/relu.py).
enum class ReluRule : int {
  Standard = 0,   // grad where output > 0: torch's threshold_backward, which lets a NaN output through
  Deconvnet = 1,  // relu(grad): Zeiler & Fergus rectify the signal going down, ignoring the forward input
  Guided = 2,     // relu(grad) where output > 0: guided backprop (Springenberg et al.)
};

template <typename T>
ZFK_HOST_DEVICE T relu_element(T x) {
  return load(&x) < 0 ? T{} : x;  // T{} is +0 in every storage type; -0.0 and NaN pass through as in torch
}

template <typename T>
ZFK_HOST_DEVICE T relu_backward_element(T grad, T output, ReluRule rule) {
  const bool blocked_by_output = rule != ReluRule::Deconvnet && load(&output) <= 0;
  const bool blocked_by_grad = rule != ReluRule::Standard && load(&grad) < 0;
  return (blocked_by_output || blocked_by_grad) ? T{} : grad;
}

}  // namespace zfk
