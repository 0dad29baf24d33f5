// CUDA kernels of the dual activations (see dual_act.h for the math). Plain CUDA: nvcc
// compile-checks this file on machines without torch's CUDA headers.
#include "common/cuda_types.cuh"
#include "dual_act/dual_act.h"

namespace pyflowmap::dual_act {
namespace {

using pyflowmap::cuda::from_acc;
using pyflowmap::cuda::to_acc;

// Explicit single/double precision math (no silent promotion of float to double).
__device__ __forceinline__ float ncdf(float z) { return normcdff(z); }
__device__ __forceinline__ double ncdf(double z) { return normcdf(z); }
__device__ __forceinline__ float ex(float z) { return expf(z); }
__device__ __forceinline__ double ex(double z) { return exp(z); }

template <typename F>
__device__ __forceinline__ void derivs(F z, int kind, F& a, F& d1, F& d2) {
  if (kind == static_cast<int>(Kind::kGelu)) {
    const F cdf = ncdf(z);
    const F pdf = F(0.39894228040143268) * ex(F(-0.5) * z * z);
    a = z * cdf;
    d1 = cdf + z * pdf;
    d2 = pdf * (F(2) - z * z);
  } else {
    const F s = F(1) / (F(1) + ex(-z));
    a = z * s;
    d1 = s * (F(1) + z * (F(1) - s));
    d2 = s * (F(1) - s) * (F(2) + z * (F(1) - F(2) * s));
  }
}

template <typename T>
__global__ void __launch_bounds__(256) forward_kernel(const T* __restrict__ z, const T* __restrict__ zd,
                                                     T* __restrict__ y, T* __restrict__ yd, int64_t n, int kind) {
  using F = typename pyflowmap::cuda::Acc<T>::type;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    F a, d1, d2;
    derivs<F>(to_acc(z[i]), kind, a, d1, d2);
    y[i] = from_acc<T>(a);
    yd[i] = from_acc<T>(d1 * to_acc(zd[i]));
  }
}

template <typename T>
__global__ void __launch_bounds__(256) backward_kernel(const T* __restrict__ gy, const T* __restrict__ gyd,
                                                      const T* __restrict__ z, const T* __restrict__ zd,
                                                      T* __restrict__ gz, T* __restrict__ gzd, int64_t n, int kind) {
  using F = typename pyflowmap::cuda::Acc<T>::type;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    F a, d1, d2;
    derivs<F>(to_acc(z[i]), kind, a, d1, d2);
    const F g_ydot = to_acc(gyd[i]);
    gz[i] = from_acc<T>(d1 * to_acc(gy[i]) + d2 * to_acc(zd[i]) * g_ydot);
    gzd[i] = from_acc<T>(d1 * g_ydot);
  }
}

}  // namespace

template <typename T>
int forward_cuda(const T* z, const T* z_dot, T* y, T* y_dot, int64_t n, Kind kind, CUstream_st* stream) {
  if (n == 0) return 0;
  forward_kernel<T><<<pyflowmap::cuda::grid_for(n, 256), 256, 0, stream>>>(z, z_dot, y, y_dot, n, static_cast<int>(kind));
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int backward_cuda(const T* g_y, const T* g_ydot, const T* z, const T* z_dot, T* g_z, T* g_zdot, int64_t n,
                  Kind kind, CUstream_st* stream) {
  if (n == 0) return 0;
  backward_kernel<T><<<pyflowmap::cuda::grid_for(n, 256), 256, 0, stream>>>(g_y, g_ydot, z, z_dot, g_z, g_zdot, n,
                                                                            static_cast<int>(kind));
  return static_cast<int>(cudaGetLastError());
}

#define PYFLOWMAP_INSTANTIATE(T)                                                                     \
  template int forward_cuda<T>(const T*, const T*, T*, T*, int64_t, Kind, CUstream_st*);             \
  template int backward_cuda<T>(const T*, const T*, const T*, const T*, T*, T*, int64_t, Kind, CUstream_st*);
PYFLOWMAP_INSTANTIATE(float)
PYFLOWMAP_INSTANTIATE(double)
PYFLOWMAP_INSTANTIATE(__half)
PYFLOWMAP_INSTANTIATE(__nv_bfloat16)
#undef PYFLOWMAP_INSTANTIATE

}  // namespace pyflowmap::dual_act
