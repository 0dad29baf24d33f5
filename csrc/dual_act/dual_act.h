// Dual activations on stacked [z; z_dot]: y = a(z), y_dot = a'(z) z_dot, and the backward
// g_z = a'(z) g_y + a''(z) z_dot g_ydot, g_zdot = a'(z) g_ydot. Raw-pointer launchers.
#pragma once

#include <cstdint>

struct CUstream_st;  // cudaStream_t without cuda_runtime.h

namespace pyflowmap::dual_act {

enum class Kind : int { kGelu = 0, kSilu = 1 };

// z, z_dot: n elements each (the two halves of one stacked tensor); y, y_dot likewise.
template <typename T>
void forward_cpu(const T* z, const T* z_dot, T* y, T* y_dot, int64_t n, Kind kind);

template <typename T>
void backward_cpu(const T* g_y, const T* g_ydot, const T* z, const T* z_dot, T* g_z, T* g_zdot,
                  int64_t n, Kind kind);

// CUDA launchers: T is float, double, __half or __nv_bfloat16 (float math, double for double).
// Return the cudaError_t of the launch; no sync, no allocation (CUDA-graph safe).
template <typename T>
int forward_cuda(const T* z, const T* z_dot, T* y, T* y_dot, int64_t n, Kind kind, CUstream_st* stream);

template <typename T>
int backward_cuda(const T* g_y, const T* g_ydot, const T* z, const T* z_dot, T* g_z, T* g_zdot, int64_t n,
                  Kind kind, CUstream_st* stream);

}  // namespace pyflowmap::dual_act
