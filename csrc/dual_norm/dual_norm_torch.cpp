// Torch glue of pyflowmap::dual_norm and dual_norm_backward (schemas in csrc/pyflowmap.cpp;
// the LayerNorm / RMSNorm / GroupNorm wrappers, fake and autograd kernels in
// pyflowmap/ops/dual_norm.py).
#include "common/checks.h"
#include "common/cuda_glue.h"
#include "common/format.h"
#include "dual_norm/dual_norm.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

namespace pyflowmap::dual_norm {
namespace {

Shape make_shape(const at::Tensor& xx, const std::optional<at::Tensor>& weight,
                 const std::optional<at::Tensor>& bias, int64_t len, int64_t groups, int64_t spatial,
                 bool center, double eps, const char* op) {
  const auto dt = xx.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || (xx.is_cuda() && (dt == at::kHalf || dt == at::kBFloat16)),
              op, ": `xx` must be float32 or float64 (or float16 / bfloat16 on CUDA), got ", dt);
  TORCH_CHECK(len >= 1 && groups >= 1 && spatial >= 1 && len % spatial == 0, op,
              ": invalid row layout len=", fmt(len), " groups=", fmt(groups), " spatial=", fmt(spatial));
  check_stacked(xx, op, "xx");
  TORCH_CHECK(xx.numel() % (2 * len * groups) == 0, op, ": `xx` with ", fmt(xx.numel()),
              " elements does not split into rows of ", fmt(len), " in groups of ", fmt(groups));
  TORCH_CHECK(eps > 0, op, ": `eps` must be positive");
  Shape s{xx.numel() / (2 * len), len, groups, spatial, groups * (len / spatial), center, eps};
  for (const auto* p : {&weight, &bias}) {
    if (p->has_value() && (*p)->defined()) {
      TORCH_CHECK((*p)->numel() == s.channels, op, ": affine parameters must have ", fmt(s.channels),
                  " elements, got ", fmt((*p)->numel()));
      TORCH_CHECK((*p)->scalar_type() == xx.scalar_type() && (*p)->device() == xx.device(), op,
                  ": affine parameters must match `xx` in dtype and device");
    }
  }
  TORCH_CHECK(center || !(bias.has_value() && bias->defined()), op, ": RMSNorm (center=False) takes no bias");
  return s;
}

template <typename T>
const T* opt_ptr(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<T>() : nullptr; }

at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : at::Tensor();
}

// The backward's own inputs against the forward's: same for every device.
void check_backward_inputs(const at::Tensor& gyy, const at::Tensor& xx, const at::Tensor& mean,
                           const at::Tensor& rstd, const Shape& s) {
  TORCH_CHECK(gyy.sizes() == xx.sizes() && gyy.scalar_type() == xx.scalar_type() && gyy.device() == xx.device(),
              "dual_norm_backward: `grad` must match `xx` in shape, dtype and device");
  TORCH_CHECK(mean.numel() == s.rows && rstd.numel() == s.rows && mean.scalar_type() == at::kDouble &&
                  rstd.scalar_type() == at::kDouble && mean.device() == xx.device() && rstd.device() == xx.device(),
              "dual_norm_backward: `mean` and `rstd` must be the forward's per-row statistics");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dual_norm_cpu(
    const at::Tensor& xx_in, const std::optional<at::Tensor>& weight_in,
    const std::optional<at::Tensor>& bias_in, int64_t len, int64_t groups, int64_t spatial,
    bool center, double eps) {
  const Shape s = make_shape(xx_in, weight_in, bias_in, len, groups, spatial, center, eps, "dual_norm");
  TORCH_CHECK(xx_in.device().is_cpu(), "dual_norm (CPU kernel): `xx` must be on the CPU");
  const at::Tensor xx = xx_in.contiguous();
  const at::Tensor w = contiguous_or_undefined(weight_in), b = contiguous_or_undefined(bias_in);
  at::Tensor yy = at::empty(xx.sizes(), xx.options());
  at::Tensor mean = at::empty({s.rows}, xx.options().dtype(at::kDouble));
  at::Tensor rstd = at::empty({s.rows}, xx.options().dtype(at::kDouble));
  if (xx.scalar_type() == at::kFloat) {
    forward_cpu<float>(xx.const_data_ptr<float>(), opt_ptr<float>(w), opt_ptr<float>(b),
                       yy.mutable_data_ptr<float>(), mean.mutable_data_ptr<double>(),
                       rstd.mutable_data_ptr<double>(), s);
  } else {
    forward_cpu<double>(xx.const_data_ptr<double>(), opt_ptr<double>(w), opt_ptr<double>(b),
                        yy.mutable_data_ptr<double>(), mean.mutable_data_ptr<double>(),
                        rstd.mutable_data_ptr<double>(), s);
  }
  return {yy, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dual_norm_backward_cpu(
    const at::Tensor& gyy_in, const at::Tensor& xx_in, const std::optional<at::Tensor>& weight_in,
    const at::Tensor& mean, const at::Tensor& rstd, int64_t len, int64_t groups, int64_t spatial,
    bool center, double eps, std::array<bool, 3> mask) {
  const Shape s = make_shape(xx_in, weight_in, std::nullopt, len, groups, spatial, center, eps,
                             "dual_norm_backward");
  TORCH_CHECK(xx_in.device().is_cpu(), "dual_norm_backward (CPU kernel): `xx` must be on the CPU");
  check_backward_inputs(gyy_in, xx_in, mean, rstd, s);
  const at::Tensor xx = xx_in.contiguous(), gyy = gyy_in.contiguous();
  const at::Tensor w = contiguous_or_undefined(weight_in);
  const at::Tensor m = mean.contiguous(), r = rstd.contiguous();
  at::Tensor gxx = at::empty(xx.sizes(), xx.options());
  const bool need_w = mask[1] && w.defined(), need_b = mask[2];
  at::Tensor gw = need_w ? at::empty({s.channels}, xx.options()) : at::Tensor();
  at::Tensor gb = need_b ? at::empty({s.channels}, xx.options()) : at::Tensor();
  if (xx.scalar_type() == at::kFloat) {
    backward_cpu<float>(gyy.const_data_ptr<float>(), xx.const_data_ptr<float>(), opt_ptr<float>(w),
                        m.const_data_ptr<double>(), r.const_data_ptr<double>(), gxx.mutable_data_ptr<float>(),
                        need_w ? gw.mutable_data_ptr<float>() : nullptr,
                        need_b ? gb.mutable_data_ptr<float>() : nullptr, s);
  } else {
    backward_cpu<double>(gyy.const_data_ptr<double>(), xx.const_data_ptr<double>(), opt_ptr<double>(w),
                         m.const_data_ptr<double>(), r.const_data_ptr<double>(), gxx.mutable_data_ptr<double>(),
                         need_w ? gw.mutable_data_ptr<double>() : nullptr,
                         need_b ? gb.mutable_data_ptr<double>() : nullptr, s);
  }
  return {gxx, gw, gb};
}

#ifdef PYFLOWMAP_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor> dual_norm_cuda(
    const at::Tensor& xx_in, const std::optional<at::Tensor>& weight_in,
    const std::optional<at::Tensor>& bias_in, int64_t len, int64_t groups, int64_t spatial,
    bool center, double eps) {
  const Shape s = make_shape(xx_in, weight_in, bias_in, len, groups, spatial, center, eps, "dual_norm");
  TORCH_CHECK(xx_in.is_cuda(), "dual_norm (CUDA kernel): `xx` must be a CUDA tensor");
  TORCH_CHECK(s.rows <= INT32_MAX, "dual_norm: more than 2^31 rows are not supported on CUDA");
  const c10::cuda::CUDAGuard guard(xx_in.device());
  const at::Tensor xx = xx_in.contiguous();
  const at::Tensor w = contiguous_or_undefined(weight_in), b = contiguous_or_undefined(bias_in);
  at::Tensor yy = at::empty(xx.sizes(), xx.options());
  at::Tensor mean = at::empty({s.rows}, xx.options().dtype(at::kDouble));
  at::Tensor rstd = at::empty({s.rows}, xx.options().dtype(at::kDouble));
  PYFLOWMAP_CUDA_DISPATCH(xx.scalar_type(), "dual_norm", {
    PYFLOWMAP_CHECK_LAUNCH(forward_cuda<T>(cptr<T, TT>(xx), cptr<T, TT>(w), cptr<T, TT>(b), mptr<T, TT>(yy),
                                           mean.mutable_data_ptr<double>(), rstd.mutable_data_ptr<double>(), s,
                                           current_stream()),
                           "dual_norm");
  })
  return {yy, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dual_norm_backward_cuda(
    const at::Tensor& gyy_in, const at::Tensor& xx_in, const std::optional<at::Tensor>& weight_in,
    const at::Tensor& mean, const at::Tensor& rstd, int64_t len, int64_t groups, int64_t spatial,
    bool center, double eps, std::array<bool, 3> mask) {
  const Shape s = make_shape(xx_in, weight_in, std::nullopt, len, groups, spatial, center, eps,
                             "dual_norm_backward");
  TORCH_CHECK(xx_in.is_cuda(), "dual_norm_backward (CUDA kernel): `xx` must be a CUDA tensor");
  check_backward_inputs(gyy_in, xx_in, mean, rstd, s);
  const c10::cuda::CUDAGuard guard(xx_in.device());
  const at::Tensor xx = xx_in.contiguous(), gyy = gyy_in.contiguous();
  const at::Tensor w = contiguous_or_undefined(weight_in);
  const at::Tensor m = mean.contiguous(), r = rstd.contiguous();
  at::Tensor gxx = at::empty(xx.sizes(), xx.options());
  const bool need_w = mask[1] && w.defined(), need_b = mask[2];
  // zeros, not empty: with no rows the kernels write nothing and the gradients are 0
  at::Tensor gw = need_w ? at::zeros({s.channels}, xx.options()) : at::Tensor();
  at::Tensor gb = need_b ? at::zeros({s.channels}, xx.options()) : at::Tensor();
  TORCH_CHECK(s.rows <= INT32_MAX, "dual_norm_backward: more than 2^31 rows are not supported on CUDA");
  const auto dopt = xx.options().dtype(at::kDouble);
  at::Tensor row_ab = at::empty({2 * s.rows}, dopt);
  at::Tensor partial = at::empty({2 * partial_chunks(s) * s.channels}, dopt);
  PYFLOWMAP_CUDA_DISPATCH(xx.scalar_type(), "dual_norm_backward", {
    PYFLOWMAP_CHECK_LAUNCH(backward_cuda<T>(cptr<T, TT>(gyy), cptr<T, TT>(xx), cptr<T, TT>(w),
                                            m.const_data_ptr<double>(), r.const_data_ptr<double>(), mptr<T, TT>(gxx),
                                            need_w ? mptr<T, TT>(gw) : nullptr, need_b ? mptr<T, TT>(gb) : nullptr,
                                            row_ab.mutable_data_ptr<double>(), partial.mutable_data_ptr<double>(), s,
                                            current_stream()),
                           "dual_norm_backward");
  })
  return {gxx, gw, gb};
}
#endif

}  // namespace

TORCH_LIBRARY_IMPL(pyflowmap, CPU, m) {
  m.impl("dual_norm", &dual_norm_cpu);
  m.impl("dual_norm_backward", &dual_norm_backward_cpu);
}

#ifdef PYFLOWMAP_WITH_CUDA
TORCH_LIBRARY_IMPL(pyflowmap, CUDA, m) {
  m.impl("dual_norm", &dual_norm_cuda);
  m.impl("dual_norm_backward", &dual_norm_backward_cuda);
}
#endif

}  // namespace pyflowmap::dual_norm
