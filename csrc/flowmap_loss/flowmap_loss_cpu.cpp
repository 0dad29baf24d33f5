// CPU kernels of the fused flow-map loss: row-parallel, double accumulation, ISA-cloned loops.
#include "flowmap_loss/flowmap_loss.h"

#include "common/cpu_dispatch.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <cmath>
#include <type_traits>
#include <vector>

namespace pyflowmap::flowmap_loss {
namespace {

constexpr int64_t kGrain = 1 << 15;  // elements per task

template <typename T> struct Raw { using R = T; };
template <> struct Raw<c10::BFloat16> { using R = uint16_t; };

__attribute__((always_inline)) inline float ld(float v) { return v; }
__attribute__((always_inline)) inline double ld(double v) { return v; }
__attribute__((always_inline)) inline float ld(uint16_t v) { return bf16_to_float(v); }

template <typename R> __attribute__((always_inline)) inline R st(double v);
template <> __attribute__((always_inline)) inline float st<float>(double v) { return static_cast<float>(v); }
template <> __attribute__((always_inline)) inline double st<double>(double v) { return v; }
template <> __attribute__((always_inline)) inline uint16_t st<uint16_t>(double v) {
  return float_to_bf16(static_cast<float>(v));
}

template <typename R>
__attribute__((always_inline)) inline double row_sq(const R* __restrict__ p, const R* __restrict__ q, int64_t n) {
  double acc = 0.0;
  if (q == nullptr) {
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < n; ++j) { const double d = ld(p[j]); acc += d * d; }
  } else {
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < n; ++j) { const double d = static_cast<double>(ld(p[j])) - ld(q[j]); acc += d * d; }
  }
  return acc;
}

template <typename R, typename Acc>
__attribute__((always_inline)) inline void row_grad(const R* __restrict__ p, const R* __restrict__ q, Acc coef,
                                                    R* __restrict__ out, int64_t n) {
  if (q == nullptr) {
    for (int64_t j = 0; j < n; ++j) out[j] = st<R>(coef * static_cast<Acc>(ld(p[j])));
  } else {
    for (int64_t j = 0; j < n; ++j) out[j] = st<R>(coef * (static_cast<Acc>(ld(p[j])) - static_cast<Acc>(ld(q[j]))));
  }
}

// Rows of compile-time length N (2D data: N = 2) fully unroll; a runtime-length vector loop
// per row would be all prologue and epilogue there (fused was slower than eager at 64k x 2).
template <int64_t N, typename R>
__attribute__((always_inline)) inline void sq_short(const R* p, const R* q, double* d, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) d[r] = row_sq(p + r * N, q ? q + r * N : nullptr, N);
}
template <int64_t N, typename R, typename Acc>
__attribute__((always_inline)) inline void grad_short(const R* p, const R* q, const Acc* coef, R* out,
                                                      int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) row_grad<R, Acc>(p + r * N, q ? q + r * N : nullptr, coef[r], out + r * N, N);
}

#define PYFLOWMAP_SHORT(N, CALL) \
  case N:                        \
    CALL;                        \
    return;

#define PYFLOWMAP_ROWS(R, Acc, NAME)                                                                \
  PYFLOWMAP_CLONES void sq_rows_##NAME(const R* p, const R* q, double* d, int64_t r0, int64_t r1,  \
                                       int64_t n) {                                                \
    switch (n) {                                                                                   \
      PYFLOWMAP_SHORT(1, (sq_short<1, R>(p, q, d, r0, r1)))                                        \
      PYFLOWMAP_SHORT(2, (sq_short<2, R>(p, q, d, r0, r1)))                                        \
      PYFLOWMAP_SHORT(3, (sq_short<3, R>(p, q, d, r0, r1)))                                        \
      PYFLOWMAP_SHORT(4, (sq_short<4, R>(p, q, d, r0, r1)))                                        \
      default:                                                                                     \
        for (int64_t r = r0; r < r1; ++r) d[r] = row_sq(p + r * n, q ? q + r * n : nullptr, n);    \
    }                                                                                              \
  }                                                                                                \
  PYFLOWMAP_CLONES void grad_rows_##NAME(const R* p, const R* q, const Acc* coef, R* out,          \
                                         int64_t r0, int64_t r1, int64_t n) {                      \
    switch (n) {                                                                                   \
      PYFLOWMAP_SHORT(1, (grad_short<1, R, Acc>(p, q, coef, out, r0, r1)))                         \
      PYFLOWMAP_SHORT(2, (grad_short<2, R, Acc>(p, q, coef, out, r0, r1)))                         \
      PYFLOWMAP_SHORT(3, (grad_short<3, R, Acc>(p, q, coef, out, r0, r1)))                         \
      PYFLOWMAP_SHORT(4, (grad_short<4, R, Acc>(p, q, coef, out, r0, r1)))                         \
      default:                                                                                     \
        for (int64_t r = r0; r < r1; ++r)                                                          \
          row_grad<R, Acc>(p + r * n, q ? q + r * n : nullptr, coef[r], out + r * n, n);           \
    }                                                                                              \
  }
PYFLOWMAP_ROWS(float, float, f32)
PYFLOWMAP_ROWS(uint16_t, float, bf16)
PYFLOWMAP_ROWS(double, double, f64)
#undef PYFLOWMAP_ROWS

template <typename R> struct Rows;
template <> struct Rows<float> {
  static void sq(const float* p, const float* q, double* d, int64_t a, int64_t b, int64_t n) { sq_rows_f32(p, q, d, a, b, n); }
  static void grad(const float* p, const float* q, const float* c, float* o, int64_t a, int64_t b, int64_t n) { grad_rows_f32(p, q, c, o, a, b, n); }
};
template <> struct Rows<uint16_t> {
  static void sq(const uint16_t* p, const uint16_t* q, double* d, int64_t a, int64_t b, int64_t n) { sq_rows_bf16(p, q, d, a, b, n); }
  static void grad(const uint16_t* p, const uint16_t* q, const float* c, uint16_t* o, int64_t a, int64_t b, int64_t n) { grad_rows_bf16(p, q, c, o, a, b, n); }
};
template <> struct Rows<double> {
  static void sq(const double* p, const double* q, double* d, int64_t a, int64_t b, int64_t n) { sq_rows_f64(p, q, d, a, b, n); }
  static void grad(const double* p, const double* q, const double* c, double* o, int64_t a, int64_t b, int64_t n) { grad_rows_f64(p, q, c, o, a, b, n); }
};

}  // namespace

template <typename T, typename Acc>
double forward_cpu(const T* pred, const T* target, const Acc* weight, Acc* m, int64_t batch,
                   int64_t inner, Metric metric, double c) {
  using R = typename Raw<T>::R;
  const R* p = reinterpret_cast<const R*>(pred);
  const R* q = reinterpret_cast<const R*>(target);
  // Fixed blocks of rows, each summed in order, then the block sums in order: the same result
  // whatever the thread count (determinism), with the metric and weighting fused in.
  const int64_t rows_per_block = std::max<int64_t>(1, kGrain / std::max<int64_t>(inner, 1));
  const int64_t nblocks = (batch + rows_per_block - 1) / rows_per_block;
  std::vector<double> partial(nblocks, 0.0);
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    double d[256];
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r_end = std::min(batch, (blk + 1) * rows_per_block);
      double acc = 0.0;
      for (int64_t r0 = blk * rows_per_block; r0 < r_end; r0 += 256) {
        const int64_t r1 = std::min(r_end, r0 + 256);
        Rows<R>::sq(p + r0 * inner, q ? q + r0 * inner : nullptr, d, 0, r1 - r0, inner);
        for (int64_t r = r0; r < r1; ++r) {
          const double di = d[r - r0];
          const double mi = metric == Metric::kL2Sq ? di : std::sqrt(di + c * c) - c;
          m[r] = static_cast<Acc>(mi);
          acc += (weight ? static_cast<double>(weight[r]) : 1.0) * mi;
        }
      }
      partial[blk] = acc;
    }
  });
  double total = 0.0;
  for (double v : partial) total += v;
  return total;
}

template <typename T, typename Acc>
void backward_cpu(const T* pred, const T* target, const Acc* coef, T* dpred, int64_t batch, int64_t inner) {
  using R = typename Raw<T>::R;
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(inner, 1));
  at::parallel_for(0, batch, grain, [&](int64_t r0, int64_t r1) {
    Rows<R>::grad(reinterpret_cast<const R*>(pred), reinterpret_cast<const R*>(target), coef,
                  reinterpret_cast<R*>(dpred), r0, r1, inner);
  });
}

#define PYFLOWMAP_INSTANTIATE(T, Acc)                                                          \
  template double forward_cpu<T, Acc>(const T*, const T*, const Acc*, Acc*, int64_t, int64_t,  \
                                      Metric, double);                                         \
  template void backward_cpu<T, Acc>(const T*, const T*, const Acc*, T*, int64_t, int64_t);
PYFLOWMAP_INSTANTIATE(float, float)
PYFLOWMAP_INSTANTIATE(double, double)
PYFLOWMAP_INSTANTIATE(c10::BFloat16, float)
#undef PYFLOWMAP_INSTANTIATE

}  // namespace pyflowmap::flowmap_loss
