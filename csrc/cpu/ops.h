// Declarations of the CPU launchers, and the dtype codes the Python layer passes in.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <utility>

#include "kernels/common.h"
#include "kernels/conv_transpose.h"

namespace zfk {

// Codes shared with zfkernels/_extension.py.
enum class DType : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };
enum class SwitchType : int { UInt8 = 0, Int16 = 1, Int32 = 2, Int64 = 3 };

template <typename F>
void dispatch_dtype(DType dtype, const F& f) {
  switch (dtype) {
    case DType::Float32: return f(float{});
    case DType::Float64: return f(double{});
    case DType::Float16: return f(Half{});
    case DType::BFloat16: return f(BFloat16{});
  }
  throw std::invalid_argument("zfkernels: unsupported dtype code");
}

template <typename F>
void dispatch_switch(SwitchType type, const F& f) {
  switch (type) {
    case SwitchType::UInt8: return f(uint8_t{});
    case SwitchType::Int16: return f(int16_t{});
    case SwitchType::Int32: return f(int32_t{});
    case SwitchType::Int64: return f(int64_t{});
  }
  throw std::invalid_argument("zfkernels: unsupported switch dtype code");
}

namespace cpu {

// Each launcher works on contiguous NCHW data, `planes` = N * C, and returns the number of switches
// that were out of range for their window (skipped, never dereferenced) where it reads switches.
void max_pool2d_switches(const void* input, void* values, void* switches, DType dtype, SwitchType switch_type,
                         int64_t planes, const PoolGeometry& g, bool relu, int num_threads);
// `gate` (nullable): values whose gate is <= 0 are left out, as ReLU's backward does (max-pool's backward
// with the ReLU fused, gated by the pooled values).
int64_t max_unpool2d(const void* values, const void* switches, const void* gate, void* output, DType dtype,
                     SwitchType switch_type, int64_t planes, const PoolGeometry& g, bool relu, int num_threads);
int64_t gather_switches(const void* source, const void* switches, void* output, DType dtype, SwitchType switch_type,
                        int64_t planes, const PoolGeometry& g, int num_threads);
void relu(const void* input, void* output, DType dtype, int64_t numel, int num_threads);
void relu_backward(const void* grad, const void* output, void* grad_input, DType dtype, int64_t numel, int rule,
                   int num_threads);
// Direct transposed convolution (no GEMM) for 1 to 4 output channels, groups 1, dilation 1, fp32/fp64;
// returns false (touching nothing) for anything else, and when the weight holds a NaN or an infinity (its
// zero halo would multiply them where torch forms no product).
bool conv_transpose2d_direct(const void* input, const void* weight, const void* bias, void* output, DType dtype,
                             int64_t batch, int64_t in_channels, int64_t out_channels, const ConvTransposeGeometry& g,
                             int num_threads);
// Returns (invalid switches, ran): ran is false, and nothing is written or checked, when the weight holds a NaN
// or an infinity (torch's dense composition multiplies it by every zero of the unpooled map; run that instead).
std::pair<int64_t, bool> unpool_conv_transpose2d(const void* values, const void* switches, const void* weight,
                                                void* output, DType dtype, SwitchType switch_type, int64_t batch,
                                                int64_t in_channels, int64_t out_channels, const PoolGeometry& pool,
                                                const ConvTransposeGeometry& g, bool relu, int num_threads);
// Whether no element is NaN or infinite: one vectorized pass on the calling thread (torch's isfinite().all()
// costs two passes, an allocation and, on a busy machine, OpenMP barrier waits).
bool all_finite(const void* data, DType dtype, int64_t n);
// Copies window i ([channels][window_h][window_w]) into image targets[i] ([channels][image_h][image_w]) at
// row/col origins[2i], origins[2i + 1], clipped to the image; distinct targets (windows run in parallel).
// `valid`: null, or per window (top, left, bottom, right) in window coordinates, the part that may be copied;
// `fill`: write every element of each target map (zeros where nothing is copied).
void paste_windows(const void* windows, void* images, const int64_t* targets, const int64_t* origins,
                   const int64_t* valid, bool fill, DType dtype, int64_t count, int64_t channels, int64_t window_h,
                   int64_t window_w, int64_t image_h, int64_t image_w, int64_t image_count, int num_threads);
// In place: each of `filters` contiguous filters whose RMS exceeds `radius` is scaled to RMS `radius`.
void renormalize_filters(void* weight, DType dtype, int64_t filters, int64_t filter_size, double radius,
                         int num_threads);

// CPU runs of the CUDA kernels' formulations (defined beside the CPU launchers of the same ops): they apply
// the csrc/kernels element functions the CUDA kernels call and the CPU kernels do not, so the CPU tests
// (tests/test_shared_elements.py) exercise the code the GPU runs.
int64_t max_unpool2d_gather(const void* values, const void* switches, const void* gate, void* output, DType dtype,
                            SwitchType switch_type, int64_t planes, const PoolGeometry& g, bool relu,
                            int num_threads);
bool conv_transpose2d_tiled(const void* input, const void* weight, const void* bias, void* output, DType dtype,
                            int64_t batch, int64_t in_channels, int64_t out_channels, int64_t groups,
                            const ConvTransposeGeometry& g, bool force_elements, int num_threads);
std::pair<int64_t, bool> unpool_conv_transpose2d_tiled(const void* values, const void* switches, const void* weight,
                                                       void* output, DType dtype, SwitchType switch_type,
                                                       int64_t batch, int64_t in_channels, int64_t out_channels,
                                                       const PoolGeometry& pool, const ConvTransposeGeometry& g,
                                                       bool relu, bool force_elements, int num_threads);

}  // namespace cpu
}  // namespace zfk
