// CUDA kernels of the dual norms (math in dual_norm.h): one block per row pair for the
// statistics and the x / x_dot gradients, a chunked column kernel for the affine gradients.
// Statistics in double; fixed-order reductions, so results are deterministic.
#include "common/cuda_types.cuh"
#include "dual_norm/dual_norm.h"

namespace pyflowmap::dual_norm {
namespace {

using pyflowmap::cuda::block_sum;
using pyflowmap::cuda::from_acc;
using pyflowmap::cuda::to_acc;

constexpr int kThreads = 256;
constexpr int64_t kMaxChunks = 64;

struct Dev {  // Shape fields as plain values for the kernels
  int64_t rows, len, groups, spatial, channels, cpg;
  bool center;
  double eps;
};

__host__ Dev dev_of(const Shape& s) {
  return {s.rows, s.len, s.groups, s.spatial, s.channels, s.channels / s.groups, s.center, s.eps};
}

template <typename T>
__device__ __forceinline__ double wgt(const T* w, int64_t ch) { return w ? static_cast<double>(to_acc(w[ch])) : 1.0; }

template <typename T>
__global__ void __launch_bounds__(kThreads) forward_kernel(const T* __restrict__ xx, const T* __restrict__ w,
                                                           const T* __restrict__ b, T* __restrict__ yy,
                                                           double* __restrict__ mean, double* __restrict__ rstd, Dev s) {
  __shared__ double scratch[32];
  const int64_t r = blockIdx.x;
  const int64_t L = s.len;
  const T* x = xx + r * L;
  const T* xd = xx + (r + s.rows) * L;
  T* y = yy + r * L;
  T* yd = yy + (r + s.rows) * L;
  const int64_t base = (r % s.groups) * s.cpg;
  double mu = 0.0;
  if (s.center) {
    for (int64_t j = threadIdx.x; j < L; j += blockDim.x) mu += to_acc(x[j]);
    mu = block_sum(mu, scratch) / L;
  }
  double var = 0.0;
  for (int64_t j = threadIdx.x; j < L; j += blockDim.x) {
    const double c = to_acc(x[j]) - mu;
    var += c * c;
  }
  const double rs = rsqrt(block_sum(var, scratch) / L + s.eps);
  double a = 0.0, bb = 0.0;
  for (int64_t j = threadIdx.x; j < L; j += blockDim.x) {
    const double xh = (to_acc(x[j]) - mu) * rs;
    a += to_acc(xd[j]);
    bb += xh * to_acc(xd[j]);
  }
  a = s.center ? block_sum(a, scratch) / L : 0.0;
  bb = block_sum(bb, scratch) / L;
  for (int64_t j = threadIdx.x; j < L; j += blockDim.x) {
    const int64_t ch = base + j / s.spatial;
    const double xh = (to_acc(x[j]) - mu) * rs;
    const double wc = wgt(w, ch);
    y[j] = from_acc<T>(xh * wc + (b ? static_cast<double>(to_acc(b[ch])) : 0.0));
    yd[j] = from_acc<T>(rs * (to_acc(xd[j]) - a - xh * bb) * wc);
  }
  if (threadIdx.x == 0) {
    mean[r] = mu;
    rstd[r] = rs;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) backward_rows(const T* __restrict__ gyy, const T* __restrict__ xx,
                                                          const T* __restrict__ w, const double* __restrict__ mean,
                                                          const double* __restrict__ rstd, T* __restrict__ gxx,
                                                          double* __restrict__ row_ab, Dev s) {
  __shared__ double scratch[32];
  const int64_t r = blockIdx.x;
  const int64_t L = s.len;
  const T* x = xx + r * L;
  const T* xd = xx + (r + s.rows) * L;
  const T* gy = gyy + r * L;
  const T* gyd = gyy + (r + s.rows) * L;
  T* gx = gxx + r * L;
  T* gxd = gxx + (r + s.rows) * L;
  const int64_t base = (r % s.groups) * s.cpg;
  const double mu = mean[r], rs = rstd[r], invL = 1.0 / L;
  double S[7] = {0, 0, 0, 0, 0, 0, 0};  // dx, xh*dx, u, xh*u, v, xh*v, v*dx
  for (int64_t j = threadIdx.x; j < L; j += blockDim.x) {
    const double xh = (to_acc(x[j]) - mu) * rs;
    const double wc = wgt(w, base + j / s.spatial);
    const double u = to_acc(gy[j]) * wc, v = to_acc(gyd[j]) * wc, dx = to_acc(xd[j]);
    S[0] += dx;
    S[1] += xh * dx;
    S[2] += u;
    S[3] += xh * u;
    S[4] += v;
    S[5] += xh * v;
    S[6] += v * dx;
  }
#pragma unroll
  for (int k = 0; k < 7; ++k) S[k] = block_sum(S[k], scratch);
  const double a = s.center ? S[0] * invL : 0.0, b = S[1] * invL, Q = S[5];
  const double P = rs * (S[6] - a * S[4] - b * S[5]);
  const double mv = s.center ? S[4] * invL : 0.0, mxv = S[5] * invL;
  const double mu_ = s.center ? S[2] * invL : 0.0, mxu = S[3] * invL;
  const double mh = s.center ? -rs * (Q * a * invL + b * S[4] * invL) : 0.0;
  const double mhx = -2.0 * rs * b * Q * invL;
  for (int64_t j = threadIdx.x; j < L; j += blockDim.x) {
    const double xh = (to_acc(x[j]) - mu) * rs;
    const double wc = wgt(w, base + j / s.spatial);
    const double u = to_acc(gy[j]) * wc, v = to_acc(gyd[j]) * wc;
    const double h = -rs * (Q * to_acc(xd[j]) * invL + b * v);
    gxd[j] = from_acc<T>(rs * (v - mv - xh * mxv));
    gx[j] = from_acc<T>(rs * (u - mu_ - xh * mxu) + rs * (h - mh - xh * mhx) - P * rs * xh * invL);
  }
  if (threadIdx.x == 0) {
    row_ab[2 * r] = a;
    row_ab[2 * r + 1] = b;
  }
}

// partial[chunk, c] = sum over this chunk's samples and the channel's spatial run of
// g_y xhat + g_ydot xhat_dot (weight) and g_y (bias).
template <typename T>
__global__ void __launch_bounds__(kThreads) affine_partial(const T* __restrict__ gyy, const T* __restrict__ xx,
                                                           const double* __restrict__ mean,
                                                           const double* __restrict__ rstd,
                                                           const double* __restrict__ row_ab,
                                                           double* __restrict__ pw, double* __restrict__ pb, Dev s,
                                                           int64_t chunks) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= s.channels) return;
  const int64_t samples = s.rows / s.groups;
  const int64_t per_chunk = (samples + chunks - 1) / chunks;
  const int64_t n0 = blockIdx.y * per_chunk, n1 = min(samples, n0 + per_chunk);
  const int64_t g = c / s.cpg, j0 = (c - g * s.cpg) * s.spatial;
  double sw = 0.0, sb = 0.0;
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t r = n * s.groups + g;
    const double mu = mean[r], rs = rstd[r], a = row_ab[2 * r], b = row_ab[2 * r + 1];
    const int64_t o = r * s.len, od = (r + s.rows) * s.len;
    for (int64_t j = j0; j < j0 + s.spatial; ++j) {
      const double xh = (to_acc(xx[o + j]) - mu) * rs;
      const double xhd = rs * (to_acc(xx[od + j]) - a - xh * b);
      const double gy = to_acc(gyy[o + j]);
      sw += gy * xh + to_acc(gyy[od + j]) * xhd;
      sb += gy;
    }
  }
  if (pw) pw[blockIdx.y * s.channels + c] = sw;
  if (pb) pb[blockIdx.y * s.channels + c] = sb;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) affine_reduce(const double* __restrict__ pw, const double* __restrict__ pb,
                                                          T* __restrict__ gw, T* __restrict__ gb, int64_t channels,
                                                          int64_t chunks) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  double sw = 0.0, sb = 0.0;
  for (int64_t k = 0; k < chunks; ++k) {  // fixed order
    if (pw) sw += pw[k * channels + c];
    if (pb) sb += pb[k * channels + c];
  }
  if (gw) gw[c] = from_acc<T>(sw);
  if (gb) gb[c] = from_acc<T>(sb);
}

}  // namespace

int64_t partial_chunks(const Shape& s) {
  const int64_t samples = s.rows / s.groups;
  return samples < kMaxChunks ? (samples < 1 ? 1 : samples) : kMaxChunks;
}

template <typename T>
int forward_cuda(const T* xx, const T* weight, const T* bias, T* yy, double* mean, double* rstd, const Shape& s,
                 CUstream_st* stream) {
  if (s.rows == 0) return 0;
  forward_kernel<T><<<static_cast<unsigned>(s.rows), kThreads, 0, stream>>>(xx, weight, bias, yy, mean, rstd, dev_of(s));
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int backward_cuda(const T* gyy, const T* xx, const T* weight, const double* mean, const double* rstd, T* gxx,
                  T* gw, T* gb, double* row_ab, double* partial, const Shape& s, CUstream_st* stream) {
  if (s.rows == 0) return 0;
  const Dev d = dev_of(s);
  backward_rows<T><<<static_cast<unsigned>(s.rows), kThreads, 0, stream>>>(gyy, xx, weight, mean, rstd, gxx, row_ab, d);
  if (gw || gb) {
    const int64_t chunks = partial_chunks(s);
    double* pw = gw ? partial : nullptr;
    double* pb = gb ? partial + chunks * s.channels : nullptr;
    const dim3 grid(static_cast<unsigned>((s.channels + kThreads - 1) / kThreads), static_cast<unsigned>(chunks));
    affine_partial<T><<<grid, kThreads, 0, stream>>>(gyy, xx, mean, rstd, row_ab, pw, pb, d, chunks);
    affine_reduce<T><<<static_cast<unsigned>((s.channels + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        pw, pb, gw, gb, s.channels, chunks);
  }
  return static_cast<int>(cudaGetLastError());
}

#define PYFLOWMAP_INSTANTIATE(T)                                                                            \
  template int forward_cuda<T>(const T*, const T*, const T*, T*, double*, double*, const Shape&, CUstream_st*); \
  template int backward_cuda<T>(const T*, const T*, const T*, const double*, const double*, T*, T*, T*, double*, \
                                double*, const Shape&, CUstream_st*);
PYFLOWMAP_INSTANTIATE(float)
PYFLOWMAP_INSTANTIATE(double)
PYFLOWMAP_INSTANTIATE(__half)
PYFLOWMAP_INSTANTIATE(__nv_bfloat16)
#undef PYFLOWMAP_INSTANTIATE

}  // namespace pyflowmap::dual_norm
