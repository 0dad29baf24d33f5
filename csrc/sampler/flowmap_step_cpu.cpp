// CPU kernel of the flow-map step out = x + (t - s) v, parallel with at::parallel_for; three
// loop shapes by how the times are laid out (see each branch).
#include "sampler/flowmap_step.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

namespace pyflowmap::sampler {

namespace {
constexpr int64_t kGrain = 1 << 15;  // elements per task: below this, threading costs more than it saves
constexpr int64_t kShortRow = 8;

template <int64_t N, typename T, typename TimeT>
inline void short_rows(const T* __restrict__ x, const T* __restrict__ v, const TimeT* __restrict__ s,
                       const TimeT* __restrict__ t, T* __restrict__ out, int64_t r0, int64_t r1,
                       int64_t s_stride, int64_t t_stride) {
  for (int64_t row = r0; row < r1; ++row) {
    const TimeT dt = t[row * t_stride] - s[row * s_stride];
    const int64_t base = row * N;
#pragma GCC unroll 8
    for (int64_t k = 0; k < N; ++k) {
      out[base + k] = static_cast<T>(static_cast<TimeT>(x[base + k]) + dt * static_cast<TimeT>(v[base + k]));
    }
  }
}
}  // namespace

template <typename T, typename TimeT>
void forward_cpu(const T* __restrict__ x, const T* __restrict__ v, const TimeT* __restrict__ s,
                      const TimeT* __restrict__ t, T* __restrict__ out, int64_t batch, int64_t inner,
                      int64_t s_stride, int64_t t_stride) {
  // out is freshly allocated by the glue, so it never aliases an input.
  const int64_t numel = batch * inner;
  if (numel == 0) return;
  if (s_stride == 0 && t_stride == 0) {
    // One time pair for the whole batch (what the samplers pass): a flat, fully vectorized FMA.
    const TimeT dt = t[0] - s[0];
    at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
#pragma omp simd
      for (int64_t j = begin; j < end; ++j) {
        out[j] = static_cast<T>(static_cast<TimeT>(x[j]) + dt * static_cast<TimeT>(v[j]));
      }
    });
    return;
  }
  if (inner <= kShortRow) {
    // Per-sample times on short rows (2D data): whole rows per task, the row length a
    // compile-time constant so the inner loop fully unrolls (a runtime-length vector loop is
    // all prologue and epilogue at length 2: 4x slower, measured).
    at::parallel_for(0, batch, std::max<int64_t>(1, kGrain / inner), [&](int64_t r0, int64_t r1) {
      switch (inner) {
#define PYFLOWMAP_ROWS(N) \
  case N:                 \
    return short_rows<N>(x, v, s, t, out, r0, r1, s_stride, t_stride);
        PYFLOWMAP_ROWS(1) PYFLOWMAP_ROWS(2) PYFLOWMAP_ROWS(3) PYFLOWMAP_ROWS(4)
        PYFLOWMAP_ROWS(5) PYFLOWMAP_ROWS(6) PYFLOWMAP_ROWS(7) PYFLOWMAP_ROWS(8)
#undef PYFLOWMAP_ROWS
      }
    });
    return;
  }
  // Per-sample times on long rows: split the flat range (batch 1 with a large image still uses
  // every core) and walk it row segment by row segment.
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
    int64_t row = begin / inner;
    int64_t i = begin;
    while (i < end) {
      const int64_t row_end = std::min(end, (row + 1) * inner);
      const TimeT dt = t[row * t_stride] - s[row * s_stride];
#pragma omp simd
      for (int64_t j = i; j < row_end; ++j) {
        out[j] = static_cast<T>(static_cast<TimeT>(x[j]) + dt * static_cast<TimeT>(v[j]));
      }
      i = row_end;
      ++row;
    }
  });
}

#define PYFLOWMAP_INSTANTIATE(T, TimeT)                                                        \
  template void forward_cpu<T, TimeT>(const T*, const T*, const TimeT*, const TimeT*, T*, int64_t, int64_t, \
                                      int64_t, int64_t);
PYFLOWMAP_INSTANTIATE(float, float)
PYFLOWMAP_INSTANTIATE(double, double)
PYFLOWMAP_INSTANTIATE(c10::BFloat16, float)
PYFLOWMAP_INSTANTIATE(c10::Half, float)
#undef PYFLOWMAP_INSTANTIATE

}  // namespace pyflowmap::sampler
