// Flash-style JVP attention (math in dual_attention.h) for float16 / bfloat16 on sm_80+:
// tensor-core mma.sync m16n8k16 with float32 accumulation, online softmax in registers.
//
// Forward: one thread block (4 warps) per 64 query rows of one (batch, head); each warp owns
// 16 rows and streams 64-key tiles of K, V (and K_dot, V_dot when present) through shared
// memory. Per tile: S = Q K^T and S_dot = Q_dot K^T + Q K_dot^T in registers, the running max
// and the extra accumulators of docs/tangents.md section 8.2 (l, r = sum p S_dot, acc = P V,
// accT = (P * S_dot) V + P V_dot), with P and P * S_dot fed back to the tensor cores straight
// from the accumulator registers (the m16n8 C fragment of two adjacent n-tiles IS the m16k16
// A fragment). Absent tangents skip their matmuls: with K_dot = V_dot = 0 a tile costs 4.
//
// Backward: one thread block per 64 keys (each warp 16 keys), streaming query tiles, so dK,
// dV (pass 1) and dK_dot, dV_dot (pass 2, only when those tangents exist and dL/dO_dot is
// given) accumulate in registers; dQ and dQ_dot are summed over key blocks with float32
// atomics after staging dS and dS_dot through shared memory. Two passes keep the register
// accumulators at two 16 x D tiles per warp. The primal-only path (no dL/dO_dot) is pass 1
// with the tangent terms off: the 5 matmuls of a standard flash backward.
//
// Loads are plain 16-byte vector loads (no cp.async / TMA pipelining yet) and fragments are
// read from padded shared memory rows (row stride D + 8 halves: the 8 row groups x 4 lanes of
// a fragment load hit 32 distinct banks).
#include "common/cuda_types.cuh"
#include "dual_attention/dual_attention.h"

#include <cmath>
#include <cstdint>

namespace pyflowmap::dual_attention {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kBlockQ = 64;  // forward: query rows per block
constexpr int kBlockK = 64;  // backward: keys per block
// forward: keys per tile; 32 at head dim 128 keeps S, S_dot and both 16 x 128 accumulators
// within 255 registers (64 spilled)
template <int D> __host__ __device__ constexpr int fwd_tile() { return D == 128 ? 32 : 64; }
constexpr float kLog2e = 1.4426950408889634f;

// --- tensor-core primitives -------------------------------------------------------------

// The two input types differ only in the PTX type name, which asm needs as a literal.
#define PYFLOWMAP_MMA_M16N8K16(AB)                                                                   \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." AB "." AB ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, " \
               "{%8,%9}, {%0,%1,%2,%3};\n"                                                            \
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                       \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))

template <typename T> struct Mma;
template <> struct Mma<__half> {
  __device__ __forceinline__ static void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    PYFLOWMAP_MMA_M16N8K16("f16");
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
};
template <> struct Mma<__nv_bfloat16> {
  __device__ __forceinline__ static void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    PYFLOWMAP_MMA_M16N8K16("bf16");
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
};
#undef PYFLOWMAP_MMA_M16N8K16

// Two consecutive 16-bit elements (4-byte aligned) as one register.
template <typename T>
__device__ __forceinline__ uint32_t ld_pair(const T* p) { return *reinterpret_cast<const uint32_t*>(p); }
// Two 16-bit elements from anywhere; `lo` lands in the low half (the lower k index).
template <typename T>
__device__ __forceinline__ uint32_t ld_two(const T* lo, const T* hi) {
  return static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(lo)) |
         (static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(hi)) << 16);
}

// Fragment coordinates of lane (g = lane / 4, t = lane % 4) in m16n8k16:
//   A (16 x 16): regs {(g, 2t..2t+1), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..)}
//   B (16 x 8):  regs {(2t..2t+1, g), (2t+8..2t+9, g)}
//   C (16 x 8):  c0, c1 = (g, 2t), (g, 2t+1); c2, c3 = (g+8, 2t), (g+8, 2t+1)

// C[16 x 8 NT] += A[16 x 16 KS] B[16 KS x 8 NT] for one warp, both operands in shared memory.
// A(r, k) = A_T ? a[k * lda + r] : a[r * lda + k];  B(k, n) = B_T ? b[n * ldb + k] : b[k * ldb + n].
template <typename T, int NT, int KS, bool A_T, bool B_T>
__device__ __forceinline__ void warp_gemm(float (&c)[NT][4], const T* a, int lda, const T* b, int ldb) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
    const int k0 = 16 * ks + 2 * t;
    uint32_t af[4];
    if (A_T) {
      af[0] = ld_two(a + k0 * lda + g, a + (k0 + 1) * lda + g);
      af[1] = ld_two(a + k0 * lda + g + 8, a + (k0 + 1) * lda + g + 8);
      af[2] = ld_two(a + (k0 + 8) * lda + g, a + (k0 + 9) * lda + g);
      af[3] = ld_two(a + (k0 + 8) * lda + g + 8, a + (k0 + 9) * lda + g + 8);
    } else {
      af[0] = ld_pair(a + g * lda + k0);
      af[1] = ld_pair(a + (g + 8) * lda + k0);
      af[2] = ld_pair(a + g * lda + k0 + 8);
      af[3] = ld_pair(a + (g + 8) * lda + k0 + 8);
    }
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const int n = 8 * j + g;
      uint32_t b0, b1;
      if (B_T) {
        b0 = ld_pair(b + n * ldb + k0);
        b1 = ld_pair(b + n * ldb + k0 + 8);
      } else {
        b0 = ld_two(b + k0 * ldb + n, b + (k0 + 1) * ldb + n);
        b1 = ld_two(b + (k0 + 8) * ldb + n, b + (k0 + 9) * ldb + n);
      }
      Mma<T>::run(c[j], af, b0, b1);
    }
  }
}

// The 16 x 16 KS accumulator tile `p` (2 KS n-tiles of 8) as KS A fragments, rounded to T.
template <typename T, int KS>
__device__ __forceinline__ void to_a(uint32_t (&a)[KS][4], const float (&p)[2 * KS][4]) {
#pragma unroll
  for (int c = 0; c < KS; ++c) {
    a[c][0] = Mma<T>::pack(p[2 * c][0], p[2 * c][1]);
    a[c][1] = Mma<T>::pack(p[2 * c][2], p[2 * c][3]);
    a[c][2] = Mma<T>::pack(p[2 * c + 1][0], p[2 * c + 1][1]);
    a[c][3] = Mma<T>::pack(p[2 * c + 1][2], p[2 * c + 1][3]);
  }
}

// C[16 x 8 NT] += A B with A from registers (to_a) and B(k, n) = b[k * ldb + n] in shared memory.
template <typename T, int NT, int KS>
__device__ __forceinline__ void warp_gemm_ra(float (&c)[NT][4], const uint32_t (&a)[KS][4], const T* b, int ldb) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
    const int k0 = 16 * ks + 2 * t;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const int n = 8 * j + g;
      Mma<T>::run(c[j], a[ks], ld_two(b + k0 * ldb + n, b + (k0 + 1) * ldb + n),
                  ld_two(b + (k0 + 8) * ldb + n, b + (k0 + 9) * ldb + n));
    }
  }
}

template <int NT>
__device__ __forceinline__ void zero(float (&c)[NT][4]) {
#pragma unroll
  for (int j = 0; j < NT; ++j) c[j][0] = c[j][1] = c[j][2] = c[j][3] = 0.f;
}

// rows [0, rows) of a [rows_valid, D] global tile (row stride `ld` elements) into shared
// memory (row stride D + 8); rows past `rows_valid` become zeros. 16-byte vectors.
template <typename T, int D>
__device__ __forceinline__ void load_tile(T* s, const T* gm, int64_t ld, int rows, int rows_valid) {
  constexpr int kVec = 8, kPerRow = D / kVec, kLd = D + 8;
  for (int c = threadIdx.x; c < rows * kPerRow; c += blockDim.x) {
    const int r = c / kPerRow, col = (c % kPerRow) * kVec;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (r < rows_valid) v = *reinterpret_cast<const uint4*>(gm + r * ld + col);
    *reinterpret_cast<uint4*>(s + r * kLd + col) = v;
  }
}

struct Dev {  // Problem plus derived values, by value into the kernels
  int batch, heads, nq, nk;
  int off;  // Nk - Nq: key j is visible to query i iff j <= i + off (causal)
  bool causal, has_q_dot, has_k_dot, has_v_dot;
  float scale;
};

__host__ Dev dev_of(const Problem& p) {
  return {p.batch, p.heads, p.nq, p.nk, p.nk - p.nq, p.causal, p.has_q_dot, p.has_k_dot, p.has_v_dot, p.scale};
}

template <typename T>
__device__ __forceinline__ const T* at_bh(const T* base, Strides s, int b, int h) {
  return base ? base + b * s.b + h * s.h : nullptr;
}

// --- forward ------------------------------------------------------------------------------

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) forward_kernel(Inputs<T> in, T* __restrict__ o, T* __restrict__ o_dot,
                                                           float* __restrict__ lse, float* __restrict__ mu, Dev p) {
  constexpr int kBn = fwd_tile<D>();
  constexpr int kLd = D + 8, kNtS = kBn / 8, kNtO = D / 8, kKsD = D / 16, kKsN = kBn / 16;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* qs = reinterpret_cast<T*>(smem_raw);
  T* qds = qs + kBlockQ * kLd;
  T* ks = qds + kBlockQ * kLd;
  T* vs = ks + kBn * kLd;
  T* kds = vs + kBn * kLd;
  T* vds = kds + kBn * kLd;

  const int bh = blockIdx.x, b = bh / p.heads, h = bh % p.heads;
  const int m0 = blockIdx.y * kBlockQ;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const T* q = at_bh(in.ptr[0], in.stride[0], b, h) + static_cast<int64_t>(m0) * in.stride[0].n;
  const T* k = at_bh(in.ptr[1], in.stride[1], b, h);
  const T* v = at_bh(in.ptr[2], in.stride[2], b, h);
  const T* qd = p.has_q_dot ? at_bh(in.ptr[3], in.stride[3], b, h) + static_cast<int64_t>(m0) * in.stride[3].n : nullptr;
  const T* kd = at_bh(in.ptr[4], in.stride[4], b, h);
  const T* vd = at_bh(in.ptr[5], in.stride[5], b, h);
  const bool need_sd = p.has_q_dot || p.has_k_dot;

  const int q_valid = min(kBlockQ, p.nq - m0);
  load_tile<T, D>(qs, q, in.stride[0].n, kBlockQ, q_valid);
  if (p.has_q_dot) load_tile<T, D>(qds, qd, in.stride[3].n, kBlockQ, q_valid);

  const int row0 = m0 + 16 * warp + g;  // this lane's rows: row0 and row0 + 8
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f}, r_run[2] = {0.f, 0.f};
  float acc[kNtO][4], acc_t[kNtO][4];
  zero(acc);
  zero(acc_t);
  const float sl2 = p.scale * kLog2e;
  // the last key any query of this block can see
  const int n_end = p.causal ? min(p.nk, m0 + kBlockQ + p.off) : p.nk;
  const T* qw = qs + 16 * warp * kLd;
  const T* qdw = qds + 16 * warp * kLd;

  for (int n0 = 0; n0 < n_end; n0 += kBn) {
    const int k_valid = min(kBn, p.nk - n0);
    __syncthreads();  // the previous tile is consumed
    load_tile<T, D>(ks, k + static_cast<int64_t>(n0) * in.stride[1].n, in.stride[1].n, kBn, k_valid);
    load_tile<T, D>(vs, v + static_cast<int64_t>(n0) * in.stride[2].n, in.stride[2].n, kBn, k_valid);
    if (p.has_k_dot) load_tile<T, D>(kds, kd + static_cast<int64_t>(n0) * in.stride[4].n, in.stride[4].n, kBn, k_valid);
    if (p.has_v_dot) load_tile<T, D>(vds, vd + static_cast<int64_t>(n0) * in.stride[5].n, in.stride[5].n, kBn, k_valid);
    __syncthreads();

    float s[kNtS][4], sd[kNtS][4];
    zero(s);
    warp_gemm<T, kNtS, kKsD, false, true>(s, qw, kLd, ks, kLd);
    if (need_sd) {
      zero(sd);
      if (p.has_q_dot) warp_gemm<T, kNtS, kKsD, false, true>(sd, qdw, kLd, ks, kLd);
      if (p.has_k_dot) warp_gemm<T, kNtS, kKsD, false, true>(sd, qw, kLd, kds, kLd);
    }
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < kNtS; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = n0 + 8 * j + 2 * t + (e & 1), row = row0 + 8 * (e >> 1);
        const bool vis = key < p.nk && (!p.causal || key <= row + p.off);
        s[j][e] = vis ? s[j][e] * sl2 : -INFINITY;
        mx[e >> 1] = fmaxf(mx[e >> 1], s[j][e]);
      }
    }
    float alpha[2], m_use[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
      const float m_new = fmaxf(m_run[i], mx[i]);
      m_use[i] = m_new == -INFINITY ? 0.f : m_new;  // rows with nothing visible yet: exp2 gives 0, not NaN
      alpha[i] = exp2f(m_run[i] - m_use[i]);
      m_run[i] = m_new;
      l_run[i] *= alpha[i];
      r_run[i] *= alpha[i];
    }
#pragma unroll
    for (int j = 0; j < kNtO; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        acc[j][e] *= alpha[e >> 1];
        acc_t[j][e] *= alpha[e >> 1];
      }
    }
#pragma unroll
    for (int j = 0; j < kNtS; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[j][e] = exp2f(s[j][e] - m_use[e >> 1]);  // now P (unnormalized)
        l_run[e >> 1] += s[j][e];
        if (need_sd) {
          sd[j][e] *= p.scale * s[j][e];  // now P * S_dot
          r_run[e >> 1] += sd[j][e];
        }
      }
    }
    uint32_t pa[kKsN][4];
    to_a<T, kKsN>(pa, s);
    warp_gemm_ra<T, kNtO, kKsN>(acc, pa, vs, kLd);
    if (p.has_v_dot) warp_gemm_ra<T, kNtO, kKsN>(acc_t, pa, vds, kLd);
    if (need_sd) {
      to_a<T, kKsN>(pa, sd);
      warp_gemm_ra<T, kNtO, kKsN>(acc_t, pa, vs, kLd);
    }
  }

  // the row sums were kept per lane; the 4 lanes of a row group hold disjoint columns
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 1);
    l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 2);
    r_run[i] += __shfl_xor_sync(0xffffffffu, r_run[i], 1);
    r_run[i] += __shfl_xor_sync(0xffffffffu, r_run[i], 2);
  }
  float linv[2], mu_row[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    linv[i] = l_run[i] > 0.f ? 1.f / l_run[i] : 0.f;
    mu_row[i] = r_run[i] * linv[i];
  }
  const int64_t bh_rows = static_cast<int64_t>(bh) * p.nq;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int row = row0 + 8 * i;
    if (row >= p.nq) continue;
    T* orow = o + (bh_rows + row) * D;
    T* odrow = o_dot + (bh_rows + row) * D;
#pragma unroll
    for (int j = 0; j < kNtO; ++j) {
      const int col = 8 * j + 2 * t;
      const float o0 = acc[j][2 * i] * linv[i], o1 = acc[j][2 * i + 1] * linv[i];
      *reinterpret_cast<uint32_t*>(orow + col) = Mma<T>::pack(o0, o1);
      *reinterpret_cast<uint32_t*>(odrow + col) = Mma<T>::pack(acc_t[j][2 * i] * linv[i] - mu_row[i] * o0,
                                                               acc_t[j][2 * i + 1] * linv[i] - mu_row[i] * o1);
    }
    if (t == 0) {
      lse[bh_rows + row] = l_run[i] > 0.f ? (m_run[i] + log2f(l_run[i])) / kLog2e : -INFINITY;
      mu[bh_rows + row] = mu_row[i];
    }
  }
}

// --- backward -----------------------------------------------------------------------------

// Per query row: dd = gd . O, D = g . O + gd . O_dot - dd mu, and lse in log2 units (+inf for
// rows that saw no key, so their P is exactly 0). One warp per row.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) row_stats_kernel(const T* __restrict__ g, const T* __restrict__ gd,
                                                             const T* __restrict__ o, const T* __restrict__ od,
                                                             const float* __restrict__ lse,
                                                             const float* __restrict__ mu, float* __restrict__ out,
                                                             int64_t rows) {
  using pyflowmap::cuda::to_acc;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  float go = 0.f, gdo = 0.f, gdod = 0.f;
  for (int c = lane; c < D; c += 32) {
    const int64_t i = row * D + c;
    go += to_acc(g[i]) * to_acc(o[i]);
    if (gd) {
      gdo += to_acc(gd[i]) * to_acc(o[i]);
      gdod += to_acc(gd[i]) * to_acc(od[i]);
    }
  }
  for (int s = 16; s > 0; s >>= 1) {
    go += __shfl_xor_sync(0xffffffffu, go, s);
    gdo += __shfl_xor_sync(0xffffffffu, gdo, s);
    gdod += __shfl_xor_sync(0xffffffffu, gdod, s);
  }
  if (lane == 0) {
    out[row] = gdo;                          // dd
    out[rows + row] = go + gdod - gdo * mu[row];  // D
    out[2 * rows + row] = isinf(lse[row]) ? INFINITY : lse[row] * kLog2e;
  }
}

template <int D> struct Bwd {
  static constexpr int kBlockQ = 32;  // query rows per step: bounds the registers per warp
  static constexpr int kLd = D + 8, kLdS = kBlockQ + 8;
  static constexpr size_t smem(size_t elem) {
    return (4 * kBlockK + 4 * kBlockQ) * kLd * elem + 2 * kBlockK * kLdS * elem + 4 * kBlockQ * sizeof(float);
  }
};

struct BwdArgs {
  const void* g;   // dL/dO
  const void* gd;  // dL/dO_dot or nullptr
  const float* stats;  // row_stats_kernel output [3, rows]
  const float* mu;
  float* dq;
  float* dq_dot;
  void* grad1;  // pass 1: dk, pass 2: dk_dot (nullptr: not wanted)
  void* grad2;  // pass 1: dv, pass 2: dv_dot
};

// PASS 1: dK, dV, dQ, dQ_dot. PASS 2: dK_dot, dV_dot.
template <typename T, int D, int PASS>
__global__ void __launch_bounds__(kThreads) backward_kernel(Inputs<T> in, BwdArgs a, Dev p) {
  using B = Bwd<D>;
  constexpr int kBq = B::kBlockQ, kLd = B::kLd, kLdS = B::kLdS;
  constexpr int kNtQ = kBq / 8, kKsQ = kBq / 16, kNtD = D / 8, kKsD = D / 16, kKsK = kBlockK / 16;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* ks = reinterpret_cast<T*>(smem_raw);
  T* vs = ks + kBlockK * kLd;
  T* kds = vs + kBlockK * kLd;
  T* vds = kds + kBlockK * kLd;
  T* qs = vds + kBlockK * kLd;
  T* qds = qs + kBq * kLd;
  T* gs = qds + kBq * kLd;
  T* gds = gs + kBq * kLd;
  T* st1 = gds + kBq * kLd;   // dS^T  [keys][queries]
  T* st2 = st1 + kBlockK * kLdS;  // dS_dot^T
  float* lse_s = reinterpret_cast<float*>(st2 + kBlockK * kLdS);
  float* mu_s = lse_s + kBq;
  float* dd_s = mu_s + kBq;
  float* d_s = dd_s + kBq;

  const int bh = blockIdx.x, b = bh / p.heads, h = bh % p.heads;
  const int n0 = blockIdx.y * kBlockK;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const T* gptr = static_cast<const T*>(a.g);
  const T* gdptr = static_cast<const T*>(a.gd);
  const bool has_gd = gdptr != nullptr;
  const bool need_sd = has_gd && (p.has_q_dot || p.has_k_dot);
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads * p.nq;
  const int64_t bh_rows = static_cast<int64_t>(bh) * p.nq;

  const T* q = at_bh(in.ptr[0], in.stride[0], b, h);
  const T* qd = at_bh(in.ptr[3], in.stride[3], b, h);
  const int k_valid = min(kBlockK, p.nk - n0);
  load_tile<T, D>(ks, at_bh(in.ptr[1], in.stride[1], b, h) + static_cast<int64_t>(n0) * in.stride[1].n,
                  in.stride[1].n, kBlockK, k_valid);
  load_tile<T, D>(vs, at_bh(in.ptr[2], in.stride[2], b, h) + static_cast<int64_t>(n0) * in.stride[2].n,
                  in.stride[2].n, kBlockK, k_valid);
  if (PASS == 1 && p.has_k_dot)
    load_tile<T, D>(kds, at_bh(in.ptr[4], in.stride[4], b, h) + static_cast<int64_t>(n0) * in.stride[4].n,
                    in.stride[4].n, kBlockK, k_valid);
  if (PASS == 1 && p.has_v_dot && has_gd)
    load_tile<T, D>(vds, at_bh(in.ptr[5], in.stride[5], b, h) + static_cast<int64_t>(n0) * in.stride[5].n,
                    in.stride[5].n, kBlockK, k_valid);

  float acc1[kNtD][4], acc2[kNtD][4];
  zero(acc1);
  zero(acc2);
  const float sl2 = p.scale * kLog2e;
  const int key0 = n0 + 16 * warp + g;  // this lane's keys: key0 and key0 + 8
  const T* kw = ks + 16 * warp * kLd;
  const T* kdw = kds + 16 * warp * kLd;
  const T* vw = vs + 16 * warp * kLd;
  const T* vdw = vds + 16 * warp * kLd;
  // queries before i_first see none of this block's keys (causal)
  const int i_first = p.causal ? max(0, n0 - p.off) / kBq * kBq : 0;

  for (int i0 = i_first; i0 < p.nq; i0 += kBq) {
    const int q_valid = min(kBq, p.nq - i0);
    __syncthreads();
    load_tile<T, D>(qs, q + static_cast<int64_t>(i0) * in.stride[0].n, in.stride[0].n, kBq, q_valid);
    if (PASS == 1) {
      load_tile<T, D>(gs, gptr + (bh_rows + i0) * D, D, kBq, q_valid);
      if (need_sd && p.has_q_dot)
        load_tile<T, D>(qds, qd + static_cast<int64_t>(i0) * in.stride[3].n, in.stride[3].n, kBq, q_valid);
    }
    if (has_gd) load_tile<T, D>(gds, gdptr + (bh_rows + i0) * D, D, kBq, q_valid);
    for (int r = threadIdx.x; r < kBq; r += blockDim.x) {
      const bool ok = r < q_valid;
      const int64_t row = bh_rows + i0 + r;
      dd_s[r] = ok ? a.stats[row] : 0.f;
      d_s[r] = ok ? a.stats[rows + row] : 0.f;
      lse_s[r] = ok ? a.stats[2 * rows + row] : INFINITY;
      mu_s[r] = ok ? a.mu[row] : 0.f;
    }
    __syncthreads();

    // P^T for this warp's 16 keys x kBq queries
    float pt[kNtQ][4];
    zero(pt);
    warp_gemm<T, kNtQ, kKsD, false, true>(pt, kw, kLd, qs, kLd);
#pragma unroll
    for (int j = 0; j < kNtQ; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int qi = 8 * j + 2 * t + (e & 1), key = key0 + 8 * (e >> 1), row = i0 + qi;
        const bool vis = key < p.nk && row < p.nq && (!p.causal || key <= row + p.off);
        pt[j][e] = vis ? exp2f(pt[j][e] * sl2 - lse_s[qi]) : 0.f;
      }
    }

    if (PASS == 1) {
      float dp[kNtQ][4], sdt[kNtQ][4], dsd[kNtQ][4];
      zero(dp);
      warp_gemm<T, kNtQ, kKsD, false, true>(dp, vw, kLd, gs, kLd);  // g . V
      if (has_gd) {
        float at[kNtQ][4];
        zero(at);
        warp_gemm<T, kNtQ, kKsD, false, true>(at, vw, kLd, gds, kLd);  // A = gd . V
        if (need_sd) {
          zero(sdt);
          if (p.has_q_dot) warp_gemm<T, kNtQ, kKsD, false, true>(sdt, kw, kLd, qds, kLd);
          if (p.has_k_dot) warp_gemm<T, kNtQ, kKsD, false, true>(sdt, kdw, kLd, qs, kLd);
#pragma unroll
          for (int j = 0; j < kNtQ; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int qi = 8 * j + 2 * t + (e & 1);
              const float sd = sdt[j][e] * p.scale, sdc = sd - mu_s[qi];
              dp[j][e] += sdc * at[j][e] - dd_s[qi] * sd;
              dsd[j][e] = pt[j][e] * (at[j][e] - dd_s[qi]);
              sdt[j][e] = pt[j][e] * sdc;  // now P (S_dot - mu), the dV weight on gd
            }
          }
        }
        if (p.has_v_dot) warp_gemm<T, kNtQ, kKsD, false, true>(dp, vdw, kLd, gds, kLd);  // gd . V_dot
      }
#pragma unroll
      for (int j = 0; j < kNtQ; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) dp[j][e] = pt[j][e] * (dp[j][e] - d_s[8 * j + 2 * t + (e & 1)]);  // dS^T
      }
      uint32_t fa[kKsQ][4];
      to_a<T, kKsQ>(fa, pt);
      warp_gemm_ra<T, kNtD, kKsQ>(acc2, fa, gs, kLd);  // dV += P^T g
      if (need_sd) {
        to_a<T, kKsQ>(fa, sdt);
        warp_gemm_ra<T, kNtD, kKsQ>(acc2, fa, gds, kLd);  // dV += (P (S_dot - mu))^T gd
      }
      to_a<T, kKsQ>(fa, dp);
      warp_gemm_ra<T, kNtD, kKsQ>(acc1, fa, qs, kLd);  // dK += dS^T Q
      if (need_sd && p.has_q_dot) {
        to_a<T, kKsQ>(fa, dsd);
        warp_gemm_ra<T, kNtD, kKsQ>(acc1, fa, qds, kLd);  // dK += dS_dot^T Q_dot
      }
      // stage dS^T (and dS_dot^T) for the dQ products
      T* s1 = st1 + 16 * warp * kLdS;
      T* s2 = st2 + 16 * warp * kLdS;
#pragma unroll
      for (int j = 0; j < kNtQ; ++j) {
        const int col = 8 * j + 2 * t;
        *reinterpret_cast<uint32_t*>(s1 + g * kLdS + col) = Mma<T>::pack(dp[j][0], dp[j][1]);
        *reinterpret_cast<uint32_t*>(s1 + (g + 8) * kLdS + col) = Mma<T>::pack(dp[j][2], dp[j][3]);
        if (need_sd) {
          *reinterpret_cast<uint32_t*>(s2 + g * kLdS + col) = Mma<T>::pack(dsd[j][0], dsd[j][1]);
          *reinterpret_cast<uint32_t*>(s2 + (g + 8) * kLdS + col) = Mma<T>::pack(dsd[j][2], dsd[j][3]);
        }
      }
      __syncthreads();
      // dQ (kBq x D) = dS (kBq x 64 keys) K (+ dS_dot K_dot); dQ_dot = dS_dot K. The warps split
      // the tile into row groups of 16 and column slices.
      constexpr int kGroups = kBq / 16, kPerGroup = kWarps / kGroups, kCols = D / kPerGroup, kNtC = kCols / 8;
      const int rg = warp / kPerGroup, c0 = (warp % kPerGroup) * kCols;
      const bool want_dqd = need_sd && p.has_q_dot;
      // dQ, then dQ_dot: one 16 x kCols accumulator live at a time next to dK / dV
      for (int which = 0; which < (want_dqd ? 2 : 1); ++which) {
        float dq[kNtC][4];
        zero(dq);
        if (which == 0) {
          warp_gemm<T, kNtC, kKsK, true, false>(dq, st1 + 16 * rg, kLdS, ks + c0, kLd);
          if (need_sd && p.has_k_dot) warp_gemm<T, kNtC, kKsK, true, false>(dq, st2 + 16 * rg, kLdS, kds + c0, kLd);
        } else {
          warp_gemm<T, kNtC, kKsK, true, false>(dq, st2 + 16 * rg, kLdS, ks + c0, kLd);
        }
        float* dst = which == 0 ? a.dq : a.dq_dot;
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int row = i0 + 16 * rg + g + 8 * i;
          if (row >= p.nq) continue;
          float* dqrow = dst + (bh_rows + row) * D + c0;
#pragma unroll
          for (int j = 0; j < kNtC; ++j) {
            const int col = 8 * j + 2 * t;
            atomicAdd(dqrow + col, dq[j][2 * i] * p.scale);
            atomicAdd(dqrow + col + 1, dq[j][2 * i + 1] * p.scale);
          }
        }
      }
    } else {
      // PASS 2: dK_dot += dS_dot^T Q, dV_dot += P^T gd
      float at[kNtQ][4];
      zero(at);
      warp_gemm<T, kNtQ, kKsD, false, true>(at, vw, kLd, gds, kLd);
      uint32_t fa[kKsQ][4];
      if (p.has_v_dot) {
        to_a<T, kKsQ>(fa, pt);
        warp_gemm_ra<T, kNtD, kKsQ>(acc2, fa, gds, kLd);
      }
      if (p.has_k_dot) {
#pragma unroll
        for (int j = 0; j < kNtQ; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) at[j][e] = pt[j][e] * (at[j][e] - dd_s[8 * j + 2 * t + (e & 1)]);
        }
        to_a<T, kKsQ>(fa, at);
        warp_gemm_ra<T, kNtD, kKsQ>(acc1, fa, qs, kLd);
      }
    }
  }

  // write this warp's 16 keys
  T* out1 = static_cast<T*>(a.grad1);
  T* out2 = static_cast<T*>(a.grad2);
  const int64_t bh_keys = static_cast<int64_t>(bh) * p.nk;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int key = key0 + 8 * i;
    if (key >= p.nk) continue;
#pragma unroll
    for (int j = 0; j < kNtD; ++j) {
      const int col = 8 * j + 2 * t;
      if (out1)
        *reinterpret_cast<uint32_t*>(out1 + (bh_keys + key) * D + col) =
            Mma<T>::pack(acc1[j][2 * i] * p.scale, acc1[j][2 * i + 1] * p.scale);
      if (out2)
        *reinterpret_cast<uint32_t*>(out2 + (bh_keys + key) * D + col) =
            Mma<T>::pack(acc2[j][2 * i], acc2[j][2 * i + 1]);
    }
  }
}

// --- launchers ----------------------------------------------------------------------------

template <typename K>
cudaError_t allow_smem(K kernel, size_t bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

template <typename T, int D>
cudaError_t forward_d(const Inputs<T>& in, T* o, T* o_dot, float* lse, float* mu, const Problem& prob,
                      cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(2 * kBlockQ + 4 * fwd_tile<D>()) * (D + 8) * sizeof(T);
  auto kernel = forward_kernel<T, D>;
  if (cudaError_t e = allow_smem(kernel, smem); e != cudaSuccess) return e;
  const dim3 grid(prob.batch * prob.heads, (prob.nq + kBlockQ - 1) / kBlockQ);
  kernel<<<grid, kThreads, smem, stream>>>(in, o, o_dot, lse, mu, dev_of(prob));
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t backward_d(const Inputs<T>& in, const T* g, const T* gd, const T* o, const T* od, const float* lse,
                       const float* mu, float* scratch, float* dq, float* dq_dot, T* dk, T* dv, T* dk_dot,
                       T* dv_dot, const Problem& prob, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(prob.batch) * prob.heads * prob.nq;
  row_stats_kernel<T, D><<<static_cast<unsigned>((rows + kWarps - 1) / kWarps), kThreads, 0, stream>>>(
      g, gd, o, od, lse, mu, scratch, rows);
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  const size_t smem = Bwd<D>::smem(sizeof(T));
  const dim3 grid(prob.batch * prob.heads, (prob.nk + kBlockK - 1) / kBlockK);
  const Dev dev = dev_of(prob);
  auto pass1 = backward_kernel<T, D, 1>;
  if (cudaError_t e = allow_smem(pass1, smem); e != cudaSuccess) return e;
  pass1<<<grid, kThreads, smem, stream>>>(in, BwdArgs{g, gd, scratch, mu, dq, dq_dot, dk, dv}, dev);
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  if (gd != nullptr && (dk_dot != nullptr || dv_dot != nullptr)) {
    auto pass2 = backward_kernel<T, D, 2>;
    if (cudaError_t e = allow_smem(pass2, smem); e != cudaSuccess) return e;
    pass2<<<grid, kThreads, smem, stream>>>(in, BwdArgs{g, gd, scratch, mu, dq, dq_dot, dk_dot, dv_dot}, dev);
  }
  return cudaGetLastError();
}

}  // namespace

template <typename T>
int forward_cuda(const Inputs<T>& in, T* o, T* o_dot, float* lse, float* mu, const Problem& p, cudaStream_t stream) {
  if (p.batch * p.heads == 0 || p.nq == 0) return cudaSuccess;
  if (p.dim == 64) return forward_d<T, 64>(in, o, o_dot, lse, mu, p, stream);
  if (p.dim == 128) return forward_d<T, 128>(in, o, o_dot, lse, mu, p, stream);
  return cudaErrorInvalidValue;
}

template <typename T>
int backward_cuda(const Inputs<T>& in, const T* grad_o, const T* grad_o_dot, const T* o, const T* o_dot,
                  const float* lse, const float* mu, float* scratch, float* dq, float* dq_dot, T* dk, T* dv,
                  T* dk_dot, T* dv_dot, const Problem& p, cudaStream_t stream) {
  if (p.batch * p.heads == 0 || p.nk == 0) return cudaSuccess;
  if (p.nq == 0) return cudaSuccess;  // the caller zero-fills key gradients
  if (p.dim == 64)
    return backward_d<T, 64>(in, grad_o, grad_o_dot, o, o_dot, lse, mu, scratch, dq, dq_dot, dk, dv, dk_dot, dv_dot,
                             p, stream);
  if (p.dim == 128)
    return backward_d<T, 128>(in, grad_o, grad_o_dot, o, o_dot, lse, mu, scratch, dq, dq_dot, dk, dv, dk_dot,
                              dv_dot, p, stream);
  return cudaErrorInvalidValue;
}

#define PYFLOWMAP_INSTANTIATE(T)                                                                              \
  template int forward_cuda<T>(const Inputs<T>&, T*, T*, float*, float*, const Problem&, cudaStream_t);      \
  template int backward_cuda<T>(const Inputs<T>&, const T*, const T*, const T*, const T*, const float*,       \
                                const float*, float*, float*, float*, T*, T*, T*, T*, const Problem&, cudaStream_t);
PYFLOWMAP_INSTANTIATE(__half)
PYFLOWMAP_INSTANTIATE(__nv_bfloat16)
#undef PYFLOWMAP_INSTANTIATE

}  // namespace pyflowmap::dual_attention
