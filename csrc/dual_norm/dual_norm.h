// Dual normalization (LayerNorm / RMSNorm / GroupNorm) on stacked [x; x_dot], forward and the
// closed-form backward through both halves. One "row" is one normalized group of L elements;
// rows [0, R) are primal and row r pairs with tangent row r + R. An element j of a row of
// group g has channel g * cpg + j / spatial (LayerNorm/RMSNorm: spatial = 1, cpg = L).
//
// Forward per row (center: LayerNorm/GroupNorm; otherwise RMSNorm, mean = 0):
//   xhat = (x - mean) rstd,  a = mean(x_dot) (0 if !center),  b = mean(xhat x_dot)
//   y = xhat w + beta,  y_dot = rstd (x_dot - a - xhat b) w
// Backward with u = g_y w, v = g_ydot w, Q = sum(v xhat), P = sum(v xhat_dot):
//   g_xdot = rstd (v - mean(v) - xhat mean(xhat v))
//   h = -rstd (Q x_dot / L + b v)
//   g_x = rstd (u - mean(u) - xhat mean(xhat u)) + rstd (h - mean(h) - xhat mean(h xhat)) - P rstd xhat / L
//   (the mean(.) terms without xhat vanish when !center), g_w = sum g_y xhat + g_ydot xhat_dot,
//   g_beta = sum g_y.
#pragma once

#include <cstdint>

struct CUstream_st;  // cudaStream_t without cuda_runtime.h

namespace pyflowmap::dual_norm {

struct Shape {
  int64_t rows;      // primal rows R (the tensor holds 2R rows)
  int64_t len;       // elements per row L
  int64_t groups;    // groups per sample (row r belongs to group r % groups)
  int64_t spatial;   // consecutive elements sharing a channel (1 for LayerNorm / RMSNorm)
  int64_t channels;  // affine parameters
  bool center;
  double eps;
};

template <typename T>
void forward_cpu(const T* xx, const T* weight, const T* bias, T* yy, double* mean, double* rstd, const Shape& s);

// Per-row mean / rstd are kept in double whatever T: the backward's cancellations need them
// unrounded (float statistics made LayerNorm gradients ~10x less accurate on short rows).
// gw / gb may be null (no affine / not needed); they are written, not accumulated.
template <typename T>
void backward_cpu(const T* gyy, const T* xx, const T* weight, const double* mean, const double* rstd, T* gxx,
                  T* gw, T* gb, const Shape& s);

// CUDA launchers (T: float, double, __half, __nv_bfloat16; statistics in double). The
// backward needs scratch: `row_ab` (2 R doubles: each row's a and b) and `partial`
// (partial_chunks() x channels doubles, per-chunk affine sums, reduced in a fixed order).
int64_t partial_chunks(const Shape& s);

template <typename T>
int forward_cuda(const T* xx, const T* weight, const T* bias, T* yy, double* mean, double* rstd, const Shape& s,
                 CUstream_st* stream);

template <typename T>
int backward_cuda(const T* gyy, const T* xx, const T* weight, const double* mean, const double* rstd, T* gxx,
                  T* gw, T* gb, double* row_ab, double* partial, const Shape& s, CUstream_st* stream);

}  // namespace pyflowmap::dual_norm
