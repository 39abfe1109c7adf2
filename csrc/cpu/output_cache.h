// A cache of large CPU blocks for op outputs. A fresh large allocation is mmapped by the C library and
// every page faults on first touch, which costs as much as the kernel that fills it; blocks released by
// torch (through a DLPack deleter) are kept, already faulted in, for the next output of the same size.
#pragma once
#include <cstddef>

namespace zfk::cpu {

struct CacheStats {
  size_t in_use;       // bytes handed out and not yet released
  size_t peak_in_use;  // high-water mark of in_use since the last reset_cache_peak()
  size_t idle;         // bytes kept for reuse
  size_t limit;        // most idle bytes kept; 0 means blocks are freed on release
};

// Returns a block of at least nbytes (rounded up to whole 2 MiB pages, huge-page backed where the kernel
// allows), or nullptr when memory is exhausted. Thread-safe.
void* cache_allocate(size_t nbytes);
// Takes back a block from cache_allocate; callable from any thread (torch frees tensors anywhere).
void cache_release(void* block);
CacheStats cache_stats();
void reset_cache_peak();
// Sets the idle limit, freeing idle blocks beyond it.
void set_cache_limit(size_t bytes);

}  // namespace zfk::cpu
