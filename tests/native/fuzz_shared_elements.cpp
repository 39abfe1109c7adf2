// Memory-safety fuzz of the CPU runs of the CUDA kernels' formulations (the shared csrc/kernels element
// functions: gather unpool, tiled transposed convolution, fused unpool + tiled convolution) with garbage
// switches, built with the sanitizers by .ci/run; the tiled and per-element runs must also agree.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <utility>
#include <vector>

#include "cpu/ops.h"

using namespace zfk;
namespace {
std::mt19937_64 rng(1234);
int64_t pick(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); }

int64_t pooled(int64_t size, int64_t k, int64_t s, int64_t p, bool ceil) {
  int64_t out = (size + 2 * p - k + (ceil ? s - 1 : 0)) / s + 1;
  if (ceil && (out - 1) * s >= size + p) --out;
  return out;
}

PoolGeometry random_pool(int64_t in_h, int64_t in_w) {
  for (;;) {
    PoolGeometry g{};
    g.in_h = in_h; g.in_w = in_w;
    g.kernel_h = pick(1, 5); g.kernel_w = pick(1, 5); g.stride_h = pick(1, 4); g.stride_w = pick(1, 4);
    g.pad_h = pick(0, g.kernel_h / 2); g.pad_w = pick(0, g.kernel_w / 2);
    if (in_h + 2 * g.pad_h < g.kernel_h || in_w + 2 * g.pad_w < g.kernel_w) continue;
    const bool ceil = pick(0, 1);
    g.out_h = pooled(in_h, g.kernel_h, g.stride_h, g.pad_h, ceil); g.out_w = pooled(in_w, g.kernel_w, g.stride_w, g.pad_w, ceil);
    if (g.out_h > 0 && g.out_w > 0) return g;
  }
}

template <typename S>
std::vector<S> garbage_switches(int64_t n, const PoolGeometry& g, bool flat) {
  std::vector<S> s(n);
  const int64_t hi = flat ? g.in_h * g.in_w + 3 : g.kernel_h * g.kernel_w + 3;
  for (auto& v : s) v = S(pick(-3, hi));
  return s;
}

}  // namespace

// Returns the number of mismatches between the tiled and per-element runs (sanitizers abort on bad access).
int fuzz_shared_elements() {
  int failures = 0;
  for (int iter = 0; iter < 400; ++iter) {
    // unpool gather with garbage switches (uint8 and int64), with and without a gate
    {
      const int64_t planes = pick(1, 3), in_h = pick(1, 12), in_w = pick(1, 12);
      const PoolGeometry g = random_pool(in_h, in_w);
      const int64_t pooled_n = planes * g.out_h * g.out_w;
      std::vector<float> values(pooled_n), gate(pooled_n), out(planes * in_h * in_w);
      for (auto& v : values) v = float(pick(-3, 3));
      for (auto& v : gate) v = float(pick(-1, 1));
      auto s8 = garbage_switches<uint8_t>(pooled_n, g, false);
      auto s64 = garbage_switches<int64_t>(pooled_n, g, true);
      cpu::max_unpool2d_gather(values.data(), s8.data(), pick(0, 1) ? gate.data() : nullptr, out.data(), DType::Float32,
                               SwitchType::UInt8, planes, g, pick(0, 1), 1);
      cpu::max_unpool2d_gather(values.data(), s64.data(), nullptr, out.data(), DType::Float32, SwitchType::Int64, planes,
                               g, false, 1);
    }
    // transposed conv: tiled vs per-element, in double
    {
      ConvTransposeGeometry g{};
      g.in_h = pick(1, 9); g.in_w = pick(1, 40); g.kernel_h = pick(1, 6); g.kernel_w = pick(1, 6);
      g.stride_h = pick(1, 4); g.stride_w = pick(1, 4); g.dilation_h = pick(1, 3); g.dilation_w = pick(1, 3);
      g.pad_h = pick(0, g.dilation_h * (g.kernel_h - 1)); g.pad_w = pick(0, g.dilation_w * (g.kernel_w - 1));
      const int64_t op_h = pick(0, std::max(g.stride_h, g.dilation_h) - 1), op_w = pick(0, std::max(g.stride_w, g.dilation_w) - 1);
      g.out_h = (g.in_h - 1) * g.stride_h - 2 * g.pad_h + g.dilation_h * (g.kernel_h - 1) + op_h + 1;
      g.out_w = (g.in_w - 1) * g.stride_w - 2 * g.pad_w + g.dilation_w * (g.kernel_w - 1) + op_w + 1;
      if (g.out_h <= 0 || g.out_w <= 0) continue;
      const int64_t groups = pick(1, 3), batch = pick(0, 2), cin = groups * pick(1, 20), cout = groups * pick(1, 20);
      std::vector<double> x(batch * cin * g.in_h * g.in_w), w(cin * (cout / groups) * g.kernel_h * g.kernel_w), b(cout);
      for (auto& v : x) v = double(pick(-100, 100)) / 37;
      for (auto& v : w) v = double(pick(-100, 100)) / 41;
      for (auto& v : b) v = double(pick(-100, 100)) / 43;
      const int64_t n_out = batch * cout * g.out_h * g.out_w;
      std::vector<double> tiled(n_out, NAN), elements(n_out, NAN);
      const double* bias = pick(0, 1) ? b.data() : nullptr;
      cpu::conv_transpose2d_tiled(x.data(), w.data(), bias, tiled.data(), DType::Float64, batch, cin, cout, groups, g, false, 1);
      cpu::conv_transpose2d_tiled(x.data(), w.data(), bias, elements.data(), DType::Float64, batch, cin, cout, groups, g, true, 1);
      for (int64_t i = 0; i < n_out; ++i) {
        if (!(std::fabs(tiled[i] - elements[i]) <= 1e-9 * (1 + std::fabs(elements[i])))) {
          std::printf("conv mismatch iter %d at %lld: %g vs %g\n", iter, (long long)i, tiled[i], elements[i]);
          ++failures;
          break;
        }
      }
    }
    // fused: garbage switches; tiled vs per-element
    {
      const int64_t batch = pick(1, 2), cin = pick(1, 18), cout = pick(1, 18), in_h = pick(2, 14), in_w = pick(2, 40);
      const PoolGeometry pool = random_pool(in_h, in_w);
      ConvTransposeGeometry g{};
      g.in_h = in_h; g.in_w = in_w; g.kernel_h = pick(1, 5); g.kernel_w = pick(1, 5);
      g.stride_h = pick(1, 3); g.stride_w = pick(1, 3); g.dilation_h = 1; g.dilation_w = 1;
      g.pad_h = pick(0, g.kernel_h - 1); g.pad_w = pick(0, g.kernel_w - 1);
      g.out_h = (in_h - 1) * g.stride_h - 2 * g.pad_h + g.kernel_h + pick(0, g.stride_h - 1);
      g.out_w = (in_w - 1) * g.stride_w - 2 * g.pad_w + g.kernel_w + pick(0, g.stride_w - 1);
      if (g.out_h <= 0 || g.out_w <= 0) continue;
      const int64_t pooled_n = batch * cin * pool.out_h * pool.out_w;
      std::vector<double> values(pooled_n), w(cin * cout * g.kernel_h * g.kernel_w);
      for (auto& v : values) v = double(pick(-100, 100)) / 37;
      for (auto& v : w) v = double(pick(-100, 100)) / 41;
      const bool flat = pick(0, 1);
      auto s16 = garbage_switches<int16_t>(pooled_n, pool, false);
      auto s64 = garbage_switches<int64_t>(pooled_n, pool, true);
      const void* sw = flat ? static_cast<const void*>(s64.data()) : static_cast<const void*>(s16.data());
      const SwitchType st = flat ? SwitchType::Int64 : SwitchType::Int16;
      const int64_t n_out = batch * cout * g.out_h * g.out_w;
      std::vector<double> tiled(n_out, NAN), elements(n_out, NAN);
      const bool relu = pick(0, 1);
      auto a = cpu::unpool_conv_transpose2d_tiled(values.data(), sw, w.data(), tiled.data(), DType::Float64, st, batch, cin, cout, pool, g, relu, false, 1);
      auto e = cpu::unpool_conv_transpose2d_tiled(values.data(), sw, w.data(), elements.data(), DType::Float64, st, batch, cin, cout, pool, g, relu, true, 1);
      if (a.first != e.first || !a.second || e.second) { std::printf("fused flags iter %d\n", iter); ++failures; }
      for (int64_t i = 0; i < n_out; ++i) {
        if (!(std::fabs(tiled[i] - elements[i]) <= 1e-9 * (1 + std::fabs(elements[i])))) {
          std::printf("fused mismatch iter %d at %lld: %g vs %g\n", iter, (long long)i, tiled[i], elements[i]);
          ++failures;
          break;
        }
      }
    }
  }
  return failures;
}
