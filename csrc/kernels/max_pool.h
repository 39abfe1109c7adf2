// Switch-recording max-pool: per-window element math shared by every backend.
#pragma once
#include <limits>

#include "common.h"

namespace zfk {

// One pooling window, scanned exactly as torch's max_pool2d does: row-major order, the first
// maximum wins, and a NaN replaces the running maximum (so the last NaN wins). The switch is the
// window-local offset kh * kernel_w + kw of the winner, measured from the unclipped window origin.
template <typename T, typename S>
ZFK_HOST_DEVICE void max_pool_window(const T* plane, const PoolGeometry& g, int64_t oh, int64_t ow, bool fuse_relu,
                                     T* value_out, S* switch_out) {
  using C = compute_t<T>;
  const int64_t h0 = oh * g.stride_h - g.pad_h, w0 = ow * g.stride_w - g.pad_w;
  const int64_t ih_begin = h0 < 0 ? 0 : h0, iw_begin = w0 < 0 ? 0 : w0;
  const int64_t ih_end = h0 + g.kernel_h < g.in_h ? h0 + g.kernel_h : g.in_h;
  const int64_t iw_end = w0 + g.kernel_w < g.in_w ? w0 + g.kernel_w : g.in_w;
  C best = -std::numeric_limits<C>::infinity();
  int64_t best_offset = (ih_begin - h0) * g.kernel_w + (iw_begin - w0);
  for (int64_t ih = ih_begin; ih < ih_end; ++ih) {
    for (int64_t iw = iw_begin; iw < iw_end; ++iw) {
      C v = load(plane + ih * g.in_w + iw);
      if (fuse_relu) v = relu(v);
      const bool take = (v > best) | (v != v);  // branch-free: random data would mispredict
      best = take ? v : best;
      best_offset = take ? (ih - h0) * g.kernel_w + (iw - w0) : best_offset;
    }
  }
  store(value_out, best);
  *switch_out = S(best_offset);
}

}  // namespace zfk
