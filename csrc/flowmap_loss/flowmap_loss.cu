// CUDA kernels of the fused flow-map losses (math in flowmap_loss.h). Short rows (2D data) get
// one thread per row; longer rows one block per row. Per-row sums accumulate in double; the
// batch mean is one fixed-order block reduction, so results are deterministic.
#include "common/cuda_types.cuh"
#include "flowmap_loss/flowmap_loss.h"

namespace pyflowmap::flowmap_loss {
namespace {

using pyflowmap::cuda::block_sum;
using pyflowmap::cuda::from_acc;
using pyflowmap::cuda::to_acc;

constexpr int kShortRow = 16;
constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ double residual(const T* __restrict__ p, const T* __restrict__ mi,
                                           const T* __restrict__ q, double scale, int64_t j) {
  double a = static_cast<double>(to_acc(p[j]));
  if (mi) a -= static_cast<double>(to_acc(mi[j]));
  a *= scale;
  if (q) a -= static_cast<double>(to_acc(q[j]));
  return a;
}

__device__ __forceinline__ double metric_of(double d, int metric, double c) {
  return metric == static_cast<int>(Metric::kL2Sq) ? d : sqrt(d + c * c) - c;
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads) rows_short(Residual<T> res, Acc* __restrict__ m, int64_t batch,
                                                       int64_t inner, int metric, double c) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < batch; r += step) {
    const int64_t o = r * inner;
    double d = 0.0;
    for (int64_t j = 0; j < inner; ++j) {
      const double v = residual(res.pred + o, res.minus ? res.minus + o : nullptr,
                                res.target ? res.target + o : nullptr, res.scale, j);
      d += v * v;
    }
    m[r] = static_cast<Acc>(metric_of(d, metric, c));
  }
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads) rows_long(Residual<T> res, Acc* __restrict__ m, int64_t inner,
                                                      int metric, double c) {
  __shared__ double scratch[32];
  const int64_t o = static_cast<int64_t>(blockIdx.x) * inner;
  double d = 0.0;
  for (int64_t j = threadIdx.x; j < inner; j += blockDim.x) {
    const double v = residual(res.pred + o, res.minus ? res.minus + o : nullptr,
                              res.target ? res.target + o : nullptr, res.scale, j);
    d += v * v;
  }
  d = block_sum(d, scratch);
  if (threadIdx.x == 0) m[blockIdx.x] = static_cast<Acc>(metric_of(d, metric, c));
}

// loss = mean_i w_i m_i with one block: fixed order, deterministic.
template <typename Acc>
__global__ void __launch_bounds__(1024) batch_mean(const Acc* __restrict__ m, const Acc* __restrict__ w,
                                                   Acc* __restrict__ loss, int64_t batch) {
  __shared__ double scratch[32];
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < batch; i += blockDim.x) acc += (w ? static_cast<double>(w[i]) : 1.0) * m[i];
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) loss[0] = static_cast<Acc>(acc / static_cast<double>(batch));
}

// coef_i = (g_loss w_i / B + g_m_i) m'(d_i) 2, with m'(d) = 1 / (2 (m + c)) for pseudo-Huber
// (subgradient 0 at the kink of the plain L2 norm).
template <typename Acc>
__global__ void __launch_bounds__(kThreads) coefficients(const Acc* __restrict__ m, const Acc* __restrict__ w,
                                                         const Acc* __restrict__ g_loss, const Acc* __restrict__ g_m,
                                                         Acc* __restrict__ coef, int64_t batch, int metric, double c) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= batch) return;
  const double outer = static_cast<double>(g_loss[0]) / static_cast<double>(batch) * (w ? static_cast<double>(w[i]) : 1.0) +
                       (g_m ? static_cast<double>(g_m[i]) : 0.0);
  const double denom = static_cast<double>(m[i]) + c;
  const double mprime = metric == static_cast<int>(Metric::kL2Sq) ? 1.0 : (denom > 0 ? 0.5 / denom : 0.0);
  coef[i] = static_cast<Acc>(2.0 * outer * mprime);
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads) gradient(Residual<T> res, const Acc* __restrict__ coef,
                                                     T* __restrict__ dpred, int64_t numel, int64_t inner) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += step) {
    const int64_t r = i / inner;
    const double v = residual(res.pred, res.minus, res.target, res.scale, i);
    dpred[i] = from_acc<T>(static_cast<double>(coef[r]) * res.scale * v);
  }
}

}  // namespace

template <typename T, typename Acc>
int forward_cuda(const Residual<T>& res, const Acc* weight, Acc* m, Acc* loss, int64_t batch, int64_t inner,
                 Metric metric, double c, CUstream_st* stream) {
  if (batch == 0) return 0;
  if (inner <= kShortRow) {
    rows_short<T, Acc><<<pyflowmap::cuda::grid_for(batch, kThreads), kThreads, 0, stream>>>(
        res, m, batch, inner, static_cast<int>(metric), c);
  } else {
    rows_long<T, Acc><<<static_cast<unsigned>(batch), kThreads, 0, stream>>>(res, m, inner, static_cast<int>(metric), c);
  }
  batch_mean<Acc><<<1, 1024, 0, stream>>>(m, weight, loss, batch);
  return static_cast<int>(cudaGetLastError());
}

template <typename T, typename Acc>
int backward_cuda(const Residual<T>& res, const Acc* weight, const Acc* m, const Acc* g_loss, const Acc* g_m,
                  Acc* coef, T* dpred, int64_t batch, int64_t inner, Metric metric, double c, CUstream_st* stream) {
  if (batch == 0) return 0;
  coefficients<Acc><<<pyflowmap::cuda::grid_for(batch, kThreads, 1 << 30), kThreads, 0, stream>>>(
      m, weight, g_loss, g_m, coef, batch, static_cast<int>(metric), c);
  gradient<T, Acc><<<pyflowmap::cuda::grid_for(batch * inner, kThreads), kThreads, 0, stream>>>(
      res, coef, dpred, batch * inner, inner);
  return static_cast<int>(cudaGetLastError());
}

#define PYFLOWMAP_INSTANTIATE(T, Acc)                                                                      \
  template int forward_cuda<T, Acc>(const Residual<T>&, const Acc*, Acc*, Acc*, int64_t, int64_t, Metric,  \
                                    double, CUstream_st*);                                                 \
  template int backward_cuda<T, Acc>(const Residual<T>&, const Acc*, const Acc*, const Acc*, const Acc*,  \
                                     Acc*, T*, int64_t, int64_t, Metric, double, CUstream_st*);
PYFLOWMAP_INSTANTIATE(float, float)
PYFLOWMAP_INSTANTIATE(double, double)
PYFLOWMAP_INSTANTIATE(__half, float)
PYFLOWMAP_INSTANTIATE(__nv_bfloat16, float)
#undef PYFLOWMAP_INSTANTIATE

}  // namespace pyflowmap::flowmap_loss
