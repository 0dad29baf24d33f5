// CPU kernels of the fused flow-map losses: row blocks in parallel, double accumulation,
// ISA-cloned loops; rows of length <= 4 (2D data) unrolled at compile time.
#include "flowmap_loss/flowmap_loss.h"

#include "common/cpu_dispatch.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace pyflowmap::flowmap_loss {
namespace {

constexpr int64_t kGrain = 1 << 15;  // elements per task

// One row of the residual, pointers already offset to the row. Which operands exist is a
// compile-time choice: a runtime null test inside the loop stopped vectorization (3x slower).
template <typename R, bool HasM, bool HasQ>
struct Row {
  const R* __restrict__ p;
  const R* __restrict__ m;
  const R* __restrict__ q;
  double scale;
  PYFLOWMAP_INLINE double r(int64_t j) const {
    double a;
    if constexpr (HasM) a = (static_cast<double>(ld(p[j])) - ld(m[j])) * scale;
    else a = static_cast<double>(ld(p[j])) * scale;
    if constexpr (HasQ) a -= ld(q[j]);
    return a;
  }
};

template <int64_t N, typename Rw>
PYFLOWMAP_INLINE double row_sq(const Rw& row, int64_t n) {
  const int64_t len = N > 0 ? N : n;
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < len; ++j) {
    const double v = row.r(j);
    acc += v * v;
  }
  return acc;
}

template <int64_t N, typename R, typename Rw>
PYFLOWMAP_INLINE void row_grad(const Rw& row, double coef, R* __restrict__ out, int64_t n) {
  const int64_t len = N > 0 ? N : n;
  const double k = coef * row.scale;
  for (int64_t j = 0; j < len; ++j) out[j] = st<R>(k * row.r(j));
}

template <bool HasM, bool HasQ, typename R>
PYFLOWMAP_INLINE Row<R, HasM, HasQ> row_at(const Residual<R>& res, int64_t r, int64_t n) {
  return {res.pred + r * n, HasM ? res.minus + r * n : nullptr, HasQ ? res.target + r * n : nullptr, res.scale};
}

template <int64_t N, bool HasM, bool HasQ, typename R>
PYFLOWMAP_INLINE void sq_rows_mq(const Residual<R>& res, double* d, int64_t r0, int64_t r1, int64_t n) {
  for (int64_t r = r0; r < r1; ++r) d[r - r0] = row_sq<N>(row_at<HasM, HasQ>(res, r, n), n);
}

template <int64_t N, typename R>
PYFLOWMAP_INLINE void sq_rows_n(const Residual<R>& res, double* d, int64_t r0, int64_t r1, int64_t n) {
  if (res.minus && res.target) sq_rows_mq<N, true, true>(res, d, r0, r1, n);
  else if (res.minus) sq_rows_mq<N, true, false>(res, d, r0, r1, n);
  else if (res.target) sq_rows_mq<N, false, true>(res, d, r0, r1, n);
  else sq_rows_mq<N, false, false>(res, d, r0, r1, n);
}

template <int64_t N, bool HasM, bool HasQ, typename R, typename Acc>
PYFLOWMAP_INLINE void grad_rows_mq(const Residual<R>& res, const Acc* coef, R* out, int64_t r0, int64_t r1, int64_t n) {
  for (int64_t r = r0; r < r1; ++r) row_grad<N, R>(row_at<HasM, HasQ>(res, r, n), coef[r], out + r * n, n);
}

template <int64_t N, typename R, typename Acc>
PYFLOWMAP_INLINE void grad_rows_n(const Residual<R>& res, const Acc* coef, R* out, int64_t r0, int64_t r1, int64_t n) {
  if (res.minus && res.target) grad_rows_mq<N, true, true>(res, coef, out, r0, r1, n);
  else if (res.minus) grad_rows_mq<N, true, false>(res, coef, out, r0, r1, n);
  else if (res.target) grad_rows_mq<N, false, true>(res, coef, out, r0, r1, n);
  else grad_rows_mq<N, false, false>(res, coef, out, r0, r1, n);
}

// Row lengths 1-4 (2D data) unrolled; a runtime-length vector loop per row is all prologue
// and epilogue there (the fused op was slower than eager at 64k x 2 before this).

#define PYFLOWMAP_ROWS(R, Acc, NAME)                                                                   \
  PYFLOWMAP_CLONES void sq_rows_##NAME(const Residual<R>& res, double* d, int64_t r0, int64_t r1,     \
                                       int64_t n) {                                                   \
    switch (n) {                                                                                      \
      case 1: sq_rows_n<1>(res, d, r0, r1, n); break;                                                 \
      case 2: sq_rows_n<2>(res, d, r0, r1, n); break;                                                 \
      case 3: sq_rows_n<3>(res, d, r0, r1, n); break;                                                 \
      case 4: sq_rows_n<4>(res, d, r0, r1, n); break;                                                 \
      default: sq_rows_n<0>(res, d, r0, r1, n);                                                       \
    }                                                                                                 \
  }                                                                                                   \
  PYFLOWMAP_CLONES void grad_rows_##NAME(const Residual<R>& res, const Acc* coef, R* out, int64_t r0, \
                                         int64_t r1, int64_t n) {                                     \
    switch (n) {                                                                                      \
      case 1: grad_rows_n<1>(res, coef, out, r0, r1, n); break;                                       \
      case 2: grad_rows_n<2>(res, coef, out, r0, r1, n); break;                                       \
      case 3: grad_rows_n<3>(res, coef, out, r0, r1, n); break;                                       \
      case 4: grad_rows_n<4>(res, coef, out, r0, r1, n); break;                                       \
      default: grad_rows_n<0>(res, coef, out, r0, r1, n);                                             \
    }                                                                                                 \
  }
PYFLOWMAP_ROWS(float, float, f32)
PYFLOWMAP_ROWS(uint16_t, float, bf16)
PYFLOWMAP_ROWS(double, double, f64)
#undef PYFLOWMAP_ROWS

PYFLOWMAP_INLINE void sq_rows(const Residual<float>& r, double* d, int64_t a, int64_t b, int64_t n) { sq_rows_f32(r, d, a, b, n); }
PYFLOWMAP_INLINE void sq_rows(const Residual<uint16_t>& r, double* d, int64_t a, int64_t b, int64_t n) { sq_rows_bf16(r, d, a, b, n); }
PYFLOWMAP_INLINE void sq_rows(const Residual<double>& r, double* d, int64_t a, int64_t b, int64_t n) { sq_rows_f64(r, d, a, b, n); }
PYFLOWMAP_INLINE void grad_rows(const Residual<float>& r, const float* c, float* o, int64_t a, int64_t b, int64_t n) { grad_rows_f32(r, c, o, a, b, n); }
PYFLOWMAP_INLINE void grad_rows(const Residual<uint16_t>& r, const float* c, uint16_t* o, int64_t a, int64_t b, int64_t n) { grad_rows_bf16(r, c, o, a, b, n); }
PYFLOWMAP_INLINE void grad_rows(const Residual<double>& r, const double* c, double* o, int64_t a, int64_t b, int64_t n) { grad_rows_f64(r, c, o, a, b, n); }

template <typename T>
Residual<typename Raw<T>::R> raw(const Residual<T>& r) {
  using R = typename Raw<T>::R;
  return {reinterpret_cast<const R*>(r.pred), reinterpret_cast<const R*>(r.minus),
          reinterpret_cast<const R*>(r.target), r.scale};
}

}  // namespace

template <typename T, typename Acc>
double forward_cpu(const Residual<T>& res_in, const Acc* weight, Acc* m, int64_t batch, int64_t inner,
                   Metric metric, double c) {
  const auto res = raw(res_in);
  // Fixed blocks of rows, each summed in order, then the block sums in order: the same result
  // whatever the thread count, with the metric and the weighting fused in.
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
        sq_rows(res, d, r0, r1, inner);
        for (int64_t r = r0; r < r1; ++r) {
          const double di = d[r - r0];
          const double mi = metric == Metric::kL2Sq ? di : std::sqrt(di + c * c) - c;
          m[r] = narrow<Acc>(mi);
          acc += (weight ? static_cast<double>(weight[r]) : 1.0) * mi;
        }
      }
      partial[blk] = acc;
    }
  });
  double total = 0.0;
  for (double v : partial) total += v;
  return total / static_cast<double>(batch);
}

template <typename T, typename Acc>
void backward_cpu(const Residual<T>& res_in, const Acc* weight, const Acc* m, double g_loss, const Acc* g_m,
                  Acc* coef, T* dpred, int64_t batch, int64_t inner, Metric metric, double c) {
  // coef_i = (g_loss w_i / B + g_m_i) m'(d_i) 2 in double: B values, a plain serial loop (not an
  // ISA clone, whose FMA contraction would change the rounding).
  const double g0 = g_loss / static_cast<double>(batch);
  for (int64_t i = 0; i < batch; ++i) {
    const double outer = g0 * (weight ? static_cast<double>(weight[i]) : 1.0) + (g_m ? g_m[i] : 0.0);
    // m'(d): 1 for l2sq; 1 / (2 sqrt(d + c^2)) = 1 / (2 (m + c)) for pseudo-Huber, with the
    // subgradient 0 at the kink d = 0 of the plain L2 norm (c = 0).
    const double denom = static_cast<double>(m[i]) + c;
    const double mprime = metric == Metric::kL2Sq ? 1.0 : (denom > 0 ? 0.5 / denom : 0.0);
    coef[i] = narrow<Acc>(2.0 * outer * mprime);
  }
  const auto res = raw(res_in);
  using R = typename Raw<T>::R;
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(inner, 1));
  at::parallel_for(0, batch, grain, [&](int64_t r0, int64_t r1) {
    grad_rows(res, coef, reinterpret_cast<R*>(dpred), r0, r1, inner);
  });
}

#define PYFLOWMAP_INSTANTIATE(T, Acc)                                                                       \
  template double forward_cpu<T, Acc>(const Residual<T>&, const Acc*, Acc*, int64_t, int64_t, Metric,       \
                                      double);                                                              \
  template void backward_cpu<T, Acc>(const Residual<T>&, const Acc*, const Acc*, double, const Acc*, Acc*, T*, \
                                     int64_t, int64_t, Metric, double);
PYFLOWMAP_INSTANTIATE(float, float)
PYFLOWMAP_INSTANTIATE(double, double)
PYFLOWMAP_INSTANTIATE(c10::BFloat16, float)
#undef PYFLOWMAP_INSTANTIATE

}  // namespace pyflowmap::flowmap_loss
