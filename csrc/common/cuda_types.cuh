// Shared device helpers of the plain-CUDA kernels: conversions to the float32 (float64)
// compute type and back, and deterministic block reductions. No torch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace pyflowmap::cuda {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float to_acc(float a) { return a; }
__device__ __forceinline__ double to_acc(double a) { return a; }
__device__ __forceinline__ float to_acc(__half a) { return __half2float(a); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 a) { return __bfloat162float(a); }

template <typename T> __device__ __forceinline__ T from_acc(double a);
template <> __device__ __forceinline__ float from_acc<float>(double a) { return static_cast<float>(a); }
template <> __device__ __forceinline__ double from_acc<double>(double a) { return a; }
template <> __device__ __forceinline__ __half from_acc<__half>(double a) { return __float2half_rn(static_cast<float>(a)); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(double a) {
  return __float2bfloat16_rn(static_cast<float>(a));
}

// Sum over the block of `v` (blockDim.x a multiple of 32, <= 1024); every thread gets the
// total. Fixed tree order: the same result on every run. `scratch` holds 32 doubles.
__device__ __forceinline__ double block_sum(double v, double* scratch) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const int nwarps = (blockDim.x + 31) >> 5;
  v = threadIdx.x < nwarps ? scratch[threadIdx.x] : 0.0;
  if (warp == 0) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    if (lane == 0) scratch[0] = v;
  }
  __syncthreads();
  return scratch[0];
}

inline unsigned grid_for(int64_t work, int threads, int64_t cap = 65536) {
  const int64_t blocks = (work + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks < cap ? blocks : cap));
}

}  // namespace pyflowmap::cuda
