// Torch glue of pyflowmap::dual_norm and dual_norm_backward (schemas in csrc/pyflowmap.cpp;
// the LayerNorm / RMSNorm / GroupNorm wrappers, fake and autograd kernels in
// pyflowmap/ops/dual_norm.py).
#include "common/checks.h"
#include "common/cuda_glue.h"
#include "common/dispatch.h"
#include "common/format.h"
#include "dual_norm/dual_norm.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>
#include <utility>

namespace pyflowmap::dual_norm {
namespace {

// The dtypes the kernels are instantiated for (dual_norm_cpu.cpp, dual_norm.cu).
using CpuTypes = dtypes<float, double, c10::BFloat16>;
using CudaTypes = dtypes<float, double, c10::Half, c10::BFloat16>;

struct NormArgs {
  const char* op;
  Shape s;
  at::Tensor xx, weight, bias;  // contiguous; weight / bias undefined when absent
  at::Tensor grad, mean, rstd;  // the backward's (contiguous); undefined for the forward
  std::array<bool, 3> mask;     // the backward's output_mask
};

// The checks of both ops for every device; the backward passes no bias and its grad / mean /
// rstd (the forward: undefined `grad`).
NormArgs prepare(const at::Tensor& xx, const std::optional<at::Tensor>& weight_in,
                 const std::optional<at::Tensor>& bias_in, const at::Tensor& grad, const at::Tensor& mean,
                 const at::Tensor& rstd, int64_t len, int64_t groups, int64_t spatial, bool center, double eps,
                 std::array<bool, 3> mask, const char* op) {
  check_floating(xx, op, "xx", CpuTypes::scalar_types, CudaTypes::scalar_types);
  TORCH_CHECK(len >= 1 && groups >= 1 && spatial >= 1 && len % spatial == 0, op,
              ": invalid row layout len=", fmt(len), " groups=", fmt(groups), " spatial=", fmt(spatial));
  check_stacked(xx, op, "xx");
  TORCH_CHECK(xx.numel() % (2 * len * groups) == 0, op, ": `xx` with ", fmt(xx.numel()),
              " elements does not split into rows of ", fmt(len), " in groups of ", fmt(groups));
  TORCH_CHECK(eps > 0, op, ": `eps` must be positive");
  const Shape s{xx.numel() / (2 * len), len, groups, spatial, groups * (len / spatial), center, eps};
  const at::Tensor weight = value_or_undefined(weight_in), bias = value_or_undefined(bias_in);
  for (const auto& [p, name] : {std::pair{&weight, "weight"}, std::pair{&bias, "bias"}}) {
    if (!p->defined()) continue;
    TORCH_CHECK(p->numel() == s.channels, op, ": affine parameters must have ", fmt(s.channels), " elements, got ",
                fmt(p->numel()), " in `", name, "`");
    check_same_dtype(*p, xx, op, name, "xx");
    check_same_device(*p, xx, op, name, "xx");
  }
  TORCH_CHECK(center || !bias.defined(), op, ": RMSNorm (center=False) takes no bias");
  if (grad.defined()) {
    check_like(grad, xx, op, "grad", "xx");
    for (const auto& [t, name] : {std::pair{&mean, "mean"}, std::pair{&rstd, "rstd"}}) {
      check_saved(*t, t->numel() == s.rows, at::kDouble, xx, op, name, "per-row statistics (float64, one per row)");
    }
  }
  auto contiguous = [](const at::Tensor& t) { return t.defined() ? t.contiguous() : t; };
  return {op, s, xx.contiguous(), contiguous(weight), contiguous(bias), contiguous(grad), contiguous(mean),
          contiguous(rstd), mask};
}

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

Outputs dual_norm_cpu(const NormArgs& a) {
  check_backend(a.xx, a.op, "xx", c10::DeviceType::CPU);
  at::Tensor yy = at::empty(a.xx.sizes(), a.xx.options());
  at::Tensor mean = at::empty({a.s.rows}, a.xx.options().dtype(at::kDouble));
  at::Tensor rstd = at::empty({a.s.rows}, a.xx.options().dtype(at::kDouble));
  dispatch_types(CpuTypes{}, a.xx.scalar_type(), a.op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    forward_cpu<T>(cptr<T>(a.xx), cptr<T>(a.weight), cptr<T>(a.bias), mptr<T>(yy), mptr<double>(mean),
                   mptr<double>(rstd), a.s);
  });
  return {yy, mean, rstd};
}

Outputs dual_norm_backward_cpu(const NormArgs& a) {
  check_backend(a.xx, a.op, "xx", c10::DeviceType::CPU);
  at::Tensor gxx = at::empty(a.xx.sizes(), a.xx.options());
  at::Tensor gw = a.mask[1] && a.weight.defined() ? at::empty({a.s.channels}, a.xx.options()) : at::Tensor();
  at::Tensor gb = a.mask[2] ? at::empty({a.s.channels}, a.xx.options()) : at::Tensor();
  dispatch_types(CpuTypes{}, a.xx.scalar_type(), a.op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    backward_cpu<T>(cptr<T>(a.grad), cptr<T>(a.xx), cptr<T>(a.weight), cptr<double>(a.mean), cptr<double>(a.rstd),
                    mptr<T>(gxx), mptr<T>(gw), mptr<T>(gb), a.s);
  });
  return {gxx, gw, gb};
}

#ifdef PYFLOWMAP_WITH_CUDA
Outputs dual_norm_cuda(const NormArgs& a) {
  check_backend(a.xx, a.op, "xx", c10::DeviceType::CUDA);
  TORCH_CHECK(a.s.rows <= INT32_MAX, a.op, ": more than 2^31 rows are not supported on CUDA");
  const c10::cuda::CUDAGuard guard(a.xx.device());
  at::Tensor yy = at::empty(a.xx.sizes(), a.xx.options());
  at::Tensor mean = at::empty({a.s.rows}, a.xx.options().dtype(at::kDouble));
  at::Tensor rstd = at::empty({a.s.rows}, a.xx.options().dtype(at::kDouble));
  dispatch_types(CudaTypes{}, a.xx.scalar_type(), a.op, [&](auto tag) {
    using TT = typename decltype(tag)::type;
    using T = cuda_type_t<TT>;
    PYFLOWMAP_CHECK_LAUNCH(forward_cuda<T>(cuda_cptr<TT>(a.xx), cuda_cptr<TT>(a.weight), cuda_cptr<TT>(a.bias),
                                           cuda_mptr<TT>(yy), mptr<double>(mean), mptr<double>(rstd), a.s,
                                           current_stream()),
                           a.op);
  });
  return {yy, mean, rstd};
}

Outputs dual_norm_backward_cuda(const NormArgs& a) {
  check_backend(a.xx, a.op, "xx", c10::DeviceType::CUDA);
  TORCH_CHECK(a.s.rows <= INT32_MAX, a.op, ": more than 2^31 rows are not supported on CUDA");
  const c10::cuda::CUDAGuard guard(a.xx.device());
  at::Tensor gxx = at::empty(a.xx.sizes(), a.xx.options());
  // zeros, not empty: with no rows the kernels write nothing and the gradients are 0
  at::Tensor gw = a.mask[1] && a.weight.defined() ? at::zeros({a.s.channels}, a.xx.options()) : at::Tensor();
  at::Tensor gb = a.mask[2] ? at::zeros({a.s.channels}, a.xx.options()) : at::Tensor();
  const auto dopt = a.xx.options().dtype(at::kDouble);
  at::Tensor row_ab = at::empty({2 * a.s.rows}, dopt);
  at::Tensor partial = at::empty({2 * partial_chunks(a.s) * a.s.channels}, dopt);
  dispatch_types(CudaTypes{}, a.xx.scalar_type(), a.op, [&](auto tag) {
    using TT = typename decltype(tag)::type;
    using T = cuda_type_t<TT>;
    PYFLOWMAP_CHECK_LAUNCH(backward_cuda<T>(cuda_cptr<TT>(a.grad), cuda_cptr<TT>(a.xx), cuda_cptr<TT>(a.weight),
                                            cptr<double>(a.mean), cptr<double>(a.rstd), cuda_mptr<TT>(gxx),
                                            cuda_mptr<TT>(gw), cuda_mptr<TT>(gb), mptr<double>(row_ab),
                                            mptr<double>(partial), a.s, current_stream()),
                           a.op);
  });
  return {gxx, gw, gb};
}
#endif

// The schemas' entries for backend Run (the functions above).
template <auto Run>
Outputs dual_norm_entry(const at::Tensor& xx, const std::optional<at::Tensor>& weight,
                        const std::optional<at::Tensor>& bias, int64_t len, int64_t groups, int64_t spatial,
                        bool center, double eps) {
  return Run(prepare(xx, weight, bias, at::Tensor(), at::Tensor(), at::Tensor(), len, groups, spatial, center, eps,
                     {}, "dual_norm"));
}

template <auto Run>
Outputs dual_norm_backward_entry(const at::Tensor& grad, const at::Tensor& xx, const std::optional<at::Tensor>& weight,
                                 const at::Tensor& mean, const at::Tensor& rstd, int64_t len, int64_t groups,
                                 int64_t spatial, bool center, double eps, std::array<bool, 3> mask) {
  return Run(prepare(xx, weight, std::nullopt, grad, mean, rstd, len, groups, spatial, center, eps, mask,
                     "dual_norm_backward"));
}

}  // namespace

TORCH_LIBRARY_IMPL(pyflowmap, CPU, m) {
  m.impl("dual_norm", &dual_norm_entry<dual_norm_cpu>);
  m.impl("dual_norm_backward", &dual_norm_backward_entry<dual_norm_backward_cpu>);
}

#ifdef PYFLOWMAP_WITH_CUDA
TORCH_LIBRARY_IMPL(pyflowmap, CUDA, m) {
  m.impl("dual_norm", &dual_norm_entry<dual_norm_cuda>);
  m.impl("dual_norm_backward", &dual_norm_backward_entry<dual_norm_backward_cuda>);
}
#endif

}  // namespace pyflowmap::dual_norm
