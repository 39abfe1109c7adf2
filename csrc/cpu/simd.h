// Portable SIMD for the CPU launchers. Hot loops use GCC vector extensions (no intrinsics, so the
// same code builds for SSE2 and AVX2) and are compiled twice: the loader picks the x86-64-v3
// (AVX2+FMA) clone when the CPU has it, so no -march flag ties the binary to one machine.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ZFK_VECTORIZED __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define ZFK_VECTORIZED
#endif

namespace zfk::cpu {

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
template <typename V, typename T>
__attribute__((always_inline)) inline void store_vec(T* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

}  // namespace zfk::cpu
