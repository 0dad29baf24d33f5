// Element-wise math written so that GCC auto-vectorizes it: no libm calls, no branches (selects
// only), float bit tricks through __builtin_bit_cast. Used inside loops of functions compiled
// with target_clones, so each clone gets SSE2 / AVX2 / AVX-512 code from the same source.
#pragma once

#include "common/cpu_dispatch.h"

#include <cmath>
#include <cstdint>

namespace pyflowmap::vmath {

// expf after Cephes: exp(x) = 2^n exp(r), |r| <= ln2/2, degree-6 polynomial; about 2 ulp.
// Inputs are clamped to [-87, 88] (normal range), so tiny results saturate at ~1.6e-38.
PYFLOWMAP_INLINE float exp_f(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  // round to nearest through the 1.5 * 2^23 shifter: no floor() call, which the SSE2 baseline
  // lacks as an instruction (a libm call there would stop vectorization).
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return e * __builtin_bit_cast(float, bits);
}

// erfc(a) for a >= 0 (Numerical Recipes' Chebyshev fit, fractional error < 1.2e-7).
PYFLOWMAP_INLINE float erfc_pos_f(float a) {
  const float t = 1.0f / (1.0f + 0.5f * a);
  float p = 0.17087277f;
  p = p * t - 0.82215223f;
  p = p * t + 1.48851587f;
  p = p * t - 1.13520398f;
  p = p * t + 0.27886807f;
  p = p * t - 0.18628806f;
  p = p * t + 0.09678418f;
  p = p * t + 0.37409196f;
  p = p * t + 1.00002368f;
  p = p * t - 1.26551223f;
  return t * exp_f(p - a * a);
}

constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

// Standard normal CDF with good relative accuracy in both tails.
PYFLOWMAP_INLINE float normal_cdf_f(float z) {
  const float e = 0.5f * erfc_pos_f((z < 0.0f ? -z : z) * kInvSqrt2);
  return z >= 0.0f ? 1.0f - e : e;
}

PYFLOWMAP_INLINE float sigmoid_f(float z) { return 1.0f / (1.0f + exp_f(-z)); }

inline double normal_cdf_d(double z) { return 0.5 * std::erfc(-z * 0.70710678118654752); }
inline double sigmoid_d(double z) { return 1.0 / (1.0 + std::exp(-z)); }

// Overloads so that element math can be written once for float (vectorizable) and double (libm).
PYFLOWMAP_INLINE float exp_(float x) { return exp_f(x); }
inline double exp_(double x) { return std::exp(x); }
PYFLOWMAP_INLINE float normal_cdf(float z) { return normal_cdf_f(z); }
inline double normal_cdf(double z) { return normal_cdf_d(z); }
PYFLOWMAP_INLINE float sigmoid(float z) { return sigmoid_f(z); }
inline double sigmoid(double z) { return sigmoid_d(z); }

}  // namespace pyflowmap::vmath
