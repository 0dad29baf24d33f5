// Fused flow-map loss: per-sample metric of the residual pred - target, weighting, mean, and
// the closed-form gradient, each in one pass over the rows. Raw-pointer launchers.
//
//   d_i = sum_j (pred_ij - target_ij)^2          (target may be absent = 0)
//   m_i = d_i                  (metric l2sq)      m_i = sqrt(d_i + c^2) - c   (pseudo_huber)
//   loss = mean_i w_i m_i                         (w absent = 1)
//   backward: dpred_ij = (g_loss w_i / B + g_m_i) m'(d_i) 2 (pred_ij - target_ij)
#pragma once

#include <cstdint>

namespace pyflowmap::flowmap_loss {

enum class Metric : int { kL2Sq = 0, kPseudoHuber = 1 };

// Acc is float for float/bf16 inputs and double for double; per-row sums are accumulated in
// double either way. Writes m (B values) and returns sum_i w_i m_i.
template <typename T, typename Acc>
double forward_cpu(const T* pred, const T* target, const Acc* weight, Acc* m, int64_t batch,
                   int64_t inner, Metric metric, double c);

// coef_i = (g_loss w_i / B + g_m_i) m'(d_i) 2, computed by the caller's glue from m; then
// dpred_ij = coef_i (pred_ij - target_ij).
template <typename T, typename Acc>
void backward_cpu(const T* pred, const T* target, const Acc* coef, T* dpred, int64_t batch,
                  int64_t inner);

}  // namespace pyflowmap::flowmap_loss
