// Runtime ISA dispatch for CPU kernels: on x86-64 with GCC, a function marked PYFLOWMAP_CLONES
// is compiled three times (AVX-512, AVX2+FMA, baseline SSE2) and the loader picks the best one
// for the running CPU (ifunc). Mark the innermost range function, not the parallel_for lambda.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// Feature names, not "arch=": an arch clone is chosen only on that exact CPU model, so a
// Sapphire Rapids machine fell back to the SSE2 default.
#define PYFLOWMAP_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PYFLOWMAP_CLONES
#endif

namespace pyflowmap {

// bfloat16 <-> float on raw bits, branch-free so the loops around them vectorize
// (round to nearest even; NaN stays a quiet NaN), bit-identical to c10::BFloat16.
__attribute__((always_inline)) inline float bf16_to_float(uint16_t b) {
  return __builtin_bit_cast(float, static_cast<uint32_t>(b) << 16);
}

__attribute__((always_inline)) inline uint16_t float_to_bf16(float f) {
  const uint32_t u = __builtin_bit_cast(uint32_t, f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return f != f ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(rounded);
}

}  // namespace pyflowmap
