// Fork-join parallel loop for the CPU launchers (the extension links no libtorch, so no at::parallel_for).
#pragma once
#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>
#if defined(_OPENMP)
#include <omp.h>
#endif

namespace zfk::cpu {

// Whether this process is a fork() child: its OpenMP runtime still lists the parent's worker threads,
// which the child does not have, so a parallel region there would wait for them forever.
bool in_forked_child();

// Runs body(begin, end) over [0, n) split into contiguous blocks, one per thread. Small work runs inline.
// With OpenMP the blocks run on the runtime torch itself uses (libgomp.so.1, which torch loads before this
// module, so the loader binds ours to the same copy): its workers are awake after torch's ops, while a pool
// of our own would fight them for the cores as they spin (on 2 cores a mid-size ReLU ran 2x slower on two
// threads than on one). A forked child starts threads of its own instead.
template <typename Body>
void parallel_for(int64_t n, int num_threads, int64_t work_per_item, const Body& body) {
  constexpr int64_t kMinWorkPerThread = 32768;
  const int64_t by_work = std::max<int64_t>(1, n * std::max<int64_t>(work_per_item, 1) / kMinWorkPerThread);
  const int64_t threads = std::min<int64_t>({static_cast<int64_t>(std::max(num_threads, 1)), n, by_work});
  if (threads <= 1) {
    if (n > 0) body(int64_t(0), n);
    return;
  }
  const int64_t chunk = (n + threads - 1) / threads;
#if defined(_OPENMP)
  if (!in_forked_child()) {
#pragma omp parallel num_threads(static_cast<int>(threads))
    {
      const int64_t begin = omp_get_thread_num() * chunk, end = std::min(n, begin + chunk);
      if (begin < end) body(begin, end);
    }
    return;
  }
#endif
  std::vector<std::thread> workers;
  workers.reserve(threads - 1);
  for (int64_t t = 1; t < threads; ++t) {
    const int64_t begin = t * chunk, end = std::min(n, begin + chunk);
    if (begin < end) workers.emplace_back([&body, begin, end] { body(begin, end); });
  }
  body(int64_t(0), std::min(n, chunk));
  for (auto& w : workers) w.join();
}

}  // namespace zfk::cpu
