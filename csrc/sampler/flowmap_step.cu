// CUDA kernel of the flow-map step out = x + (t - s) * v. Plain CUDA (no torch headers) so that
// nvcc compile-checks it on machines whose torch has no CUDA headers.
#include "sampler/flowmap_step.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace pyflowmap::sampler {
namespace {

__device__ __forceinline__ float to_acc(float a) { return a; }
__device__ __forceinline__ double to_acc(double a) { return a; }
__device__ __forceinline__ float to_acc(__half a) { return __half2float(a); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 a) { return __bfloat162float(a); }

template <typename T> __device__ __forceinline__ T from_acc(float a);
template <> __device__ __forceinline__ float from_acc<float>(float a) { return a; }
template <> __device__ __forceinline__ __half from_acc<__half>(float a) { return __float2half_rn(a); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float a) {
  return __float2bfloat16_rn(a);
}
template <typename T> __device__ __forceinline__ T from_acc(double a) { return a; }

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Each thread handles VEC consecutive elements of one row (inner % VEC == 0 is guaranteed by
// the launcher), so one 16-byte load per operand and one time lookup per pack.
template <typename T, typename TimeT, int VEC>
__global__ void __launch_bounds__(256) flowmap_step_kernel(
    const T* __restrict__ x, const T* __restrict__ v, const TimeT* __restrict__ s,
    const TimeT* __restrict__ t, T* __restrict__ out, int64_t n_packs, int64_t packs_per_row,
    int64_t s_stride, int64_t t_stride) {
  using P = Pack<T, VEC>;
  const P* xp = reinterpret_cast<const P*>(x);
  const P* vp = reinterpret_cast<const P*>(v);
  P* op = reinterpret_cast<P*>(out);
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n_packs;
       i += step) {
    const int64_t row = i / packs_per_row;
    const TimeT dt = t[row * t_stride] - s[row * s_stride];
    const P a = xp[i];
    const P b = vp[i];
    P r;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      r.v[k] = from_acc<T>(to_acc(a.v[k]) + dt * to_acc(b.v[k]));
    }
    op[i] = r;
  }
}

template <typename T, typename TimeT, int VEC>
cudaError_t launch(const T* x, const T* v, const TimeT* s, const TimeT* t, T* out, int64_t batch,
                   int64_t inner, int64_t s_stride, int64_t t_stride, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t n_packs = batch * inner / VEC;
  // Grid-stride loop: cap the grid, each thread then walks several packs.
  const int64_t blocks = (n_packs + kThreads - 1) / kThreads;
  const unsigned grid = static_cast<unsigned>(blocks < 65536 ? blocks : 65536);
  flowmap_step_kernel<T, TimeT, VEC><<<grid, kThreads, 0, stream>>>(
      x, v, s, t, out, n_packs, inner / VEC, s_stride, t_stride);
  return cudaGetLastError();
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace

template <typename T, typename TimeT>
int forward_cuda(const T* x, const T* v, const TimeT* s, const TimeT* t, T* out, int64_t batch, int64_t inner,
                 int64_t s_stride, int64_t t_stride, CUstream_st* stream) {
  if (batch == 0 || inner == 0) return static_cast<int>(cudaSuccess);
  constexpr int kVec = 16 / sizeof(T);
  if (inner % kVec == 0 && aligned16(x) && aligned16(v) && aligned16(out)) {
    return static_cast<int>(launch<T, TimeT, kVec>(x, v, s, t, out, batch, inner, s_stride,
                                                  t_stride, stream));
  }
  return static_cast<int>(
      launch<T, TimeT, 1>(x, v, s, t, out, batch, inner, s_stride, t_stride, stream));
}

#define PYFLOWMAP_INSTANTIATE(T, TimeT)                                                          \
  template int forward_cuda<T, TimeT>(const T*, const T*, const TimeT*, const TimeT*, T*, int64_t, int64_t, \
                                      int64_t, int64_t, CUstream_st*);
PYFLOWMAP_INSTANTIATE(float, float)
PYFLOWMAP_INSTANTIATE(double, double)
PYFLOWMAP_INSTANTIATE(__half, float)
PYFLOWMAP_INSTANTIATE(__nv_bfloat16, float)
#undef PYFLOWMAP_INSTANTIATE

}  // namespace pyflowmap::sampler
