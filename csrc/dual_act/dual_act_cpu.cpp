// CPU kernels of the dual activations. The per-element math is shared by fp32 and bf16 (which
// computes in fp32); fp64 uses libm. Parallel over flat ranges, ISA-cloned inner loops.
#include "dual_act/dual_act.h"

#include "common/cpu_dispatch.h"
#include "common/vec_math.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <cmath>
#include <type_traits>

namespace pyflowmap::dual_act {
namespace {

using namespace pyflowmap::vmath;

constexpr int64_t kGrain = 1 << 13;  // transcendental-heavy: smaller tasks than a copy

// a(z), a'(z) and a''(z) for one element; F = float uses the vectorizable vmath functions,
// F = double libm (through the vmath overloads).
template <Kind K, typename F>
PYFLOWMAP_INLINE void derivs(F z, F& a, F& d1, F& d2) {
  if constexpr (K == Kind::kGelu) {
    const F cdf = normal_cdf(z);
    const F pdf = F(0.39894228040143268) * exp_(F(-0.5) * z * z);  // 1 / sqrt(2 pi), rounded once to F
    a = z * cdf;
    d1 = cdf + z * pdf;
    d2 = pdf * (F(2) - z * z);
  } else {
    const F s = sigmoid(z);
    a = z * s;
    d1 = s * (F(1) + z * (F(1) - s));
    d2 = s * (F(1) - s) * (F(2) + z * (F(1) - F(2) * s));
  }
}

// Loads/stores of one storage type through fp32 (fp32 itself, or bf16 bits).
struct F32 {
  using T = float;
  static float ld(float v) { return v; }
  static float st(float v) { return v; }
};
struct BF16 {
  using T = uint16_t;
  static float ld(uint16_t v) { return pyflowmap::ld(v); }
  static uint16_t st(float v) { return float_to_bf16(v); }
};

// always_inline: the loops must be compiled inside each ISA clone, not once for the baseline.
template <typename S, Kind K>
PYFLOWMAP_INLINE void fwd_loop(const typename S::T* __restrict__ z, const typename S::T* __restrict__ zd,
                     typename S::T* __restrict__ y, typename S::T* __restrict__ yd, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    float a, d1, d2;
    derivs<K, float>(S::ld(z[i]), a, d1, d2);
    y[i] = S::st(a);
    yd[i] = S::st(d1 * S::ld(zd[i]));
  }
}

template <typename S, Kind K>
PYFLOWMAP_INLINE void bwd_loop(const typename S::T* __restrict__ gy, const typename S::T* __restrict__ gyd,
                     const typename S::T* __restrict__ z, const typename S::T* __restrict__ zd,
                     typename S::T* __restrict__ gz, typename S::T* __restrict__ gzd, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    float a, d1, d2;
    derivs<K, float>(S::ld(z[i]), a, d1, d2);
    const float g_ydot = S::ld(gyd[i]);
    gz[i] = S::st(d1 * S::ld(gy[i]) + d2 * S::ld(zd[i]) * g_ydot);
    gzd[i] = S::st(d1 * g_ydot);
  }
}

#define PYFLOWMAP_RANGES(S)                                                                     \
  PYFLOWMAP_CLONES void fwd_range_##S(const S::T* z, const S::T* zd, S::T* y, S::T* yd,        \
                                      int64_t n, Kind k) {                                     \
    if (k == Kind::kGelu)                                                                      \
      fwd_loop<S, Kind::kGelu>(z, zd, y, yd, n);                                               \
    else                                                                                       \
      fwd_loop<S, Kind::kSilu>(z, zd, y, yd, n);                                               \
  }                                                                                            \
  PYFLOWMAP_CLONES void bwd_range_##S(const S::T* gy, const S::T* gyd, const S::T* z,          \
                                      const S::T* zd, S::T* gz, S::T* gzd, int64_t n, Kind k) { \
    if (k == Kind::kGelu)                                                                      \
      bwd_loop<S, Kind::kGelu>(gy, gyd, z, zd, gz, gzd, n);                                    \
    else                                                                                       \
      bwd_loop<S, Kind::kSilu>(gy, gyd, z, zd, gz, gzd, n);                                    \
  }
PYFLOWMAP_RANGES(F32)
PYFLOWMAP_RANGES(BF16)
#undef PYFLOWMAP_RANGES

void fwd_range_f64(const double* z, const double* zd, double* y, double* yd, int64_t n, Kind k) {
  for (int64_t i = 0; i < n; ++i) {
    double a, d1, d2;
    if (k == Kind::kGelu) derivs<Kind::kGelu, double>(z[i], a, d1, d2);
    else derivs<Kind::kSilu, double>(z[i], a, d1, d2);
    y[i] = a;
    yd[i] = d1 * zd[i];
  }
}

void bwd_range_f64(const double* gy, const double* gyd, const double* z, const double* zd,
                   double* gz, double* gzd, int64_t n, Kind k) {
  for (int64_t i = 0; i < n; ++i) {
    double a, d1, d2;
    if (k == Kind::kGelu) derivs<Kind::kGelu, double>(z[i], a, d1, d2);
    else derivs<Kind::kSilu, double>(z[i], a, d1, d2);
    gz[i] = d1 * gy[i] + d2 * zd[i] * gyd[i];
    gzd[i] = d1 * gyd[i];
  }
}

}  // namespace

template <typename T>
void forward_cpu(const T* z, const T* z_dot, T* y, T* y_dot, int64_t n, Kind kind) {
  using R = typename Raw<T>::R;
  at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
    auto zp = reinterpret_cast<const R*>(z) + b;
    auto zdp = reinterpret_cast<const R*>(z_dot) + b;
    auto yp = reinterpret_cast<R*>(y) + b;
    auto ydp = reinterpret_cast<R*>(y_dot) + b;
    if constexpr (std::is_same_v<T, float>) fwd_range_F32(zp, zdp, yp, ydp, e - b, kind);
    else if constexpr (std::is_same_v<T, double>) fwd_range_f64(zp, zdp, yp, ydp, e - b, kind);
    else fwd_range_BF16(zp, zdp, yp, ydp, e - b, kind);
  });
}

template <typename T>
void backward_cpu(const T* g_y, const T* g_ydot, const T* z, const T* z_dot, T* g_z, T* g_zdot,
                  int64_t n, Kind kind) {
  using R = typename Raw<T>::R;
  at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
    auto a0 = reinterpret_cast<const R*>(g_y) + b;
    auto a1 = reinterpret_cast<const R*>(g_ydot) + b;
    auto a2 = reinterpret_cast<const R*>(z) + b;
    auto a3 = reinterpret_cast<const R*>(z_dot) + b;
    auto o0 = reinterpret_cast<R*>(g_z) + b;
    auto o1 = reinterpret_cast<R*>(g_zdot) + b;
    if constexpr (std::is_same_v<T, float>) bwd_range_F32(a0, a1, a2, a3, o0, o1, e - b, kind);
    else if constexpr (std::is_same_v<T, double>) bwd_range_f64(a0, a1, a2, a3, o0, o1, e - b, kind);
    else bwd_range_BF16(a0, a1, a2, a3, o0, o1, e - b, kind);
  });
}

#define PYFLOWMAP_INSTANTIATE(T)                                                                \
  template void forward_cpu<T>(const T*, const T*, T*, T*, int64_t, Kind);                     \
  template void backward_cpu<T>(const T*, const T*, const T*, const T*, T*, T*, int64_t, Kind);
PYFLOWMAP_INSTANTIATE(float)
PYFLOWMAP_INSTANTIATE(double)
PYFLOWMAP_INSTANTIATE(c10::BFloat16)
#undef PYFLOWMAP_INSTANTIATE

}  // namespace pyflowmap::dual_act
