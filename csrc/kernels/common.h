// Shared definitions for every backend: no torch, no CUDA runtime, only element math over raw pointers.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define ZFK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define ZFK_HOST_DEVICE inline
#endif

namespace zfk {

// Storage types for the half-precision dtypes: the kernels compute in float and round once on store.
struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

#if defined(__CUDA_ARCH__)
ZFK_HOST_DEVICE uint32_t float_bits(float f) { return __float_as_uint(f); }
ZFK_HOST_DEVICE float bits_float(uint32_t u) { return __uint_as_float(u); }
#else
ZFK_HOST_DEVICE uint32_t float_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
ZFK_HOST_DEVICE float bits_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
#endif

ZFK_HOST_DEVICE float to_float(BFloat16 h) { return bits_float(uint32_t(h.bits) << 16); }
ZFK_HOST_DEVICE BFloat16 bf16_from_float(float f) {
  if (f != f) return BFloat16{0x7FC0};  // canonical NaN, as c10::BFloat16
  uint32_t u = float_bits(f);
  return BFloat16{uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16)};  // round to nearest even
}

// IEEE binary16 <-> binary32, the same algorithms c10::Half uses (so results match torch bit for bit).
ZFK_HOST_DEVICE float to_float(Half h) {
  const uint32_t w = uint32_t(h.bits) << 16, sign = w & 0x80000000u, two_w = w + w;
  const float normalized = bits_float((two_w >> 4) + (uint32_t(0xE0) << 23)) * bits_float(0x7800000u);
  const float denormalized = bits_float((two_w >> 17) | (uint32_t(126) << 23)) - 0.5f;
  return bits_float(sign | (two_w < (uint32_t(1) << 27) ? float_bits(denormalized) : float_bits(normalized)));
}
ZFK_HOST_DEVICE Half half_from_float(float f) {
  float base = (std::fabs(f) * bits_float(uint32_t(239) << 23)) * bits_float(uint32_t(17) << 23);
  const uint32_t w = float_bits(f), shl1_w = w + w, sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = bits_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
  return Half{uint16_t((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign))};
}

// Load/store between a storage type and its compute type (float for half types).
template <typename T> struct Compute { using type = T; };
template <> struct Compute<Half> { using type = float; };
template <> struct Compute<BFloat16> { using type = float; };
template <typename T> using compute_t = typename Compute<T>::type;

ZFK_HOST_DEVICE float load(const float* p) { return *p; }
ZFK_HOST_DEVICE double load(const double* p) { return *p; }
ZFK_HOST_DEVICE float load(const Half* p) { return to_float(*p); }
ZFK_HOST_DEVICE float load(const BFloat16* p) { return to_float(*p); }
ZFK_HOST_DEVICE void store(float* p, float v) { *p = v; }
ZFK_HOST_DEVICE void store(double* p, double v) { *p = v; }
ZFK_HOST_DEVICE void store(Half* p, float v) { *p = half_from_float(v); }
ZFK_HOST_DEVICE void store(BFloat16* p, float v) { *p = bf16_from_float(v); }

// A compute-type value rounded to the storage type T and widened back: what storing and reloading gives
// (the identity for float and double). Fused kernels use it where the unfused ops round an intermediate.
template <typename T>
ZFK_HOST_DEVICE compute_t<T> round_to_storage(compute_t<T> v) {
  T stored;
  store(&stored, v);
  return load(&stored);
}

// ReLU exactly as torch.relu (clamp_min): NaN and -0.0 pass through unchanged.
template <typename C> ZFK_HOST_DEVICE C relu(C x) { return x < C(0) ? C(0) : x; }

// Geometry of one pooling: sizes of a plane before (in) and after (out) pooling.
struct PoolGeometry {
  int64_t in_h, in_w, out_h, out_w;
  int64_t kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w;
};

// A switch decoded into its row and column inside the (unclipped) window.
struct WindowOffset {
  int64_t dh, dw;
};

ZFK_HOST_DEVICE WindowOffset switch_offset(const PoolGeometry& g, int64_t sw) { return {sw / g.kernel_w, sw % g.kernel_w}; }

// Flat input position of a window offset, or -1 when it falls on padding.
ZFK_HOST_DEVICE int64_t window_target(const PoolGeometry& g, int64_t oh, int64_t ow, WindowOffset o) {
  const int64_t ih = oh * g.stride_h - g.pad_h + o.dh, iw = ow * g.stride_w - g.pad_w + o.dw;
  if (ih < 0 || ih >= g.in_h || iw < 0 || iw >= g.in_w) return -1;
  return ih * g.in_w + iw;
}

// Input position a window-local switch points to, or -1 when the switch lies outside the window
// or on padding. The one definition every backend uses, so no switch can address out of bounds.
ZFK_HOST_DEVICE int64_t switch_target(const PoolGeometry& g, int64_t oh, int64_t ow, int64_t sw) {
  if (sw < 0 || sw >= g.kernel_h * g.kernel_w) return -1;
  return window_target(g, oh, ow, switch_offset(g, sw));
}

// The same for torch's int64 flat indices (max_pool2d(return_indices=True)): valid only inside the window.
ZFK_HOST_DEVICE int64_t switch_target(const PoolGeometry& g, int64_t oh, int64_t ow, int64_t index, bool flat) {
  if (!flat) return switch_target(g, oh, ow, index);
  if (index < 0 || index >= g.in_h * g.in_w) return -1;
  const int64_t dh = index / g.in_w - (oh * g.stride_h - g.pad_h), dw = index % g.in_w - (ow * g.stride_w - g.pad_w);
  if (dh < 0 || dh >= g.kernel_h || dw < 0 || dw >= g.kernel_w) return -1;
  return index;
}

}  // namespace zfk
