// Minimal fork-join parallel loop for the CPU launchers (the extension links no libtorch, so no at::parallel_for).
#pragma once
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace zfk::cpu {

inline void spin_pause() {
#if defined(__x86_64__)
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

// Threads kept between calls: starting one per call cost ~50 us, most of the time of a small op. After a
// job a worker spins briefly before sleeping, so back-to-back ops (a network's layers) wake it at once.
// One job at a time per process: a call that finds the pool busy (another Python thread's op) is told
// so and starts threads of its own. A forked child gets a fresh pool (it has none of the parent's threads).
class WorkerPool {
 public:
  static WorkerPool& get() {
    static std::atomic<WorkerPool*> pool{nullptr};
    static std::mutex creating;
    WorkerPool* current = pool.load(std::memory_order_acquire);
    if (current == nullptr || current->pid_ != getpid()) {
      std::lock_guard<std::mutex> lock(creating);
      current = pool.load(std::memory_order_acquire);
      if (current == nullptr || current->pid_ != getpid()) {
        current = new WorkerPool();  // never deleted: its detached workers may outlive static destructors
        pool.store(current, std::memory_order_release);
      }
    }
    return *current;
  }

  // Runs body(t) for t in [0, n), body(0) on the calling thread; false (nothing run) when the pool is busy.
  template <typename Body>
  bool run(int n, const Body& body) {
    if (n - 1 > int(kCountMask)) return false;
    bool idle = false;
    if (!busy_.compare_exchange_strong(idle, true, std::memory_order_acquire)) return false;
    const uint64_t last = ticket_.load(std::memory_order_relaxed) >> kCountBits;
    while (int(workers_) < n - 1) {  // a new worker starts from the last job, so it takes the next one
      std::thread(&WorkerPool::work, this, int(workers_) + 1, last).detach();
      ++workers_;
    }
    job_ = [](const void* context, int t) { (*static_cast<const Body*>(context))(t); };
    context_ = &body;
    remaining_.store(n - 1, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      const uint64_t generation = (ticket_.load(std::memory_order_relaxed) >> kCountBits) + 1;
      ticket_.store(generation << kCountBits | uint64_t(n - 1), std::memory_order_release);
    }
    wake_.notify_all();
    body(0);
    for (int spins = 0; remaining_.load(std::memory_order_acquire) != 0; ++spins) {
      if (spins < kSpins) {
        spin_pause();
      } else {
        std::this_thread::yield();
      }
    }
    busy_.store(false, std::memory_order_release);
    return true;
  }

 private:
  static constexpr int kSpins = 20000;  // ~0.1-0.5 ms of pause instructions

  void work(int index, uint64_t seen) {
    for (;;) {
      uint64_t ticket = ticket_.load(std::memory_order_acquire);
      for (int spins = 0; ticket >> kCountBits == seen && spins < kSpins; ++spins) {
        spin_pause();
        ticket = ticket_.load(std::memory_order_acquire);
      }
      if (ticket >> kCountBits == seen) {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return (ticket = ticket_.load(std::memory_order_acquire)) >> kCountBits != seen; });
      }
      seen = ticket >> kCountBits;
      // The job and its worker count come in one atomic ticket. A job cannot start before every worker
      // of the one before has finished it, so a worker of a job never misses it (job_ and context_ stay
      // put until it is done); workers beyond the count skip it.
      if (uint64_t(index) <= (ticket & kCountMask)) {
        job_(context_, index);
        remaining_.fetch_sub(1, std::memory_order_release);
      }
    }
  }

  static constexpr int kCountBits = 16;  // the ticket: generation << 16 | workers in the job
  static constexpr uint64_t kCountMask = (uint64_t(1) << kCountBits) - 1;
  const pid_t pid_ = getpid();
  std::atomic<bool> busy_{false};
  unsigned workers_ = 0;  // started so far (guarded by busy_)
  void (*job_)(const void*, int) = nullptr;
  const void* context_ = nullptr;
  std::atomic<int> remaining_{0};
  std::atomic<uint64_t> ticket_{0};
  std::mutex mutex_;
  std::condition_variable wake_;
};

// Runs body(begin, end) over [0, n) split into contiguous blocks, one per thread. Small work runs
// inline: waking a thread costs more than a small op takes.
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
  const auto block = [&](int t) {
    const int64_t begin = t * chunk, end = std::min(n, begin + chunk);
    if (begin < end) body(begin, end);
  };
  if (WorkerPool::get().run(int(threads), block)) return;
  std::vector<std::thread> workers;  // the pool is busy: threads of this call's own
  workers.reserve(threads - 1);
  for (int t = 1; t < threads; ++t) workers.emplace_back(block, t);
  block(0);
  for (auto& w : workers) w.join();
}

}  // namespace zfk::cpu
