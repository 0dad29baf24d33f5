// CPU kernels of the dual norms: row-parallel; per-row statistics accumulated in double,
// element math in double (bfloat16 loaded and stored through its raw bits, so the loops stay
// vectorized); affine gradients reduced over fixed row blocks in a fixed
// order (deterministic whatever the thread count). Two element layouts: one weight per element
// (LayerNorm / RMSNorm) and channel blocks of `spatial` elements (GroupNorm).
#include "dual_norm/dual_norm.h"

#include "common/cpu_dispatch.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

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
    for (int64_t j = 0; j < L; ++j) mu += ld(x[j]);
    mu /= L;
  }
  double var = 0.0;
#pragma omp simd reduction(+ : var)
  for (int64_t j = 0; j < L; ++j) {
    const double c = ld(x[j]) - mu;
    var += c * c;
  }
  const double rs = 1.0 / std::sqrt(var / L + eps);
  double a = 0.0, b = 0.0;
#pragma omp simd reduction(+ : a, b)
  for (int64_t j = 0; j < L; ++j) {
    const double xh = (ld(x[j]) - mu) * rs;
    a += ld(xd[j]);
    b += xh * ld(xd[j]);
  }
  // outputs in double arithmetic too (one rounding per output), as the backward does
  const double ad = center ? a / L : 0.0, bd = b / L, mud = mu;
  if (lay.per_elem) {
    const T* w = lay.w + lay.base;
    const T* bi = lay.b + lay.base;
#pragma omp simd
    for (int64_t j = 0; j < L; ++j) {
      const double xh = (ld(x[j]) - mud) * rs;
      y[j] = st<T>(xh * ld(w[j]) + ld(bi[j]));
      yd[j] = st<T>(rs * (ld(xd[j]) - ad - xh * bd) * ld(w[j]));
    }
  } else {
    for (int64_t c = 0; c < lay.cpg; ++c) {
      const double wc = ld(lay.w[lay.base + c]), bc = ld(lay.b[lay.base + c]);
      const int64_t j0 = c * lay.spatial;
#pragma omp simd
      for (int64_t j = j0; j < j0 + lay.spatial; ++j) {
        const double xh = (ld(x[j]) - mud) * rs;
        y[j] = st<T>(xh * wc + bc);
        yd[j] = st<T>(rs * (ld(xd[j]) - ad - xh * bd) * wc);
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
      const double wj = ld(w[j * wstride]);
      const double xh = (ld(x[j]) - mu) * rs;
      const double u = ld(gy[j]) * wj, v = ld(gyd[j]) * wj;
      Sdx += ld(xd[j]);
      Sxdx += xh * ld(xd[j]);
      Su += u;
      Sxu += xh * u;
      Sv += v;
      Sxv += xh * v;
      Svdx += v * ld(xd[j]);
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
      const double wj = ld(w[j * wstride]);
      const double xh = (ld(x[j]) - mu) * rs;
      const double u = ld(gy[j]) * wj, v = ld(gyd[j]) * wj;
      const double h = kQ * ld(xd[j]) + kb * v;
      gxd[j] = st<T>(rs * (v - mv - xh * mxv));
      gx[j] = st<T>(rs * (u - mu_ - xh * mxu) + rs * (h - mh - xh * mhx) - kP * xh);
      const double gwj = ld(gy[j]) * xh + ld(gyd[j]) * (rs * (ld(xd[j]) - a - xh * b));
      if (gstride) {
        if (gw) gw[j] += gwj;
        if (gb) gb[j] += ld(gy[j]);
      } else {
        sw += gwj;
        sb += ld(gy[j]);
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

// The float and bfloat16 paths are ISA-cloned (R: the raw storage type, bfloat16 as its
// bits); double (tests, references) compiles once.
#define PYFLOWMAP_ROWS(NAME, R)                                                                            \
  PYFLOWMAP_CLONES void fwd_rows_##NAME(const R* xx, const R* w, const R* b, R* yy, double* mean, double* rstd, \
                                        const Shape& s, int64_t r0, int64_t r1) {                          \
    fwd_rows(xx, w, b, yy, mean, rstd, s, r0, r1);                                                        \
  }                                                                                                        \
  PYFLOWMAP_CLONES void bwd_rows_##NAME(const R* gyy, const R* xx, const R* w, const double* mean,          \
                                        const double* rstd, R* gxx, double* gw, double* gb, const Shape& s,  \
                                        int64_t r0, int64_t r1) {                                          \
    bwd_rows(gyy, xx, w, mean, rstd, gxx, gw, gb, s, r0, r1);                                             \
  }
PYFLOWMAP_ROWS(f32, float)
PYFLOWMAP_ROWS(bf16, uint16_t)
#undef PYFLOWMAP_ROWS

template <typename R>
void fwd_dispatch(const R* xx, const R* w, const R* b, R* yy, double* mean, double* rstd, const Shape& s,
                  int64_t r0, int64_t r1) {
  if constexpr (std::is_same_v<R, float>) fwd_rows_f32(xx, w, b, yy, mean, rstd, s, r0, r1);
  else if constexpr (std::is_same_v<R, uint16_t>) fwd_rows_bf16(xx, w, b, yy, mean, rstd, s, r0, r1);
  else fwd_rows(xx, w, b, yy, mean, rstd, s, r0, r1);
}

template <typename R>
void bwd_dispatch(const R* gyy, const R* xx, const R* w, const double* mean, const double* rstd, R* gxx,
                  double* gw, double* gb, const Shape& s, int64_t r0, int64_t r1) {
  if constexpr (std::is_same_v<R, float>) bwd_rows_f32(gyy, xx, w, mean, rstd, gxx, gw, gb, s, r0, r1);
  else if constexpr (std::is_same_v<R, uint16_t>) bwd_rows_bf16(gyy, xx, w, mean, rstd, gxx, gw, gb, s, r0, r1);
  else bwd_rows(gyy, xx, w, mean, rstd, gxx, gw, gb, s, r0, r1);
}

}  // namespace

template <typename T>
void forward_cpu(const T* xx_, const T* weight_, const T* bias_, T* yy_, double* mean, double* rstd, const Shape& s) {
  using R = typename Raw<T>::R;
  const R *xx = reinterpret_cast<const R*>(xx_), *weight = reinterpret_cast<const R*>(weight_),
          *bias = reinterpret_cast<const R*>(bias_);
  R* yy = reinterpret_cast<R*>(yy_);
  // absent affine parameters become ones / zeros so the element loops carry no branches
  std::vector<R> ones, zeros;
  if (!weight) { ones.assign(s.channels, st<R>(1.0)); weight = ones.data(); }
  if (!bias) { zeros.assign(s.channels, st<R>(0.0)); bias = zeros.data(); }
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(s.len, 1));
  at::parallel_for(0, s.rows, grain, [&](int64_t r0, int64_t r1) {
    fwd_dispatch(xx, weight, bias, yy, mean, rstd, s, r0, r1);
  });
}

template <typename T>
void backward_cpu(const T* gyy_, const T* xx_, const T* weight_, const double* mean, const double* rstd, T* gxx_,
                  T* gw_, T* gb_, const Shape& s) {
  using R = typename Raw<T>::R;
  const R *gyy = reinterpret_cast<const R*>(gyy_), *xx = reinterpret_cast<const R*>(xx_),
          *weight = reinterpret_cast<const R*>(weight_);
  R *gxx = reinterpret_cast<R*>(gxx_), *gw = reinterpret_cast<R*>(gw_), *gb = reinterpret_cast<R*>(gb_);
  std::vector<R> ones;
  if (!weight) { ones.assign(s.channels, st<R>(1.0)); weight = ones.data(); }
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
    if (need_w) gw[c] = st<R>(sw);
    if (need_b) gb[c] = st<R>(sb);
  }
}

#define PYFLOWMAP_INSTANTIATE(T)                                                                            \
  template void forward_cpu<T>(const T*, const T*, const T*, T*, double*, double*, const Shape&);          \
  template void backward_cpu<T>(const T*, const T*, const T*, const double*, const double*, T*, T*, T*,    \
                                const Shape&);
PYFLOWMAP_INSTANTIATE(float)
PYFLOWMAP_INSTANTIATE(double)
PYFLOWMAP_INSTANTIATE(c10::BFloat16)
#undef PYFLOWMAP_INSTANTIATE

}  // namespace pyflowmap::dual_norm
