// CPU kernels of the dual norms: row-parallel; per-row statistics accumulated in double,
// element math in the input dtype; affine gradients reduced over fixed row blocks in a fixed
// order (deterministic whatever the thread count). Two element layouts: one weight per element
// (LayerNorm / RMSNorm) and channel blocks of `spatial` elements (GroupNorm).
#include "dual_norm/dual_norm.h"

#include "common/cpu_dispatch.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace pyflowmap::dual_norm {
namespace {

constexpr int64_t kGrain = 1 << 14;  // elements per task

// Calls f(j_begin, j_end, w, b) for runs of elements sharing an affine pair (GroupNorm), or
// once with per-element pointers (LayerNorm / RMSNorm): `w`/`b` are then arrays indexed by j.
template <typename T>
struct Layout {
  const T* w;  // full channel arrays (never null: the glue passes ones / zeros)
  const T* b;
  int64_t base, spatial, cpg;
  bool per_elem;
};

template <typename T>
PYFLOWMAP_INLINE void fwd_row(const T* __restrict__ x, const T* __restrict__ xd, T* __restrict__ y,
                              T* __restrict__ yd, const Layout<T>& lay, int64_t L, bool center,
                              double eps, double* mean_out, double* rstd_out) {
  // omp simd reductions: the only way GCC vectorizes a floating-point sum without -ffast-math
  double mu = 0.0;
  if (center) {
#pragma omp simd reduction(+ : mu)
    for (int64_t j = 0; j < L; ++j) mu += x[j];
    mu /= L;
  }
  double var = 0.0;
#pragma omp simd reduction(+ : var)
  for (int64_t j = 0; j < L; ++j) {
    const double c = x[j] - mu;
    var += c * c;
  }
  const double rs = 1.0 / std::sqrt(var / L + eps);
  double a = 0.0, b = 0.0;
#pragma omp simd reduction(+ : a, b)
  for (int64_t j = 0; j < L; ++j) {
    const double xh = (x[j] - mu) * rs;
    a += xd[j];
    b += xh * xd[j];
  }
  // outputs in double arithmetic too (one rounding per output), as the backward does
  const double ad = center ? a / L : 0.0, bd = b / L, mud = mu;
  if (lay.per_elem) {
    const T* w = lay.w + lay.base;
    const T* bi = lay.b + lay.base;
#pragma omp simd
    for (int64_t j = 0; j < L; ++j) {
      const double xh = (x[j] - mud) * rs;
      y[j] = static_cast<T>(xh * w[j] + bi[j]);
      yd[j] = static_cast<T>(rs * (xd[j] - ad - xh * bd) * w[j]);
    }
  } else {
    for (int64_t c = 0; c < lay.cpg; ++c) {
      const double wc = lay.w[lay.base + c], bc = lay.b[lay.base + c];
      const int64_t j0 = c * lay.spatial;
#pragma omp simd
      for (int64_t j = j0; j < j0 + lay.spatial; ++j) {
        const double xh = (x[j] - mud) * rs;
        y[j] = static_cast<T>(xh * wc + bc);
        yd[j] = static_cast<T>(rs * (xd[j] - ad - xh * bd) * wc);
      }
    }
  }
  *mean_out = mu;
  *rstd_out = rs;
}

template <typename T>
PYFLOWMAP_INLINE void bwd_row(const T* __restrict__ gy, const T* __restrict__ gyd, const T* __restrict__ x,
                              const T* __restrict__ xd, T* __restrict__ gx, T* __restrict__ gxd,
                              const Layout<T>& lay, int64_t L, bool center, double mu, double rs,
                              double* __restrict__ gw_acc, double* __restrict__ gb_acc) {
  // pass 1: the seven row sums (see dual_norm.h); u = g_y w, v = g_ydot w
  double Sdx = 0, Sxdx = 0, Su = 0, Sxu = 0, Sv = 0, Sxv = 0, Svdx = 0;
  auto sums = [&](int64_t j0, int64_t j1, const T* w, int64_t wstride) {
#pragma omp simd reduction(+ : Sdx, Sxdx, Su, Sxu, Sv, Sxv, Svdx)
    for (int64_t j = j0; j < j1; ++j) {
      const double wj = w[j * wstride];
      const double xh = (x[j] - mu) * rs;
      const double u = gy[j] * wj, v = gyd[j] * wj;
      Sdx += xd[j];
      Sxdx += xh * xd[j];
      Su += u;
      Sxu += xh * u;
      Sv += v;
      Sxv += xh * v;
      Svdx += v * xd[j];
    }
  };
  if (lay.per_elem) {
    sums(0, L, lay.w + lay.base, 1);
  } else {
    for (int64_t c = 0; c < lay.cpg; ++c) sums(c * lay.spatial, (c + 1) * lay.spatial, lay.w + lay.base + c, 0);
  }
  const double invL = 1.0 / L;
  const double a = center ? Sdx * invL : 0.0, b = Sxdx * invL, Q = Sxv;
  const double P = rs * (Svdx - a * Sv - b * Sxv);  // sum v xhat_dot
  // The element math of the gradients runs in double: the three centered combinations below
  // cancel, and in float the kernel was ~5x less accurate than the float reference (measured).
  const double mv = center ? Sv * invL : 0.0, mxv = Sxv * invL;
  const double mu_ = center ? Su * invL : 0.0, mxu = Sxu * invL;
  const double mh = center ? -rs * (Q * a * invL + b * Sv * invL) : 0.0;
  const double mhx = -2.0 * rs * b * Q * invL;
  const double kQ = -rs * Q * invL, kb = -rs * b, kP = P * rs * invL;
  // pass 2: gradients of x and x_dot, and the affine gradients of this row
  auto write = [&](int64_t j0, int64_t j1, const T* w, int64_t wstride, double* gw, double* gb, int64_t gstride) {
    double sw = 0, sb = 0;
#pragma omp simd reduction(+ : sw, sb)
    for (int64_t j = j0; j < j1; ++j) {
      const double wj = w[j * wstride];
      const double xh = (x[j] - mu) * rs;
      const double u = gy[j] * wj, v = gyd[j] * wj;
      const double h = kQ * xd[j] + kb * v;
      gxd[j] = static_cast<T>(rs * (v - mv - xh * mxv));
      gx[j] = static_cast<T>(rs * (u - mu_ - xh * mxu) + rs * (h - mh - xh * mhx) - kP * xh);
      const double gwj = gy[j] * xh + gyd[j] * (rs * (xd[j] - a - xh * b));
      if (gstride) {
        if (gw) gw[j] += gwj;
        if (gb) gb[j] += gy[j];
      } else {
        sw += gwj;
        sb += gy[j];
      }
    }
    if (!gstride) {
      if (gw) *gw += sw;
      if (gb) *gb += sb;
    }
  };
  if (lay.per_elem) {
    write(0, L, lay.w + lay.base, 1, gw_acc ? gw_acc + lay.base : nullptr, gb_acc ? gb_acc + lay.base : nullptr, 1);
  } else {
    for (int64_t c = 0; c < lay.cpg; ++c) {
      const int64_t ch = lay.base + c;
      write(c * lay.spatial, (c + 1) * lay.spatial, lay.w + ch, 0,
            gw_acc ? gw_acc + ch : nullptr, gb_acc ? gb_acc + ch : nullptr, 0);
    }
  }
}

template <typename T>
PYFLOWMAP_INLINE void fwd_rows(const T* xx, const T* w, const T* b, T* yy, double* mean, double* rstd, const Shape& s,
                               int64_t r0, int64_t r1) {
  const int64_t L = s.len, cpg = s.channels / s.groups;
  for (int64_t r = r0; r < r1; ++r) {
    const Layout<T> lay{w, b, (r % s.groups) * cpg, s.spatial, cpg, s.spatial == 1};
    fwd_row(xx + r * L, xx + (r + s.rows) * L, yy + r * L, yy + (r + s.rows) * L, lay, L, s.center, s.eps,
            mean + r, rstd + r);
  }
}

template <typename T>
PYFLOWMAP_INLINE void bwd_rows(const T* gyy, const T* xx, const T* w, const double* mean, const double* rstd, T* gxx,
                               double* gw, double* gb, const Shape& s, int64_t r0, int64_t r1) {
  const int64_t L = s.len, cpg = s.channels / s.groups;
  for (int64_t r = r0; r < r1; ++r) {
    const Layout<T> lay{w, nullptr, (r % s.groups) * cpg, s.spatial, cpg, s.spatial == 1};
    bwd_row(gyy + r * L, gyy + (r + s.rows) * L, xx + r * L, xx + (r + s.rows) * L, gxx + r * L,
            gxx + (r + s.rows) * L, lay, L, s.center, mean[r], rstd[r], gw, gb);
  }
}

// The float path is ISA-cloned; double (tests, references) compiles once.
PYFLOWMAP_CLONES void fwd_rows_f32(const float* xx, const float* w, const float* b, float* yy, double* mean,
                                   double* rstd, const Shape& s, int64_t r0, int64_t r1) {
  fwd_rows(xx, w, b, yy, mean, rstd, s, r0, r1);
}
PYFLOWMAP_CLONES void bwd_rows_f32(const float* gyy, const float* xx, const float* w, const double* mean,
                                   const double* rstd, float* gxx, double* gw, double* gb, const Shape& s,
                                   int64_t r0, int64_t r1) {
  bwd_rows(gyy, xx, w, mean, rstd, gxx, gw, gb, s, r0, r1);
}

template <typename T>
void fwd_dispatch(const T* xx, const T* w, const T* b, T* yy, double* mean, double* rstd, const Shape& s,
                  int64_t r0, int64_t r1) {
  if constexpr (std::is_same_v<T, float>) fwd_rows_f32(xx, w, b, yy, mean, rstd, s, r0, r1);
  else fwd_rows(xx, w, b, yy, mean, rstd, s, r0, r1);
}

template <typename T>
void bwd_dispatch(const T* gyy, const T* xx, const T* w, const double* mean, const double* rstd, T* gxx,
                  double* gw, double* gb, const Shape& s, int64_t r0, int64_t r1) {
  if constexpr (std::is_same_v<T, float>) bwd_rows_f32(gyy, xx, w, mean, rstd, gxx, gw, gb, s, r0, r1);
  else bwd_rows(gyy, xx, w, mean, rstd, gxx, gw, gb, s, r0, r1);
}

}  // namespace

template <typename T>
void forward_cpu(const T* xx, const T* weight, const T* bias, T* yy, double* mean, double* rstd, const Shape& s) {
  // absent affine parameters become ones / zeros so the element loops carry no branches
  std::vector<T> ones, zeros;
  if (!weight) { ones.assign(s.channels, T(1)); weight = ones.data(); }
  if (!bias) { zeros.assign(s.channels, T(0)); bias = zeros.data(); }
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(s.len, 1));
  at::parallel_for(0, s.rows, grain, [&](int64_t r0, int64_t r1) {
    fwd_dispatch(xx, weight, bias, yy, mean, rstd, s, r0, r1);
  });
}

template <typename T>
void backward_cpu(const T* gyy, const T* xx, const T* weight, const double* mean, const double* rstd, T* gxx,
                  T* gw, T* gb, const Shape& s) {
  std::vector<T> ones;
  if (!weight) { ones.assign(s.channels, T(1)); weight = ones.data(); }
  // At most kMaxBlocks blocks, so the per-block affine scratch stays small next to the input
  // (one row per block made it twice the size of xx for long LayerNorm rows).
  constexpr int64_t kMaxBlocks = 64;
  const int64_t rows_per_block = std::max<int64_t>({1, kGrain / std::max<int64_t>(s.len, 1),
                                                    (s.rows + kMaxBlocks - 1) / kMaxBlocks});
  const int64_t nblocks = (s.rows + rows_per_block - 1) / rows_per_block;
  const bool need_w = gw != nullptr, need_b = gb != nullptr;
  std::vector<double> wacc(need_w ? nblocks * s.channels : 0, 0.0);
  std::vector<double> bacc(need_b ? nblocks * s.channels : 0, 0.0);
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * rows_per_block, r1 = std::min(s.rows, r0 + rows_per_block);
      bwd_dispatch(gyy, xx, weight, mean, rstd, gxx, need_w ? &wacc[blk * s.channels] : nullptr,
                   need_b ? &bacc[blk * s.channels] : nullptr, s, r0, r1);
    }
  });
  for (int64_t c = 0; c < s.channels; ++c) {
    double sw = 0.0, sb = 0.0;
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      if (need_w) sw += wacc[blk * s.channels + c];
      if (need_b) sb += bacc[blk * s.channels + c];
    }
    if (need_w) gw[c] = static_cast<T>(sw);
    if (need_b) gb[c] = static_cast<T>(sb);
  }
}

template void forward_cpu<float>(const float*, const float*, const float*, float*, double*, double*, const Shape&);
template void forward_cpu<double>(const double*, const double*, const double*, double*, double*, double*, const Shape&);
template void backward_cpu<float>(const float*, const float*, const float*, const double*, const double*, float*,
                                  float*, float*, const Shape&);
template void backward_cpu<double>(const double*, const double*, const double*, const double*, const double*,
                                   double*, double*, double*, const Shape&);

}  // namespace pyflowmap::dual_norm
