// Shared pieces of the CPU kernels: runtime ISA dispatch and branch-free bfloat16 conversion.
//
// On x86-64 with GCC, a function marked PYFLOWMAP_CLONES is compiled three times (AVX-512,
// AVX2, baseline SSE2) and the loader picks the best one for the running CPU (ifunc). Mark the
// innermost range function, not the parallel_for lambda, and make everything it calls
// PYFLOWMAP_INLINE so it is compiled inside each clone.
#pragma once

#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// Feature names, not "arch=": an arch clone is chosen only on that exact CPU model, so a
// Sapphire Rapids machine fell back to the SSE2 default.
#define PYFLOWMAP_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PYFLOWMAP_CLONES
#endif

#define PYFLOWMAP_INLINE __attribute__((always_inline)) inline

namespace c10 {
struct BFloat16;
}

namespace pyflowmap {

// bfloat16 <-> float on raw bits, branch-free so the loops around them vectorize
// (round to nearest even; NaN stays a quiet NaN), bit-identical to c10::BFloat16.
PYFLOWMAP_INLINE float bf16_to_float(uint16_t b) {
  return __builtin_bit_cast(float, static_cast<uint32_t>(b) << 16);
}

PYFLOWMAP_INLINE uint16_t float_to_bf16(float f) {
  const uint32_t u = __builtin_bit_cast(uint32_t, f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return f != f ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(rounded);
}

// The raw storage type a kernel loop works on: bfloat16 as its bits, others as themselves.
template <typename T> struct Raw { using R = T; };
template <> struct Raw<c10::BFloat16> { using R = uint16_t; };

// Loads to the compute type and stores back from it.
PYFLOWMAP_INLINE float ld(float v) { return v; }
PYFLOWMAP_INLINE double ld(double v) { return v; }
PYFLOWMAP_INLINE float ld(uint16_t v) { return bf16_to_float(v); }

template <typename R> PYFLOWMAP_INLINE R st(double v);
template <> PYFLOWMAP_INLINE float st<float>(double v) { return static_cast<float>(v); }
template <> PYFLOWMAP_INLINE double st<double>(double v) { return v; }
template <> PYFLOWMAP_INLINE uint16_t st<uint16_t>(double v) { return float_to_bf16(static_cast<float>(v)); }

// A double result narrowed to the accumulation type with IEEE overflow: beyond float's range it
// becomes +-inf (a plain cast out of range is undefined behaviour in C++, and c10's checked
// scalar conversion throws), so a fused op reports overflow as inf exactly like its twin, and
// the non-finite step guard sees it.
template <typename Acc> PYFLOWMAP_INLINE Acc narrow(double v);
template <> PYFLOWMAP_INLINE double narrow<double>(double v) { return v; }
template <> PYFLOWMAP_INLINE float narrow<float>(double v) {
  constexpr double kMax = 3.4028234663852886e38;  // FLT_MAX
  constexpr float kInf = __builtin_inff();
  return v > kMax ? kInf : (v < -kMax ? -kInf : static_cast<float>(v));
}

}  // namespace pyflowmap
