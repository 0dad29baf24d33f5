// Flow-map step  out = x + (t - s) * v : the update every flow-map and ODE sampler applies.
// Launchers take raw pointers so that the CUDA side compiles without torch headers.
#pragma once

#include <cstdint>

struct CUstream_st;  // cudaStream_t without including cuda_runtime.h

namespace pyflowmap::sampler {

// x, v, out: [batch, inner] contiguous. s, t: one time per row, read at s[b * s_stride]
// (s_stride 0 broadcasts a single time). Element-wise math runs in TimeT. T is float, double,
// c10::BFloat16 or c10::Half (TimeT float, or double for double).
template <typename T, typename TimeT>
void forward_cpu(const T* x, const T* v, const TimeT* s, const TimeT* t, T* out, int64_t batch, int64_t inner,
                 int64_t s_stride, int64_t t_stride);

// T is float, double, __half or __nv_bfloat16 (TimeT float, or double for double). Launches on
// `stream` and returns the cudaError_t of the launch as an int; no sync, no allocation, so the
// call is legal inside CUDA-graph capture.
template <typename T, typename TimeT>
int forward_cuda(const T* x, const T* v, const TimeT* s, const TimeT* t, T* out, int64_t batch, int64_t inner,
                 int64_t s_stride, int64_t t_stride, CUstream_st* stream);

}  // namespace pyflowmap::sampler
