// Memory-safety fuzz of every CPU launcher, built with -fsanitize=address,undefined by .ci/run:
// random pool/conv geometries, NaN inputs and garbage switches (window-local and flat), each buffer
// sized exactly, so any out-of-bounds read or write aborts the run.
#include <algorithm>
#include <cstdio>
#include <random>
#include <vector>
#include "cpu/ops.h"
using namespace zfk;
template <typename T> void run(std::mt19937& rng, DType dt) {
  std::uniform_int_distribution<int> d(1, 6);
  for (int iter = 0; iter < 3000; ++iter) {
    int kh = d(rng), kw = d(rng), sh = d(rng), sw = d(rng);
    int ph = rng() % (kh / 2 + 1), pw = rng() % (kw / 2 + 1);
    int H = kh + rng() % 40, W = kw + rng() % 40;
    bool ceil = rng() & 1;
    auto out = [&](int n, int k, int s, int p) { int o = (n + 2 * p - k + (ceil ? s - 1 : 0)) / s + 1; if (ceil && (o - 1) * s >= n + p) --o; return o; };
    int OH = out(H, kh, sh, ph), OW = out(W, kw, sw, pw);
    int planes = 1 + rng() % 3;
    PoolGeometry g{H, W, OH, OW, kh, kw, sh, sw, ph, pw};
    std::vector<T> in(planes * H * W), vals(planes * OH * OW), unp(planes * H * W), gat(planes * OH * OW);
    std::vector<uint8_t> swv(planes * OH * OW);
    std::normal_distribution<float> nd;
    for (auto& x : in) { float f = nd(rng); if (rng() % 50 == 0) f = NAN; store(&x, f); }
    cpu::max_pool2d_switches(in.data(), vals.data(), swv.data(), dt, SwitchType::UInt8, planes, g, rng() & 1, 1 + rng() % 2);
    if (rng() & 1) for (auto& s : swv) if (rng() % 7 == 0) s = rng() % 256;  // garbage switches
    cpu::max_unpool2d(vals.data(), swv.data(), (rng() & 1) ? vals.data() : nullptr, unp.data(), dt, SwitchType::UInt8, planes, g, rng() & 1, 2);
    cpu::gather_switches(unp.data(), swv.data(), gat.data(), dt, SwitchType::UInt8, planes, g, 2);
    std::vector<int64_t> flat(planes * OH * OW);
    for (auto& f : flat) f = int64_t(rng() % (H * W + 10)) - 5;
    cpu::max_unpool2d(vals.data(), flat.data(), nullptr, unp.data(), dt, SwitchType::Int64, planes, g, false, 2);
    // fused: unpooled (H, W) -> conv transpose
    int co = 1 + rng() % 9, k2 = d(rng), s2 = d(rng), p2 = rng() % (k2 + 1), op2 = rng() % s2;
    int CH = (H - 1) * s2 - 2 * p2 + k2 + op2, CW = (W - 1) * s2 - 2 * p2 + k2 + op2;
    if (CH > 0 && CW > 0) {
      ConvTransposeGeometry cg{H, W, CH, CW, k2, k2, s2, s2, p2, p2, 1, 1};
      std::vector<T> w(planes * co * k2 * k2), o(co * CH * CW), b(co);
      for (auto& x : w) store(&x, rng() % 40 == 0 ? INFINITY : nd(rng));  // inf weights: the declining paths
      cpu::all_finite(w.data(), dt, int64_t(w.size()));
      cpu::unpool_conv_transpose2d(vals.data(), swv.data(), w.data(), o.data(), dt, SwitchType::UInt8, 1, planes, co, g, cg, true, 2);
      if (co <= 4) {
        cpu::conv_transpose2d_direct(in.data(), w.data(), (rng() & 1) ? b.data() : nullptr, o.data(), dt, 1, planes, co, cg, 2);
      }
      cpu::renormalize_filters(w.data(), dt, planes * co, k2 * k2, 0.01 + (rng() % 100) / 50.0, 1 + rng() % 2);
      // paste: windows of the unpooled size into smaller or larger images at random (also far-off) origins
      int IH = 1 + rng() % 30, IW = 1 + rng() % 30, images = 1 + rng() % 4, count = 1 + rng() % images;
      std::vector<T> canvas(size_t(images) * planes * IH * IW);
      std::vector<int64_t> targets(count), origins(2 * count);
      for (int i = 0; i < count; ++i) targets[i] = i;
      for (auto& o : origins) o = int64_t(rng() % 80) - 40;
      std::vector<T> windows(size_t(count) * planes * H * W);
      std::vector<int64_t> valid(4 * count);  // valid rectangles in and beyond the window, some empty
      for (auto& v : valid) v = int64_t(rng() % (H + W + 20)) - 10;
      const bool clipped = rng() & 1, fill = rng() & 1;
      cpu::paste_windows(windows.data(), canvas.data(), targets.data(), origins.data(), clipped ? valid.data() : nullptr,
                         fill, dt, count, planes, H, W, IH, IW, images, 1 + rng() % 2);
    }
  }
}
// Windows far larger than the input (up to 4096 columns over a few): the decoder then drops its table and
// divides, and the fused op's rows path may not fit its uncropped frame.
void run_wide_windows(std::mt19937& rng) {
  for (int iter = 0; iter < 300; ++iter) {
    const int kw = 1 + rng() % 4096, pw = rng() % (kw / 2 + 1), W = std::max(1, kw - 2 * pw + int(rng() % 4));
    const int sw = 1 + rng() % kw, OW = (W + 2 * pw - kw) / sw + 1, planes = 1 + rng() % 2;
    PoolGeometry g{1, W, 1, OW, 1, kw, 1, sw, 0, pw};
    std::vector<float> vals(planes * OW), unp(planes * W), gat(planes * OW);
    std::vector<int32_t> swv(planes * OW);
    for (auto& s : swv) s = int32_t(rng() % (kw + 2)) - 1;  // in and out of the window
    for (auto& v : vals) v = float(rng() % 7) - 3.0f;
    cpu::max_unpool2d(vals.data(), swv.data(), nullptr, unp.data(), DType::Float32, SwitchType::Int32, planes, g, true, 2);
    cpu::gather_switches(unp.data(), swv.data(), gat.data(), DType::Float32, SwitchType::Int32, planes, g, 2);
    const int k2 = 1 + rng() % 3, p2 = rng() % (W / 2 + 1), CW = W - 1 - 2 * p2 + k2;
    if (CW > 0) {
      ConvTransposeGeometry cg{1, W, k2, CW, k2, k2, 1, 1, 0, p2, 1, 1};
      std::vector<float> w(planes * k2 * k2, 1.0f), o(k2 * CW);
      cpu::unpool_conv_transpose2d(vals.data(), swv.data(), w.data(), o.data(), DType::Float32, SwitchType::Int32, 1,
                                   planes, 1, g, cg, true, 2);
    }
  }
}

int fuzz_shared_elements();  // tests/native/fuzz_shared_elements.cpp
// ZFNet's 3x3 stride-2 pool has its own float path (a walk down the plane with 8- or 16-lane vectors,
// prefetching the next plane): the random geometries above rarely pick it, so it gets its own sizes.
void run_3x3_stride_2(std::mt19937& rng) {
  for (int iter = 0; iter < 600; ++iter) {
    const int H = 3 + rng() % 70, W = 3 + rng() % 90, pad = rng() % 2, planes = 1 + rng() % 3;
    const bool ceil = rng() & 1;
    auto out = [&](int n) { int o = (n + 2 * pad - 3 + (ceil ? 1 : 0)) / 2 + 1; if (ceil && (o - 1) * 2 >= n + pad) --o; return o; };
    PoolGeometry g{H, W, out(H), out(W), 3, 3, 2, 2, pad, pad};
    std::vector<float> in(planes * H * W), vals(planes * g.out_h * g.out_w);
    std::vector<uint8_t> swv(vals.size());
    std::normal_distribution<float> nd;
    for (auto& x : in) x = rng() % 200 == 0 ? NAN : nd(rng);
    cpu::max_pool2d_switches(in.data(), vals.data(), swv.data(), DType::Float32, SwitchType::UInt8, planes, g, rng() & 1,
                             1 + rng() % 2);
  }
}

int main() {
  std::mt19937 rng(1);
  run_3x3_stride_2(rng);
  run_wide_windows(rng);
  run<float>(rng, DType::Float32);
  run<double>(rng, DType::Float64);
  run<Half>(rng, DType::Float16);
  const int mismatches = fuzz_shared_elements();
  if (mismatches != 0) {
    std::printf("fuzz: %d tiled/per-element mismatches\n", mismatches);
    return 1;
  }
  std::puts("fuzz ok");
}
