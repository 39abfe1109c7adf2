// The output block cache (see output_cache.h): idle blocks by size, live blocks by address.
#include "cpu/output_cache.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <unordered_map>

namespace zfk::cpu {
namespace {

constexpr size_t kHugePage = size_t(2) << 20;

struct Cache {
  std::mutex mutex;
  std::multimap<size_t, void*> idle;            // size -> block
  std::unordered_map<void*, size_t> live;       // block -> size
  size_t in_use = 0, peak_in_use = 0, idle_bytes = 0, limit = default_limit();

  // An eighth of physical memory, at most 4 GiB: room to keep a large repeated output (a 1.4 GB batch of
  // image-sized projections) without holding much of a small machine.
  static size_t default_limit() {
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    const size_t physical = pages > 0 && page > 0 ? size_t(pages) * size_t(page) : size_t(8) << 30;
    return std::min(physical / 8, size_t(4) << 30);
  }

  // Frees idle blocks, largest first, until at most `keep` idle bytes remain. Caller holds the mutex.
  void trim(size_t keep) {
    while (idle_bytes > keep && !idle.empty()) {
      auto largest = std::prev(idle.end());
      idle_bytes -= largest->first;
      std::free(largest->second);
      idle.erase(largest);
    }
  }
};

// Never destroyed: tensors that outlive interpreter shutdown still release into it.
Cache& cache() {
  static Cache* instance = new Cache;
  return *instance;
}

}  // namespace

void* cache_allocate(size_t nbytes) {
  const size_t size = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
  Cache& c = cache();
  std::unique_lock<std::mutex> lock(c.mutex);
  void* block = nullptr;
  // Reuse an idle block of this size, or one at most 25% larger (bounded waste, fewer fresh faults).
  auto fit = c.idle.lower_bound(size);
  if (fit != c.idle.end() && fit->first <= size + size / 4) {
    block = fit->second;
    c.idle_bytes -= fit->first;
    c.live.emplace(block, fit->first);
    c.in_use += fit->first;
    c.idle.erase(fit);
  } else {
    lock.unlock();  // the allocation itself needs no lock
    if (posix_memalign(&block, kHugePage, size) != 0) return nullptr;
#ifdef MADV_HUGEPAGE
    madvise(block, size, MADV_HUGEPAGE);  // before the first touch, so faults come 2 MiB at a time
#endif
    lock.lock();
    c.live.emplace(block, size);
    c.in_use += size;
  }
  if (c.in_use > c.peak_in_use) c.peak_in_use = c.in_use;
  return block;
}

void cache_release(void* block) {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  auto found = c.live.find(block);
  if (found == c.live.end()) return;  // not ours: never free what we did not allocate
  const size_t size = found->second;
  c.live.erase(found);
  c.in_use -= size;
  if (size > c.limit) {
    std::free(block);
    return;
  }
  c.idle.emplace(size, block);
  c.idle_bytes += size;
  c.trim(c.limit);
}

CacheStats cache_stats() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  return {c.in_use, c.peak_in_use, c.idle_bytes, c.limit};
}

void reset_cache_peak() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  c.peak_in_use = c.in_use;
}

void set_cache_limit(size_t bytes) {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  c.limit = bytes;
  c.trim(bytes);
}

}  // namespace zfk::cpu
