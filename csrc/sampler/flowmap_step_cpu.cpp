// CPU kernel of the flow-map step. Parallel over flat element ranges so that batch 1 with a
// large image still uses every core; the inner row loop is a plain FMA the compiler vectorizes.
#include "sampler/flowmap_step.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

namespace pyflowmap::sampler {

namespace {
constexpr int64_t kGrain = 1 << 15;  // elements per task: below this, threading costs more than it saves
}

template <typename T, typename TimeT>
void flowmap_step_cpu(const T* x, const T* v, const TimeT* s, const TimeT* t, T* out,
                      int64_t batch, int64_t inner, int64_t s_stride, int64_t t_stride) {
  const int64_t numel = batch * inner;
  if (numel == 0) return;
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
  template void flowmap_step_cpu<T, TimeT>(const T*, const T*, const TimeT*, const TimeT*, T*, \
                                           int64_t, int64_t, int64_t, int64_t);
PYFLOWMAP_INSTANTIATE(float, float)
PYFLOWMAP_INSTANTIATE(double, double)
PYFLOWMAP_INSTANTIATE(c10::BFloat16, float)
PYFLOWMAP_INSTANTIATE(c10::Half, float)
#undef PYFLOWMAP_INSTANTIATE

}  // namespace pyflowmap::sampler
