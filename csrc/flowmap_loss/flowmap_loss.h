// Fused flow-map losses: per-sample metric of a residual, weighting, mean, and the
// closed-form gradient, each in one pass over the rows. Raw-pointer launchers.
//
//   r_ij = (pred_ij - minus_ij) * scale - target_ij   (minus, target may be absent = 0)
//     plain loss:            minus absent, scale = 1      ->  r = pred - target
//     central difference:    pred = f(p + h d), minus = f(p - h d), scale = 1 / 2h
//   d_i = sum_j r_ij^2                                      (accumulated in double)
//   m_i = d_i (l2sq)   or   sqrt(d_i + c^2) - c (pseudo_huber)
//   loss = mean_i w_i m_i                                   (w absent = 1)
//   backward: g_i = (g_loss w_i / B + g_m_i) m'(d_i) 2;  dpred_ij = g_i r_ij scale
//             (dminus = -dpred, dtarget = -g_i r_ij = -dpred / scale)
#pragma once

#include <cstdint>

struct CUstream_st;  // cudaStream_t without cuda_runtime.h

namespace pyflowmap::flowmap_loss {

enum class Metric : int { kL2Sq = 0, kPseudoHuber = 1 };

template <typename T>
struct Residual {
  const T* pred;
  const T* minus;   // may be null
  const T* target;  // may be null
  double scale;
};

// CPU launchers (T: float, double, c10::BFloat16; Acc float, double for double). Forward
// writes m[B] and returns the loss mean_i w_i m_i in double, summed in a fixed order
// (deterministic whatever the thread count). Backward computes coef_i (B values of scratch)
// from g_loss (read in double) and g_m, then dpred; the CUDA launchers below mirror both.
template <typename T, typename Acc>
double forward_cpu(const Residual<T>& res, const Acc* weight, Acc* m, int64_t batch, int64_t inner,
                   Metric metric, double c);

template <typename T, typename Acc>
void backward_cpu(const Residual<T>& res, const Acc* weight, const Acc* m, double g_loss, const Acc* g_m,
                  Acc* coef, T* dpred, int64_t batch, int64_t inner, Metric metric, double c);

// CUDA launchers (T: float, double, __half, __nv_bfloat16; Acc float, double for double).
// Forward writes m[B] and loss[0] = mean_i w_i m_i (a fixed-order block reduction:
// deterministic). Backward computes coef_i from g_loss (a device scalar) and g_m, then dpred.
// No sync, no allocation: CUDA-graph safe.
template <typename T, typename Acc>
int forward_cuda(const Residual<T>& res, const Acc* weight, Acc* m, Acc* loss, int64_t batch, int64_t inner,
                 Metric metric, double c, CUstream_st* stream);

template <typename T, typename Acc>
int backward_cuda(const Residual<T>& res, const Acc* weight, const Acc* m, const Acc* g_loss, const Acc* g_m,
                  Acc* coef, T* dpred, int64_t batch, int64_t inner, Metric metric, double c, CUstream_st* stream);

}  // namespace pyflowmap::flowmap_loss
