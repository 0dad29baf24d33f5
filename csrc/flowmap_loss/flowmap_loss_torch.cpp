// Torch glue of pyflowmap::flowmap_loss, flowmap_fd_loss and their backwards (schemas in
// csrc/pyflowmap.cpp; fake and autograd kernels in pyflowmap/ops/losses.py). The plain loss is
// the central-difference one without `minus` and with scale 1: the four ops share one prepare
// and one pair of launchers per backend.
#include "common/checks.h"
#include "common/cpu_dispatch.h"
#include "common/cuda_glue.h"
#include "common/dispatch.h"
#include "common/format.h"
#include "flowmap_loss/flowmap_loss.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>

namespace pyflowmap::flowmap_loss {
namespace {

// The dtypes of `pred` the kernels are instantiated for (flowmap_loss_cpu.cpp,
// flowmap_loss.cu); weights and per-sample values are in acc_type of it.
using CpuTypes = dtypes<float, double, c10::BFloat16>;
using CudaTypes = dtypes<float, double, c10::BFloat16, c10::Half>;

using Opt = std::optional<at::Tensor>;

struct LossArgs {
  const char* op;
  at::Tensor pred, minus, target, weight;  // contiguous; minus / target / weight undefined when absent
  int64_t batch, inner;
  double scale;
  Metric metric;
  double c;
  at::Tensor grad_loss, grad_m, m;  // the backward's (grad_m undefined when absent); undefined for the forward
};

Metric parse_metric(std::string_view metric, double c, const char* op) {
  TORCH_CHECK(std::isfinite(c) && c >= 0, op, ": `c` must be finite and >= 0, got ", std::to_string(c));
  if (metric == "l2sq") return Metric::kL2Sq;
  if (metric == "pseudo_huber") return Metric::kPseudoHuber;
  TORCH_CHECK(false, op, ": `metric` must be 'l2sq' or 'pseudo_huber', got '", std::string(metric), "'");
}

// The forward's checks for every device; `minus` undefined and scale 1 for the plain loss.
LossArgs prepare(const at::Tensor& pred, const at::Tensor& minus, const Opt& target_in, const Opt& weight_in,
                 double scale, std::string_view metric, double c, const char* op) {
  const Metric mt = parse_metric(metric, c, op);
  TORCH_CHECK(std::isfinite(scale) && scale > 0, op, ": `inv_2h` must be finite and positive");
  TORCH_CHECK(pred.dim() >= 1, op, ": `pred` must have a batch dimension");
  TORCH_CHECK(pred.size(0) > 0, op, ": empty batch (`pred` has batch size 0)");
  check_floating(pred, op, "pred", CpuTypes::scalar_types, CudaTypes::scalar_types);
  const at::Tensor target = value_or_undefined(target_in), weight = value_or_undefined(weight_in);
  if (minus.defined()) check_like(minus, pred, op, "minus", "pred");
  if (target.defined()) check_like(target, pred, op, "target", "pred");
  if (weight.defined()) check_batch_vector(weight, pred, op, "weight", "pred");
  auto contiguous = [](const at::Tensor& t) { return t.defined() ? t.contiguous() : t; };
  return {op, pred.contiguous(), contiguous(minus), contiguous(target), contiguous(weight), pred.size(0),
          pred.numel() / pred.size(0), scale, mt, c};
}

// ... and the backward's.
LossArgs prepare_backward(const at::Tensor& grad_loss, const Opt& grad_m, const at::Tensor& pred,
                          const at::Tensor& minus, const Opt& target, const Opt& weight, const at::Tensor& m,
                          double scale, std::string_view metric, double c, const char* op) {
  LossArgs a = prepare(pred, minus, target, weight, scale, metric, c, op);
  TORCH_CHECK(grad_loss.numel() == 1, op, ": `grad_loss` must be a scalar");
  check_saved(m, m.dim() == 1 && m.size(0) == a.batch, acc_type(pred.scalar_type()), pred, op, "per_sample",
              "[batch] output");
  a.grad_loss = grad_loss;
  a.grad_m = value_or_undefined(grad_m);
  TORCH_CHECK(!a.grad_m.defined() || (a.grad_m.dim() == 1 && a.grad_m.size(0) == a.batch), op,
              ": `grad_per_sample` must have shape [batch]");
  a.m = m.contiguous();
  return a;
}

template <typename T>
Residual<T> residual(const LossArgs& a) {
  return {cptr<T>(a.pred), cptr<T>(a.minus), cptr<T>(a.target), a.scale};
}

std::tuple<at::Tensor, at::Tensor> loss_forward_cpu(const LossArgs& a) {
  check_backend(a.pred, a.op, "pred", c10::DeviceType::CPU);
  at::Tensor m = at::empty({a.batch}, a.pred.options().dtype(acc_type(a.pred.scalar_type())));
  at::Tensor loss = at::empty({}, m.options());
  dispatch_types(CpuTypes{}, a.pred.scalar_type(), a.op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Acc = acc_t<T>;
    const double mean =
        forward_cpu<T, Acc>(residual<T>(a), cptr<Acc>(a.weight), mptr<Acc>(m), a.batch, a.inner, a.metric, a.c);
    mptr<Acc>(loss)[0] = narrow<Acc>(mean);  // overflow is inf, as in the twin
  });
  return {loss, m};
}

at::Tensor loss_backward_cpu(const LossArgs& a) {
  check_backend(a.pred, a.op, "pred", c10::DeviceType::CPU);
  const auto acc = acc_type(a.pred.scalar_type());
  const double g_loss = a.grad_loss.to(at::kDouble).cpu().const_data_ptr<double>()[0];
  const at::Tensor gm = a.grad_m.defined() ? a.grad_m.to(acc).contiguous() : at::Tensor();
  at::Tensor coef = at::empty({a.batch}, a.m.options());
  at::Tensor dpred = at::empty(a.pred.sizes(), a.pred.options());
  dispatch_types(CpuTypes{}, a.pred.scalar_type(), a.op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Acc = acc_t<T>;
    backward_cpu<T, Acc>(residual<T>(a), cptr<Acc>(a.weight), cptr<Acc>(a.m), g_loss, cptr<Acc>(gm),
                         mptr<Acc>(coef), mptr<T>(dpred), a.batch, a.inner, a.metric, a.c);
  });
  return dpred;
}

#ifdef PYFLOWMAP_WITH_CUDA
template <typename TT>
Residual<cuda_type_t<TT>> residual_cuda(const LossArgs& a) {
  return {cuda_cptr<TT>(a.pred), cuda_cptr<TT>(a.minus), cuda_cptr<TT>(a.target), a.scale};
}

std::tuple<at::Tensor, at::Tensor> loss_forward_cuda(const LossArgs& a) {
  check_backend(a.pred, a.op, "pred", c10::DeviceType::CUDA);
  TORCH_CHECK(a.inner <= 16 || a.batch <= INT32_MAX, a.op, ": more than 2^31 rows are not supported on CUDA");
  const c10::cuda::CUDAGuard guard(a.pred.device());
  at::Tensor m = at::empty({a.batch}, a.pred.options().dtype(acc_type(a.pred.scalar_type())));
  at::Tensor loss = at::empty({}, m.options());
  dispatch_types(CudaTypes{}, a.pred.scalar_type(), a.op, [&](auto tag) {
    using TT = typename decltype(tag)::type;
    using Acc = acc_t<TT>;
    PYFLOWMAP_CHECK_LAUNCH((forward_cuda<cuda_type_t<TT>, Acc>(residual_cuda<TT>(a), cptr<Acc>(a.weight),
                                                                mptr<Acc>(m), mptr<Acc>(loss), a.batch, a.inner,
                                                                a.metric, a.c, current_stream())),
                           a.op);
  });
  return {loss, m};
}

at::Tensor loss_backward_cuda(const LossArgs& a) {
  check_backend(a.pred, a.op, "pred", c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(a.pred.device());
  const auto acc = acc_type(a.pred.scalar_type());
  const at::Tensor gl = a.grad_loss.to(a.pred.device(), acc).contiguous();
  const at::Tensor gm = a.grad_m.defined() ? a.grad_m.to(a.pred.device(), acc).contiguous() : at::Tensor();
  at::Tensor coef = at::empty({a.batch}, a.m.options());
  at::Tensor dpred = at::empty(a.pred.sizes(), a.pred.options());
  dispatch_types(CudaTypes{}, a.pred.scalar_type(), a.op, [&](auto tag) {
    using TT = typename decltype(tag)::type;
    using Acc = acc_t<TT>;
    PYFLOWMAP_CHECK_LAUNCH((backward_cuda<cuda_type_t<TT>, Acc>(residual_cuda<TT>(a), cptr<Acc>(a.weight),
                                                                 cptr<Acc>(a.m), cptr<Acc>(gl), cptr<Acc>(gm),
                                                                 mptr<Acc>(coef), cuda_mptr<TT>(dpred), a.batch,
                                                                 a.inner, a.metric, a.c, current_stream())),
                           a.op);
  });
  return dpred;
}
#endif

// The schemas' entries for backend Forward / Backward (the functions above).
template <auto Forward>
std::tuple<at::Tensor, at::Tensor> flowmap_loss_entry(const at::Tensor& pred, const Opt& target, const Opt& weight,
                                                      std::string_view metric, double c) {
  return Forward(prepare(pred, at::Tensor(), target, weight, 1.0, metric, c, "flowmap_loss"));
}

template <auto Backward>
at::Tensor flowmap_loss_backward_entry(const at::Tensor& grad_loss, const Opt& grad_m, const at::Tensor& pred,
                                       const Opt& target, const Opt& weight, const at::Tensor& m,
                                       std::string_view metric, double c) {
  return Backward(prepare_backward(grad_loss, grad_m, pred, at::Tensor(), target, weight, m, 1.0, metric, c,
                                   "flowmap_loss_backward"));
}

template <auto Forward>
std::tuple<at::Tensor, at::Tensor> flowmap_fd_loss_entry(const at::Tensor& plus, const at::Tensor& minus,
                                                         const Opt& target, const Opt& weight, double inv_2h,
                                                         std::string_view metric, double c) {
  return Forward(prepare(plus, minus, target, weight, inv_2h, metric, c, "flowmap_fd_loss"));
}

template <auto Backward>
at::Tensor flowmap_fd_loss_backward_entry(const at::Tensor& grad_loss, const Opt& grad_m, const at::Tensor& plus,
                                          const at::Tensor& minus, const Opt& target, const Opt& weight,
                                          const at::Tensor& m, double inv_2h, std::string_view metric, double c) {
  return Backward(prepare_backward(grad_loss, grad_m, plus, minus, target, weight, m, inv_2h, metric, c,
                                   "flowmap_fd_loss_backward"));
}

}  // namespace

TORCH_LIBRARY_IMPL(pyflowmap, CPU, m) {
  m.impl("flowmap_loss", &flowmap_loss_entry<loss_forward_cpu>);
  m.impl("flowmap_loss_backward", &flowmap_loss_backward_entry<loss_backward_cpu>);
  m.impl("flowmap_fd_loss", &flowmap_fd_loss_entry<loss_forward_cpu>);
  m.impl("flowmap_fd_loss_backward", &flowmap_fd_loss_backward_entry<loss_backward_cpu>);
}

#ifdef PYFLOWMAP_WITH_CUDA
TORCH_LIBRARY_IMPL(pyflowmap, CUDA, m) {
  m.impl("flowmap_loss", &flowmap_loss_entry<loss_forward_cuda>);
  m.impl("flowmap_loss_backward", &flowmap_loss_backward_entry<loss_backward_cuda>);
  m.impl("flowmap_fd_loss", &flowmap_fd_loss_entry<loss_forward_cuda>);
  m.impl("flowmap_fd_loss_backward", &flowmap_fd_loss_backward_entry<loss_backward_cuda>);
}
#endif

}  // namespace pyflowmap::flowmap_loss
