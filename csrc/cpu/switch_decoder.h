// Switch decoding for the CPU loops: a table of window offsets replaces two integer divisions per
// switch (they cost more than the rest of an unpool), while kernels/common.h keeps the bounds rules.
// The table has an entry per window element, so it is built only when the window is small next to the
// switches it will decode: a huge window over a tiny input would otherwise cost gigabytes for nothing.
#pragma once
#include <algorithm>
#include <type_traits>
#include <vector>

#include "kernels/common.h"

namespace zfk::cpu {

// Window elements a table may hold: 1.5 MB of entries at most, and never many more than the switches.
constexpr int64_t kMaxSwitchTable = int64_t(1) << 16, kSmallSwitchTable = 1024;

template <typename S>
class SwitchDecoder {
 public:
  // `switches`: how many switches this decoder will decode (every plane together), which sizes the table.
  SwitchDecoder(const PoolGeometry& g, int64_t switches) : g_(g) {
    const int64_t window_size = g.kernel_h * g.kernel_w;
    table_ = !kFlat && window_size <= std::min(kMaxSwitchTable, std::max(kSmallSwitchTable, switches));
    if (table_) {
      for (int64_t s = 0; s < g.kernel_h * g.kernel_w; ++s) {
        offsets_.push_back(switch_offset(g, s));
        deltas_.push_back(offsets_.back().dh * g.in_w + offsets_.back().dw);
      }
    }
    // Output columns [ow_lo, ow_hi) have windows inside the input's width; rows likewise.
    ow_lo_ = std::min(g.out_w, (g.pad_w + g.stride_w - 1) / g.stride_w);
    ow_hi_ = std::max(ow_lo_, std::min(g.out_w, (g.in_w + g.pad_w - g.kernel_w) / g.stride_w + 1));
  }

  // Calls visit(p, target) for every pooled position p of a plane in row-major order, with target -1
  // for an invalid switch. Windows inside the input skip the bounds checks: any in-range switch of
  // theirs is inside the input.
  template <typename Visit>
  void for_each_target(const S* switches, const Visit& visit) const {
    const PoolGeometry& g = g_;
    const int64_t window_size = g.kernel_h * g.kernel_w;
    for (int64_t oh = 0; oh < g.out_h; ++oh) {
      const int64_t h0 = oh * g.stride_h - g.pad_h, row = oh * g.out_w;
      const bool rows_inside = h0 >= 0 && h0 + g.kernel_h <= g.in_h;
      const bool fast = !kFlat && table_ && rows_inside;
      const int64_t fast_begin = fast ? ow_lo_ : g.out_w, fast_end = fast ? ow_hi_ : g.out_w;
      for (int64_t ow = 0; ow < fast_begin; ++ow) visit(row + ow, target(oh, ow, switches[row + ow]));
      if constexpr (!kFlat) {
        for (int64_t ow = fast_begin; ow < fast_end; ++ow) {
          const int64_t s = int64_t(switches[row + ow]);
          const int64_t origin = h0 * g.in_w + ow * g.stride_w - g.pad_w;
          visit(row + ow, (s >= 0 && s < window_size) ? origin + deltas_[s] : int64_t(-1));
        }
      }
      for (int64_t ow = fast_end; ow < g.out_w; ++ow) visit(row + ow, target(oh, ow, switches[row + ow]));
    }
  }

  // Flat input position of the switch of window (oh, ow), or -1 if it is out of range.
  int64_t target(int64_t oh, int64_t ow, S sw) const {
    if constexpr (kFlat) {
      return switch_target(g_, oh, ow, int64_t(sw), true);
    } else {
      const int64_t s = int64_t(sw);
      if (!table_) return switch_target(g_, oh, ow, s);  // two divisions, no table
      if (s < 0 || s >= int64_t(offsets_.size())) return -1;
      return window_target(g_, oh, ow, offsets_[s]);
    }
  }

 private:
  static constexpr bool kFlat = std::is_same_v<S, int64_t>;  // torch's flat indices, not window-local
  PoolGeometry g_;
  bool table_;
  std::vector<WindowOffset> offsets_;
  std::vector<int64_t> deltas_;  // flat offset of each switch from its window's origin
  int64_t ow_lo_, ow_hi_;
};

}  // namespace zfk::cpu
