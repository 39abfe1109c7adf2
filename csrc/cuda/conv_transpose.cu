// CUDA launcher: transposed convolution (+ bias, groups, dilation, output_padding) as a tiled output-stationary
// gather (conv_transpose.cuh): per-phase taps, shared-memory input and weight tiles, sums in float (double
// for fp64) in a fixed order, so the result is deterministic. No GEMM, no atomics.
#include "cuda/conv_transpose.cuh"

namespace zfk::cuda {

bool conv_transpose2d(const void* input, const void* weight, const void* bias, void* output, DType dtype,
                      int64_t batch, int64_t in_channels, int64_t out_channels, int64_t groups,
                      const ConvTransposeGeometry& g, bool force_elements, void* stream) {
  if (groups < 1 || in_channels % groups != 0 || out_channels % groups != 0)
    throw std::invalid_argument("zfkernels: conv_transpose2d channels must divide into groups");
  const ConvShape shape{g, batch, groups, in_channels / groups, out_channels / groups};
  bool tiled = false;
  dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    const DenseInput<T> source{static_cast<const T*>(input), in_channels, g.in_h, g.in_w};
    tiled = launch_conv_transpose(shape, source, static_cast<const T*>(weight), static_cast<const T*>(bias),
                                  static_cast<T*>(output), force_elements, as_stream(stream), "conv_transpose2d");
  });
  return tiled;
}

}  // namespace zfk::cuda
