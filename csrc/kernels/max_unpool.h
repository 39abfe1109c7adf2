// Max-unpool with switches: element math shared by every backend.
#pragma once
#include "common.h"

namespace zfk {

// Gather form of one unpooled element: the sum, in row-major order of the pooling windows, of every
// value whose switch points at (ih, iw). Summing (not overwriting) where overlapping windows share an
// argmax makes unpool the exact adjoint of max-pool; the fixed order makes it deterministic.
// `gate` (nullable, shaped like `values`): a value whose gate is <= 0 is left out, as ReLU's standard
// backward zeroes it (max-pool's backward with the ReLU fused, gated by the pooled values). Leaving it out
// equals adding +0: the sum starts at +0 and so is never -0, the one value adding +0 would change.
template <typename T, typename S>
ZFK_HOST_DEVICE compute_t<T> unpool_gather_gated(const T* values, const T* gate, const S* switches,
                                                 const PoolGeometry& g, int64_t ih, int64_t iw, bool flat_indices) {
  using C = compute_t<T>;
  const int64_t target = ih * g.in_w + iw;
  // Windows oh whose rows cover ih: oh * stride_h - pad_h <= ih < oh * stride_h - pad_h + kernel_h.
  const int64_t hn = ih + g.pad_h - g.kernel_h + 1, wn = iw + g.pad_w - g.kernel_w + 1;
  const int64_t oh_begin = hn <= 0 ? 0 : (hn + g.stride_h - 1) / g.stride_h;
  const int64_t ow_begin = wn <= 0 ? 0 : (wn + g.stride_w - 1) / g.stride_w;
  const int64_t oh_last = (ih + g.pad_h) / g.stride_h, ow_last = (iw + g.pad_w) / g.stride_w;
  C sum = C(0);
  for (int64_t oh = oh_begin; oh <= oh_last && oh < g.out_h; ++oh) {
    for (int64_t ow = ow_begin; ow <= ow_last && ow < g.out_w; ++ow) {
      const int64_t p = oh * g.out_w + ow;
      if (switch_target(g, oh, ow, int64_t(switches[p]), flat_indices) != target) continue;
      if (gate == nullptr || !(load(gate + p) <= 0)) sum += load(values + p);
    }
  }
  return sum;
}

template <typename T, typename S>
ZFK_HOST_DEVICE compute_t<T> unpool_gather(const T* values, const S* switches, const PoolGeometry& g, int64_t ih,
                                           int64_t iw, bool flat_indices) {
  return unpool_gather_gated(values, static_cast<const T*>(nullptr), switches, g, ih, iw, flat_indices);
}

// One element of max_unpool2d(values, switches, relu=rectify) as the unfused op stores it: summed in the
// compute type, rectified, rounded once to T (a fused consumer sees exactly the unpooled map's value).
template <typename T, typename S>
ZFK_HOST_DEVICE compute_t<T> unpooled_element(const T* values, const S* switches, const PoolGeometry& g,
                                              int64_t ih, int64_t iw, bool flat_indices, bool rectify) {
  compute_t<T> v = unpool_gather(values, switches, g, ih, iw, flat_indices);
  if (rectify) v = relu(v);
  return round_to_storage<T>(v);
}

// Whether the switch of pooled position (oh, ow) is invalid (outside its window or on padding): such a
// switch is counted and never followed.
template <typename S>
ZFK_HOST_DEVICE bool invalid_switch(const PoolGeometry& g, int64_t oh, int64_t ow, S sw, bool flat_indices) {
  return switch_target(g, oh, ow, int64_t(sw), flat_indices) < 0;
}

}  // namespace zfk
