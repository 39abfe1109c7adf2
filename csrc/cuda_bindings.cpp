// pybind11 module zfkernels._C_cuda: device pointers (as integers), shapes, the int32 device counter of
// invalid switches and the caller's CUDA stream (torch.cuda.current_stream().cuda_stream) in; kernels
// allocate nothing and only enqueue work, so no call synchronizes. The Python layer
// (zfkernels/ops/cuda.py) validates every argument and selects the device before calling in. Importing
// this module touches no CUDA API: it loads on machines without a GPU (cudart is linked statically).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>

#include "cuda/ops.h"

namespace py = pybind11;
using zfk::ConvTransposeGeometry;
using zfk::DType;
using zfk::PoolGeometry;
using zfk::SwitchType;

namespace {

using Ptr = uintptr_t;
using Four = std::array<int64_t, 4>;   // in_h, in_w, out_h, out_w
using Six = std::array<int64_t, 6>;    // kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w
using Eight = std::array<int64_t, 8>;  // the same, then dilation_h, dilation_w

const void* cptr(Ptr p) { return reinterpret_cast<const void*>(p); }
void* mptr(Ptr p) { return reinterpret_cast<void*>(p); }
int32_t* counter(Ptr p) { return reinterpret_cast<int32_t*>(p); }

PoolGeometry pool_geometry(const Four& sizes, const Six& p) {
  return {sizes[0], sizes[1], sizes[2], sizes[3], p[0], p[1], p[2], p[3], p[4], p[5]};
}

ConvTransposeGeometry conv_geometry(const Four& sizes, const Eight& p) {
  return {sizes[0], sizes[1], sizes[2], sizes[3], p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]};
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "zfkernels CUDA kernels (torch-free; called through zfkernels.ops.cuda)";
  auto release = py::call_guard<py::gil_scoped_release>();
  m.def("max_pool2d_switches",
        [](Ptr input, Ptr values, Ptr switches, int dtype, int switch_type, int64_t planes, Four sizes, Six params,
           bool relu, Ptr stream) {
          zfk::cuda::max_pool2d_switches(cptr(input), mptr(values), mptr(switches), DType(dtype),
                                         SwitchType(switch_type), planes, pool_geometry(sizes, params), relu,
                                         mptr(stream));
        },
        release);
  m.def("max_unpool2d",
        [](Ptr values, Ptr switches, Ptr gate, Ptr output, int dtype, int switch_type, int64_t planes, Four sizes,
           Six params, bool relu, Ptr invalid, Ptr stream) {
          zfk::cuda::max_unpool2d(cptr(values), cptr(switches), gate ? cptr(gate) : nullptr, mptr(output),
                                  DType(dtype), SwitchType(switch_type), planes, pool_geometry(sizes, params), relu,
                                  counter(invalid), mptr(stream));
        },
        release);
  m.def("gather_switches",
        [](Ptr source, Ptr switches, Ptr output, int dtype, int switch_type, int64_t planes, Four sizes, Six params,
           Ptr invalid, Ptr stream) {
          zfk::cuda::gather_switches(cptr(source), cptr(switches), mptr(output), DType(dtype), SwitchType(switch_type),
                                     planes, pool_geometry(sizes, params), counter(invalid), mptr(stream));
        },
        release);
  m.def("relu",
        [](Ptr input, Ptr output, int dtype, int64_t numel, Ptr stream) {
          zfk::cuda::relu(cptr(input), mptr(output), DType(dtype), numel, mptr(stream));
        },
        release);
  m.def("relu_backward",
        [](Ptr grad, Ptr output, Ptr grad_input, int dtype, int64_t numel, int rule, Ptr stream) {
          zfk::cuda::relu_backward(cptr(grad), output ? cptr(output) : nullptr, mptr(grad_input), DType(dtype),
                                   numel, rule, mptr(stream));
        },
        release);
  m.def("conv_transpose2d",
        [](Ptr input, Ptr weight, Ptr bias, Ptr output, int dtype, int64_t batch, int64_t in_channels,
           int64_t out_channels, int64_t groups, Four sizes, Eight params, bool force_elements, Ptr stream) {
          return zfk::cuda::conv_transpose2d(cptr(input), cptr(weight), bias ? cptr(bias) : nullptr, mptr(output),
                                             DType(dtype), batch, in_channels, out_channels, groups,
                                             conv_geometry(sizes, params), force_elements, mptr(stream));
        },
        release);
  m.def("unpool_conv_transpose2d",
        [](Ptr values, Ptr switches, Ptr weight, Ptr output, int dtype, int switch_type, int64_t batch,
           int64_t in_channels, int64_t out_channels, Four pool_sizes, Six pool_params, Four conv_sizes,
           Eight conv_params, bool relu, bool force_elements, Ptr invalid, Ptr stream) {
          return zfk::cuda::unpool_conv_transpose2d(
              cptr(values), cptr(switches), cptr(weight), mptr(output), DType(dtype), SwitchType(switch_type), batch,
              in_channels, out_channels, pool_geometry(pool_sizes, pool_params), conv_geometry(conv_sizes, conv_params),
              relu, force_elements, counter(invalid), mptr(stream));
        },
        release);
  m.def("renormalize_filters",
        [](Ptr weight, int dtype, int64_t filters, int64_t filter_size, double radius, Ptr stream) {
          zfk::cuda::renormalize_filters(mptr(weight), DType(dtype), filters, filter_size, radius, mptr(stream));
        },
        release);
}
