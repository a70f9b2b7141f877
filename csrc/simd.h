// Portable 16-lane float SIMD for the SaS CPU kernels.
//
// GCC/Clang vector extensions instead of intrinsics: the same source becomes one
// AVX-512 register, two AVX2 registers or four SSE registers, whatever the build
// flags allow, and needs no CPU dispatch. Loads and stores go through memcpy, so
// no pointer needs any alignment. Half-precision inputs are widened on load and
// rounded (to nearest even) on store: every kernel accumulates in float32.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <utility>

namespace sas::simd {

// One vector is one register of the widest unit the build targets: 16 floats (AVX-512) or 8 (AVX2 and
// narrower). A 16-float vector on AVX2 is two registers, and the kernels' register-blocked loops, sized in
// vectors, then spilled: on a Zen 3 EPYC (AVX2) 16 lanes made the MiniLM 384->384 layer's forward 3.3x and
// its backward 1.5x slower than 8 lanes, 2048 rows, 2 threads.
#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
constexpr int kRegisters = 32;
#else
constexpr int64_t kLanes = 8;
constexpr int kRegisters = 16;
#endif

typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef uint32_t Bits32 __attribute__((vector_size(kLanes * sizeof(uint32_t))));
typedef int32_t Mask32 __attribute__((vector_size(kLanes * sizeof(int32_t))));
typedef uint16_t Bits16 __attribute__((vector_size(kLanes * sizeof(uint16_t))));
typedef _Float16 Half16 __attribute__((vector_size(kLanes * sizeof(_Float16))));
typedef int8_t Int8Lanes __attribute__((vector_size(kLanes * sizeof(int8_t))));

inline Vec splat(float value) { return Vec{} + value; }

inline Vec load(const float* src) {
  Vec v;
  std::memcpy(&v, src, sizeof v);
  return v;
}

inline Vec load(const c10::BFloat16* src) {
  // bfloat16 is the high half of a float32: widening is a 16-bit shift.
  Bits16 raw;
  std::memcpy(&raw, src, sizeof raw);
  Bits32 bits = __builtin_convertvector(raw, Bits32) << 16;
  Vec v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

inline Vec load(const c10::Half* src) {
  Half16 raw;
  std::memcpy(&raw, src, sizeof raw);
  return __builtin_convertvector(raw, Vec);
}

// The 8-bit copies of a layer input (saved_input): exact widening, read only by the backward's dA.
inline Vec load(const int8_t* src) {
  Int8Lanes raw;
  std::memcpy(&raw, src, sizeof raw);
  return __builtin_convertvector(raw, Vec);
}

inline Vec load(const c10::Float8_e4m3fn* src) {
  Vec v;
  for (int64_t i = 0; i < kLanes; ++i) v[i] = static_cast<float>(src[i]);
  return v;
}

inline void store(float* dst, Vec v) { std::memcpy(dst, &v, sizeof v); }

inline void store(c10::BFloat16* dst, Vec v) {
  // Round to nearest even like c10::BFloat16(float); NaN becomes the canonical quiet NaN.
  Bits32 bits;
  std::memcpy(&bits, &v, sizeof bits);
  Bits32 rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  Mask32 is_nan = v != v;
  rounded = is_nan ? (Bits32{} + 0x7FC0u) : rounded;
  Bits16 narrow = __builtin_convertvector(rounded, Bits16);
  std::memcpy(dst, &narrow, sizeof narrow);
}

inline void store(c10::Half* dst, Vec v) {
  Half16 narrow = __builtin_convertvector(v, Half16);
  std::memcpy(dst, &narrow, sizeof narrow);
}

// Tails: the first `count` (< kLanes) elements, zero beyond, so a tail goes
// through the same arithmetic as a full vector.
template <typename T>
inline Vec load_partial(const T* src, int64_t count) {
  T padded[kLanes];
  for (int64_t i = 0; i < kLanes; ++i) padded[i] = i < count ? src[i] : T(0);
  return load(padded);
}

template <typename T>
inline void store_partial(T* dst, Vec v, int64_t count) {
  T padded[kLanes];
  store(padded, v);
  for (int64_t i = 0; i < count; ++i) dst[i] = padded[i];
}

template <typename T>
inline Vec load_n(const T* src, int64_t count) {
  return count == kLanes ? load(src) : load_partial(src, count);
}

template <typename T>
inline void store_n(T* dst, Vec v, int64_t count) {
  if (count == kLanes) {
    store(dst, v);
  } else {
    store_partial(dst, v, count);
  }
}

// Horizontal sums: each vector's lanes are summed pairwise in one fixed tree (lane i with lane i + width,
// width = kLanes / 2, ..., 1), so a result never depends on threads.
namespace detail {
// Source lane, in the concatenation (a, b), of output lane `lane` when two vectors holding sums `width`
// lanes wide each (kLanes / width sums per vector) fold into one holding twice as many sums half as wide:
// the lower (`half` 0) or upper (`half` width / 2) partner of that lane in the tree.
constexpr int fold_source(int lane, int width, int half) {
  const int sums_per_vector = static_cast<int>(kLanes) / width;
  const int slot = lane / (width / 2), offset = lane % (width / 2);
  return (slot < sums_per_vector ? 0 : static_cast<int>(kLanes)) + (slot % sums_per_vector) * width + half + offset;
}

template <int Width, int... Lane>
inline Vec fold_pair(Vec a, Vec b, std::integer_sequence<int, Lane...>) {
  return __builtin_shufflevector(a, b, fold_source(Lane, Width, 0)...) +
         __builtin_shufflevector(a, b, fold_source(Lane, Width, Width / 2)...);
}

template <int Count, int Width>
inline void fold_sums(Vec* v, float* out) {
  if constexpr (Count > 1 && Width > 1) {
    for (int i = 0; i < Count / 2; ++i) {
      v[i] = fold_pair<Width>(v[2 * i], v[2 * i + 1], std::make_integer_sequence<int, static_cast<int>(kLanes)>{});
    }
    fold_sums<Count / 2, Width / 2>(v, out);
  } else {
    // One vector of kLanes / Width sums, each Width lanes wide: finish each sum's tree lane by lane.
    for (int k = 0; k < static_cast<int>(kLanes) / Width; ++k) {
      float* lanes = reinterpret_cast<float*>(&v[0]) + k * Width;
      for (int width = Width / 2; width >= 1; width /= 2) {
        for (int i = 0; i < width; ++i) lanes[i] += lanes[i + width];
      }
      out[k] = lanes[0];
    }
  }
}
}  // namespace detail

// out[k] = the sum of sums[k]'s lanes for Count (a power of two, at most kLanes) vectors, folded two vectors
// at a time with whole-vector shuffles and adds: each level halves the vectors and the lanes per sum, in the
// tree's own pairing, so the sums are bit for bit those of a lane-by-lane tree (checked against the previous
// lane-by-lane build on every dtype, ranks 1-29). `sums` is overwritten.
template <int Count>
inline void horizontal_sums(Vec* sums, float* out) {
  static_assert(Count >= 1 && Count <= kLanes && (Count & (Count - 1)) == 0, "Count: a power of two <= kLanes");
  detail::fold_sums<Count, static_cast<int>(kLanes)>(sums, out);
}

}  // namespace sas::simd
