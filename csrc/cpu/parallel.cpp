// The fork flag parallel_for reads (csrc/cpu/parallel.h).
#include "cpu/parallel.h"

#include <pthread.h>

#include <atomic>

namespace zfk::cpu {
namespace {

std::atomic<bool> forked_child{false};

void mark_forked_child() { forked_child.store(true, std::memory_order_relaxed); }

// Registered when the module loads (this file is linked in because parallel_for calls in_forked_child).
const int atfork_registered = pthread_atfork(nullptr, nullptr, mark_forked_child);

}  // namespace

bool in_forked_child() { return forked_child.load(std::memory_order_relaxed); }

}  // namespace zfk::cpu
