// Declarations of the CUDA launchers (csrc/cuda/*.cu), for the pybind11 module in csrc/cuda_bindings.cpp.
// Each takes device pointers to contiguous NCHW data, enqueues its kernels on `stream` (a cudaStream_t, the
// caller's current torch stream, passed as void* so this header needs no CUDA headers), allocates nothing,
// and throws std::runtime_error naming the kernel when a launch fails. Launchers that read switches count
// the invalid ones (outside their window or on padding: never followed) into the device int32 `invalid`.
#pragma once
#include <cstdint>

#include "cpu/ops.h"  // DType, SwitchType and their dispatchers: the codes are shared with the CPU module
#include "kernels/common.h"
#include "kernels/conv_transpose.h"

namespace zfk::cuda {

void max_pool2d_switches(const void* input, void* values, void* switches, DType dtype, SwitchType switch_type,
                         int64_t planes, const PoolGeometry& g, bool relu, void* stream);
// `gate` (nullable): values whose gate is <= 0 are left out (max-pool's backward with the ReLU fused).
void max_unpool2d(const void* values, const void* switches, const void* gate, void* output, DType dtype,
                  SwitchType switch_type, int64_t planes, const PoolGeometry& g, bool relu, int32_t* invalid,
                  void* stream);
void gather_switches(const void* source, const void* switches, void* output, DType dtype, SwitchType switch_type,
                     int64_t planes, const PoolGeometry& g, int32_t* invalid, void* stream);
// In place when input == output.
void relu(const void* input, void* output, DType dtype, int64_t numel, void* stream);
// `output` may be null for rule 1 (deconvnet), which does not read it.
void relu_backward(const void* grad, const void* output, void* grad_input, DType dtype, int64_t numel, int rule,
                   void* stream);
// weight [in_channels][out_channels / groups][kernel_h][kernel_w]; bias nullable. Returns whether the tiled
// kernel ran (false: the per-element kernel, when no tile fits in shared memory or `force_elements`).
bool conv_transpose2d(const void* input, const void* weight, const void* bias, void* output, DType dtype,
                      int64_t batch, int64_t in_channels, int64_t out_channels, int64_t groups,
                      const ConvTransposeGeometry& g, bool force_elements, void* stream);
// conv_transpose2d(max_unpool2d(values, switches, relu), weight) without materializing the unpooled map;
// pool.in = the unpooled size = g.in. Same return value as conv_transpose2d.
bool unpool_conv_transpose2d(const void* values, const void* switches, const void* weight, void* output, DType dtype,
                             SwitchType switch_type, int64_t batch, int64_t in_channels, int64_t out_channels,
                             const PoolGeometry& pool, const ConvTransposeGeometry& g, bool relu,
                             bool force_elements, int32_t* invalid, void* stream);
// In place: each of `filters` contiguous filters whose RMS exceeds `radius` is scaled to RMS `radius`.
void renormalize_filters(void* weight, DType dtype, int64_t filters, int64_t filter_size, double radius,
                         void* stream);

}  // namespace zfk::cuda
