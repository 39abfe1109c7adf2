// pybind11 module zfkernels._C: raw pointers (as integers), shapes and thread counts in; kernels allocate
// nothing (outputs are torch tensors, allocated by the Python layer).
// The Python layer (zfkernels/_extension.py) validates every argument before calling in.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <utility>

#include "cpu/ops.h"

namespace py = pybind11;
using zfk::ConvTransposeGeometry;
using zfk::DType;
using zfk::PoolGeometry;
using zfk::SwitchType;

namespace {

using Ptr = uintptr_t;
using Six = std::array<int64_t, 6>;  // in_h, in_w, out_h, out_w and two per-axis parameters

const void* cptr(Ptr p) { return reinterpret_cast<const void*>(p); }
void* mptr(Ptr p) { return reinterpret_cast<void*>(p); }

// (in_h, in_w, out_h, out_w), (kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w)
PoolGeometry pool_geometry(const std::array<int64_t, 4>& sizes, const Six& params) {
  return {sizes[0], sizes[1], sizes[2], sizes[3], params[0], params[1], params[2], params[3], params[4], params[5]};
}

// (in_h, in_w, out_h, out_w), (kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w)
ConvTransposeGeometry conv_geometry(const std::array<int64_t, 4>& sizes, const std::array<int64_t, 8>& p) {
  return {sizes[0], sizes[1], sizes[2], sizes[3], p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]};
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "zfkernels CPU kernels (torch-free; called through zfkernels.ops)";
  auto release = py::call_guard<py::gil_scoped_release>();
  m.def("max_pool2d_switches",
        [](Ptr input, Ptr values, Ptr switches, int dtype, int switch_type, int64_t planes,
           std::array<int64_t, 4> sizes, Six params, bool relu, int threads) {
          zfk::cpu::max_pool2d_switches(cptr(input), mptr(values), mptr(switches), DType(dtype),
                                        SwitchType(switch_type), planes, pool_geometry(sizes, params), relu, threads);
        },
        release);
  m.def("max_unpool2d",
        [](Ptr values, Ptr switches, Ptr gate, Ptr output, int dtype, int switch_type, int64_t planes,
           std::array<int64_t, 4> sizes, Six params, bool relu, int threads) {
          return zfk::cpu::max_unpool2d(cptr(values), cptr(switches), gate ? cptr(gate) : nullptr, mptr(output),
                                        DType(dtype), SwitchType(switch_type), planes, pool_geometry(sizes, params),
                                        relu, threads);
        },
        release);
  m.def("gather_switches",
        [](Ptr source, Ptr switches, Ptr output, int dtype, int switch_type, int64_t planes,
           std::array<int64_t, 4> sizes, Six params, int threads) {
          return zfk::cpu::gather_switches(cptr(source), cptr(switches), mptr(output), DType(dtype),
                                           SwitchType(switch_type), planes, pool_geometry(sizes, params), threads);
        },
        release);
  m.def("relu",
        [](Ptr input, Ptr output, int dtype, int64_t numel, int threads) {
          zfk::cpu::relu(cptr(input), mptr(output), DType(dtype), numel, threads);
        },
        release);
  m.def("relu_backward",
        [](Ptr grad, Ptr output, Ptr grad_input, int dtype, int64_t numel, int rule, int threads) {
          zfk::cpu::relu_backward(cptr(grad), output ? cptr(output) : nullptr, mptr(grad_input), DType(dtype), numel,
                                  rule, threads);
        },
        release);
  m.def("all_finite", [](Ptr data, int dtype, int64_t n) { return zfk::cpu::all_finite(cptr(data), DType(dtype), n); },
        release);
  m.def("conv_transpose2d_direct",
        [](Ptr input, Ptr weight, Ptr bias, Ptr output, int dtype, int64_t batch, int64_t in_channels,
           int64_t out_channels, std::array<int64_t, 4> sizes, std::array<int64_t, 8> params, int threads) {
          return zfk::cpu::conv_transpose2d_direct(cptr(input), cptr(weight), bias ? cptr(bias) : nullptr, mptr(output),
                                                   DType(dtype), batch, in_channels, out_channels,
                                                   conv_geometry(sizes, params), threads);
        },
        release);
  m.def("unpool_conv_transpose2d",
        [](Ptr values, Ptr switches, Ptr weight, Ptr output, int dtype, int switch_type, int64_t batch,
           int64_t in_channels, int64_t out_channels, std::array<int64_t, 4> pool_sizes, Six pool_params,
           std::array<int64_t, 4> conv_sizes, std::array<int64_t, 8> conv_params, bool relu, int threads) {
          return zfk::cpu::unpool_conv_transpose2d(
              cptr(values), cptr(switches), cptr(weight), mptr(output), DType(dtype), SwitchType(switch_type), batch,
              in_channels, out_channels, pool_geometry(pool_sizes, pool_params), conv_geometry(conv_sizes, conv_params),
              relu, threads);
        },
        release);
  m.def("paste_windows",
        [](Ptr windows, Ptr images, Ptr targets, Ptr origins, Ptr valid, bool fill, int dtype, int64_t count,
           int64_t channels, std::array<int64_t, 2> window, std::array<int64_t, 2> image, int64_t image_count,
           int threads) {
          zfk::cpu::paste_windows(cptr(windows), mptr(images), static_cast<const int64_t*>(cptr(targets)),
                                  static_cast<const int64_t*>(cptr(origins)),
                                  static_cast<const int64_t*>(cptr(valid)), fill, DType(dtype), count, channels,
                                  window[0], window[1], image[0], image[1], image_count, threads);
        },
        release);
  m.def("renormalize_filters",
        [](Ptr weight, int dtype, int64_t filters, int64_t filter_size, double radius, int threads) {
          zfk::cpu::renormalize_filters(mptr(weight), DType(dtype), filters, filter_size, radius, threads);
        },
        release);
  m.def("max_unpool2d_gather",
        [](Ptr values, Ptr switches, Ptr gate, Ptr output, int dtype, int switch_type, int64_t planes,
           std::array<int64_t, 4> sizes, Six params, bool relu, int threads) {
          return zfk::cpu::max_unpool2d_gather(cptr(values), cptr(switches), gate ? cptr(gate) : nullptr,
                                               mptr(output), DType(dtype), SwitchType(switch_type), planes,
                                               pool_geometry(sizes, params), relu, threads);
        },
        release);
  m.def("conv_transpose2d_tiled",
        [](Ptr input, Ptr weight, Ptr bias, Ptr output, int dtype, int64_t batch, int64_t in_channels,
           int64_t out_channels, int64_t groups, std::array<int64_t, 4> sizes, std::array<int64_t, 8> params,
           bool force_elements, int threads) {
          return zfk::cpu::conv_transpose2d_tiled(cptr(input), cptr(weight), bias ? cptr(bias) : nullptr,
                                                  mptr(output), DType(dtype), batch, in_channels, out_channels, groups,
                                                  conv_geometry(sizes, params), force_elements, threads);
        },
        release);
  m.def("unpool_conv_transpose2d_tiled",
        [](Ptr values, Ptr switches, Ptr weight, Ptr output, int dtype, int switch_type, int64_t batch,
           int64_t in_channels, int64_t out_channels, std::array<int64_t, 4> pool_sizes, Six pool_params,
           std::array<int64_t, 4> conv_sizes, std::array<int64_t, 8> conv_params, bool relu, bool force_elements,
           int threads) {
          return zfk::cpu::unpool_conv_transpose2d_tiled(
              cptr(values), cptr(switches), cptr(weight), mptr(output), DType(dtype), SwitchType(switch_type), batch,
              in_channels, out_channels, pool_geometry(pool_sizes, pool_params), conv_geometry(conv_sizes, conv_params),
              relu, force_elements, threads);
        },
        release);
}
