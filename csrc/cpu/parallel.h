// Minimal fork-join parallel loop for the CPU launchers (the extension links no libtorch, so no at::parallel_for).
#pragma once
#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

namespace zfk::cpu {

// Runs body(begin, end) over [0, n) split into contiguous blocks, one per thread. Small work runs
// inline: starting a thread costs ~20 us, more than a small op takes.
template <typename Body>
void parallel_for(int64_t n, int num_threads, int64_t work_per_item, const Body& body) {
  constexpr int64_t kMinWorkPerThread = 32768;
  const int64_t by_work = std::max<int64_t>(1, n * std::max<int64_t>(work_per_item, 1) / kMinWorkPerThread);
  const int64_t threads = std::min<int64_t>({static_cast<int64_t>(std::max(num_threads, 1)), n, by_work});
  if (threads <= 1) {
    if (n > 0) body(int64_t(0), n);
    return;
  }
  std::vector<std::thread> workers;
  workers.reserve(threads - 1);
  const int64_t chunk = (n + threads - 1) / threads;
  for (int64_t t = 1; t < threads; ++t) {
    const int64_t begin = t * chunk, end = std::min(n, begin + chunk);
    if (begin < end) workers.emplace_back([&body, begin, end] { body(begin, end); });
  }
  body(int64_t(0), std::min(n, chunk));
  for (auto& w : workers) w.join();
}

}  // namespace zfk::cpu
