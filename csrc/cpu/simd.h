// Portable SIMD for the CPU launchers. Hot loops use GCC vector extensions (no intrinsics, so the
// same code builds for SSE2 and AVX2) and are compiled twice: the loader picks the x86-64-v3
// (AVX2+FMA) clone when the CPU has it, so no -march flag ties the binary to one machine.
#pragma once
#include <cstdint>
#include <cstring>

#include "kernels/common.h"
#if defined(__x86_64__)
#include <emmintrin.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ZFK_VECTORIZED __attribute__((target_clones("arch=x86-64-v3", "default")))
// A few hot loops also have an AVX-512 version (defined under `#pragma GCC target("arch=x86-64-v4")`),
// called after a run-time check (cpu_has_avx512).
#define ZFK_HAS_AVX512 1
#include <cstdlib>
#else
#define ZFK_VECTORIZED
#define ZFK_HAS_AVX512 0
#endif

namespace zfk::cpu {

#if ZFK_HAS_AVX512
// Whether this CPU runs x86-64-v4 code (AVX-512 F/BW/CD/DQ/VL); ZFK_NO_AVX512=1 says no, so the tests
// can check the AVX2 paths on a machine that has both.
inline bool cpu_has_avx512() {
  static const bool has = [] {
    const char* off = std::getenv("ZFK_NO_AVX512");
    if (off != nullptr && off[0] != '\0' && off[0] != '0') return false;
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vl");
  }();
  return has;
}
#endif

// 32-byte vectors of a float type, and integer vectors with lanes of the same width (for masks).
template <typename T> struct Simd;
template <> struct Simd<float> {
  typedef float Vec __attribute__((vector_size(32)));
  typedef int32_t Int __attribute__((vector_size(32)));
  using Lane = int32_t;
  static constexpr int kLanes = 8;
};
template <> struct Simd<double> {
  typedef double Vec __attribute__((vector_size(32)));
  typedef int64_t Int __attribute__((vector_size(32)));
  using Lane = int64_t;
  static constexpr int kLanes = 4;
};

template <typename V, typename T>
__attribute__((always_inline)) inline V load_vec(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));  // compiles to one unaligned load
  return v;
}
// Every lane set to x, as one broadcast instruction. (`V{} + x` would cost a real add, since 0 + x is not
// x for x = -0.0, and a per-lane loop compiles to a chain of inserts.)
template <typename V, typename T>
__attribute__((always_inline)) inline V broadcast(T x) {
  V v = {};
  v[0] = x;
  return __builtin_shuffle(v, typename Simd<T>::Int{});
}

template <typename V, typename T>
__attribute__((always_inline)) inline void store_vec(T* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

// Copies n elements to memory that will not be read again soon, bypassing the cache where the CPU can
// (x86 non-temporal stores): a destination line then needs no read-for-ownership, which saves a third
// of the traffic of writing a large output. Callers end their writes with stream_fence().
template <typename T>
inline void stream_copy(T* dst, const T* src, int64_t n) {
#if defined(__x86_64__)
  if constexpr (sizeof(T) == 4 || sizeof(T) == 8) {
    int64_t i = 0;
    for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 15) != 0; ++i) dst[i] = src[i];
    constexpr int64_t kPerVector = 16 / sizeof(T);
    for (; i + kPerVector <= n; i += kPerVector) {
      __m128i v;
      std::memcpy(&v, src + i, 16);
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), v);
    }
    for (; i < n; ++i) dst[i] = src[i];
    return;
  }
#endif
  std::memcpy(dst, src, n * sizeof(T));
}

// Half types to float and back (c10's conversions, vectorized): the kernels widen a plane into a
// cache-resident float copy, run their float path, and round once on the way out.
template <typename T>
ZFK_VECTORIZED void widen(const T* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = load(in + i);
}

template <typename T>
ZFK_VECTORIZED void narrow(const float* in, T* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) store(out + i, in[i]);
}

inline void stream_fence() {
#if defined(__x86_64__)
  _mm_sfence();
#endif
}

}  // namespace zfk::cpu
