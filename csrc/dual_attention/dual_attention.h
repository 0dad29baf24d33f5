// JVP attention: shapes shared by the torch glue and the plain-CUDA kernels (no torch here).
//
// Math (docs/tangents.md section 8), per query row i over visible keys j:
//   S = c Q K^T, P = softmax(S), O = P V
//   S_dot = c (Q_dot K^T + Q K_dot^T), mu = sum_j P S_dot, O_dot = (P * S_dot) V + P V_dot - mu O
// Row statistics kept for the backward: lse = m + log(l) and mu. A row that sees no key
// (causal cross-attention with more queries than keys, or no keys at all) gives O = O_dot = 0,
// lse = -inf, mu = 0.
// Backward with g = dL/dO, gd = dL/dO_dot. O_dot_i = sum_j P_ij ((S_dot_ij - mu_i) V_j + V_dot_j)
// depends on P directly and through mu_i, with dL/dmu_i = -gd_i . O_i = -dd_i; the softmax
// backward dS = P (dP - rowsum(P dP)) then needs rowsum(P dP) = g . O + gd . O_dot - dd mu = D:
//   dd = gd . O, D = g . O + gd . O_dot - dd mu                       (per row)
//   A = gd V^T, dP = g V^T + (S_dot - mu) A + gd V_dot^T - dd S_dot
//   dS = P (dP - D), dS_dot = P (A - dd)
//   dV = P^T g + (P (S_dot - mu))^T gd, dV_dot = P^T gd
//   dQ = c (dS K + dS_dot K_dot), dK = c (dS^T Q + dS_dot^T Q_dot)
//   dQ_dot = c dS_dot K, dK_dot = c dS_dot^T Q
// Causal masks are aligned bottom-right: key j is visible to query i iff j <= i + (Nk - Nq).
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#include <cuda_runtime.h>
#else
struct CUstream_st;
typedef CUstream_st* cudaStream_t;
#endif

namespace pyflowmap::dual_attention {

// Strides in elements; the head dim is always contiguous (stride 1).
struct Strides {
  int64_t b, h, n;
};

struct Problem {
  int batch, heads, nq, nk, dim;
  bool causal;
  float scale;
  // which tangents are present (absent ones are zero)
  bool has_q_dot, has_k_dot, has_v_dot;
};

// Inputs in the order q, k, v, q_dot, k_dot, v_dot (absent tangents: nullptr), each with its own
// strides; row starts must be 16-byte aligned (the glue copies inputs that are not).
template <typename T>
struct Inputs {
  const T* ptr[6];
  Strides stride[6];
};

// Forward + tangent for float16 / bfloat16 (T = __half or __nv_bfloat16), head dim 64 or 128.
// o / o_dot are [B, H, Nq, D] contiguous, lse / mu [B, H, Nq] float32. Returns a cudaError_t.
template <typename T>
int forward_cuda(const Inputs<T>& in, T* o, T* o_dot, float* lse, float* mu, const Problem& p, cudaStream_t stream);

// Backward. grad_o_dot == nullptr selects the primal-only path (a loss on O alone: 5 matmuls
// per tile, a standard flash backward). grad_o, grad_o_dot, o, o_dot are contiguous
// [B, H, Nq, D]; `scratch` holds 3 * B * H * Nq floats. dq / dq_dot are float32 [B, H, Nq, D]
// accumulators zeroed by the caller (every key block adds its share with atomics, so their
// summation order varies from run to run); dk, dv, dk_dot, dv_dot are written directly as T
// (nullptr for absent tangents).
template <typename T>
int backward_cuda(const Inputs<T>& in, const T* grad_o, const T* grad_o_dot, const T* o, const T* o_dot,
                  const float* lse, const float* mu, float* scratch, float* dq, float* dq_dot, T* dk, T* dv,
                  T* dk_dot, T* dv_dot, const Problem& p, cudaStream_t stream);

}  // namespace pyflowmap::dual_attention
