// Torch glue of pyflowmap::flowmap_loss and flowmap_loss_backward (schemas in
// csrc/pyflowmap.cpp; fake and autograd kernels in pyflowmap/ops/losses.py).
#include "common/cuda_glue.h"
#include "common/format.h"
#include "flowmap_loss/flowmap_loss.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <string_view>
#include <tuple>
#include <type_traits>

namespace pyflowmap::flowmap_loss {
namespace {

Metric parse_metric(std::string_view metric, double c) {
  TORCH_CHECK(std::isfinite(c) && c >= 0, "flowmap_loss: `c` must be finite and >= 0, got ",
              std::to_string(c));
  if (metric == "l2sq") return Metric::kL2Sq;
  if (metric == "pseudo_huber") return Metric::kPseudoHuber;
  TORCH_CHECK(false, "flowmap_loss: `metric` must be 'l2sq' or 'pseudo_huber', got '",
              std::string(metric), "'");
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

struct Args {
  at::Tensor pred, minus, target, weight;  // contiguous; minus / target / weight undefined when absent
  int64_t batch, inner;
};

void check_like(const at::Tensor& t, const at::Tensor& pred, const char* op, const char* name) {
  TORCH_CHECK(t.sizes() == pred.sizes(), op, ": `", name, "` shape ", fmt(t.sizes()),
              " differs from `pred` shape ", fmt(pred.sizes()));
  TORCH_CHECK(t.scalar_type() == pred.scalar_type(), op, ": `", name, "` dtype ", t.scalar_type(),
              " differs from `pred` dtype ", pred.scalar_type());
  TORCH_CHECK(t.device() == pred.device(), op, ": `", name, "` is on ", t.device(), " but `pred` is on ",
              pred.device());
}

Args prepare(const at::Tensor& pred, const at::Tensor& minus, const std::optional<at::Tensor>& target,
             const std::optional<at::Tensor>& weight, const char* op) {
  TORCH_CHECK(pred.dim() >= 1, op, ": `pred` must have a batch dimension");
  TORCH_CHECK(pred.size(0) > 0, op, ": empty batch (`pred` has batch size 0)");
  const auto dt = pred.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || (pred.is_cuda() && dt == at::kHalf),
              op, ": `pred` must be float32, float64 or bfloat16 (or float16 on CUDA), got ", dt);
  Args a{pred.contiguous(), at::Tensor(), at::Tensor(), at::Tensor(), pred.size(0), 0};
  a.inner = pred.numel() / a.batch;
  if (minus.defined()) {
    check_like(minus, pred, op, "minus");
    a.minus = minus.contiguous();
  }
  if (target.has_value() && target->defined()) {
    check_like(*target, pred, op, "target");
    a.target = target->contiguous();
  }
  if (weight.has_value() && weight->defined()) {
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == a.batch, op,
                ": `weight` must have shape [batch] = [", fmt(a.batch), "], got ", fmt(weight->sizes()));
    TORCH_CHECK(weight->scalar_type() == acc_type(dt), op, ": `weight` must have dtype ",
                acc_type(dt), " for `pred` of dtype ", dt, ", got ", weight->scalar_type());
    TORCH_CHECK(weight->device() == pred.device(), op, ": `weight` is on ", weight->device(),
                " but `pred` is on ", pred.device());
    a.weight = weight->contiguous();
  }
  return a;
}

template <typename T>
Residual<T> residual(const Args& a, double scale) {
  return {a.pred.const_data_ptr<T>(), a.minus.defined() ? a.minus.const_data_ptr<T>() : nullptr,
          a.target.defined() ? a.target.const_data_ptr<T>() : nullptr, scale};
}

#ifdef PYFLOWMAP_WITH_CUDA
template <typename T, typename TT>
Residual<T> residual_cuda(const Args& a, double scale) {
  return {cptr<T, TT>(a.pred), cptr<T, TT>(a.minus), cptr<T, TT>(a.target), scale};
}

std::tuple<at::Tensor, at::Tensor> loss_forward_cuda(const Args& a, double scale, Metric mt, double c) {
  TORCH_CHECK(a.inner <= 16 || a.batch <= INT32_MAX, "flowmap_loss: more than 2^31 rows are not supported on CUDA");
  const c10::cuda::CUDAGuard guard(a.pred.device());
  const auto acc = acc_type(a.pred.scalar_type());
  at::Tensor m = at::empty({a.batch}, a.pred.options().dtype(acc));
  at::Tensor loss = at::empty({}, m.options());
  PYFLOWMAP_CUDA_DISPATCH(a.pred.scalar_type(), "flowmap_loss", {
    using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;
    PYFLOWMAP_CHECK_LAUNCH((forward_cuda<T, Acc>(residual_cuda<T, TT>(a, scale),
                                                  a.weight.defined() ? a.weight.const_data_ptr<Acc>() : nullptr,
                                                  m.mutable_data_ptr<Acc>(), loss.mutable_data_ptr<Acc>(), a.batch,
                                                  a.inner, mt, c, current_stream())),
                           "flowmap_loss");
  })
  return {loss, m};
}

at::Tensor loss_backward_cuda(const Args& a, const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_m,
                              const at::Tensor& m, double scale, Metric mt, double c, const char* op) {
  const c10::cuda::CUDAGuard guard(a.pred.device());
  const auto acc = acc_type(a.pred.scalar_type());
  const at::Tensor gl = grad_loss.to(a.pred.device(), acc).contiguous();
  const bool has_gm = grad_m.has_value() && grad_m->defined();
  const at::Tensor gm = has_gm ? grad_m->to(a.pred.device(), acc).contiguous() : at::Tensor();
  const at::Tensor mc = m.contiguous();
  at::Tensor coef = at::empty({a.batch}, mc.options());
  at::Tensor dpred = at::empty(a.pred.sizes(), a.pred.options());
  PYFLOWMAP_CUDA_DISPATCH(a.pred.scalar_type(), op, {
    using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;
    PYFLOWMAP_CHECK_LAUNCH((backward_cuda<T, Acc>(residual_cuda<T, TT>(a, scale),
                                                   a.weight.defined() ? a.weight.const_data_ptr<Acc>() : nullptr,
                                                   mc.const_data_ptr<Acc>(), gl.const_data_ptr<Acc>(),
                                                   has_gm ? gm.const_data_ptr<Acc>() : nullptr,
                                                   coef.mutable_data_ptr<Acc>(), mptr<T, TT>(dpred), a.batch, a.inner,
                                                   mt, c, current_stream())),
                           op);
  })
  return dpred;
}
#endif

std::tuple<at::Tensor, at::Tensor> loss_forward(const Args& a, double scale, Metric mt, double c) {
#ifdef PYFLOWMAP_WITH_CUDA
  if (a.pred.is_cuda()) return loss_forward_cuda(a, scale, mt, c);
#endif
  TORCH_CHECK(a.pred.device().is_cpu(), "flowmap_loss: `pred` must be on the CPU or a CUDA device");
  const auto acc = acc_type(a.pred.scalar_type());
  at::Tensor m = at::empty({a.batch}, a.pred.options().dtype(acc));
  double total = 0.0;
  switch (a.pred.scalar_type()) {
#define PYFLOWMAP_CASE(ST, T, Acc)                                                               \
  case ST:                                                                                     \
    total = forward_cpu<T, Acc>(residual<T>(a, scale),                                          \
                                a.weight.defined() ? a.weight.const_data_ptr<Acc>() : nullptr, \
                                m.mutable_data_ptr<Acc>(), a.batch, a.inner, mt, c);           \
    break;
    PYFLOWMAP_CASE(at::kFloat, float, float)
    PYFLOWMAP_CASE(at::kDouble, double, double)
    PYFLOWMAP_CASE(at::kBFloat16, c10::BFloat16, float)
#undef PYFLOWMAP_CASE
    default:
      TORCH_CHECK(false, "flowmap_loss: unsupported dtype");
  }
  at::Tensor loss = at::scalar_tensor(total / static_cast<double>(a.batch), m.options());
  return {loss, m};
}

at::Tensor loss_backward(const Args& a, const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_m,
                         const at::Tensor& m, double scale, Metric mt, double c, const char* op) {
  const auto acc = acc_type(a.pred.scalar_type());
  TORCH_CHECK(grad_loss.numel() == 1, op, ": `grad_loss` must be a scalar");
  TORCH_CHECK(m.dim() == 1 && m.size(0) == a.batch && m.scalar_type() == acc && m.device() == a.pred.device(), op,
              ": `per_sample` must be the forward's [batch] output");
  const bool has_gm = grad_m.has_value() && grad_m->defined();
  if (has_gm) {
    TORCH_CHECK(grad_m->dim() == 1 && grad_m->size(0) == a.batch, op, ": `grad_per_sample` must have shape [batch]");
  }
#ifdef PYFLOWMAP_WITH_CUDA
  if (a.pred.is_cuda()) return loss_backward_cuda(a, grad_loss, grad_m, m, scale, mt, c, op);
#endif
  const at::Tensor mc = m.contiguous();
  const at::Tensor gl = grad_loss.to(at::kDouble).cpu();
  const at::Tensor gm = has_gm ? grad_m->to(acc).contiguous() : at::Tensor();
  at::Tensor coef = at::empty({a.batch}, mc.options());
  at::Tensor dpred = at::empty(a.pred.sizes(), a.pred.options());
  const double g0 = gl.const_data_ptr<double>()[0] / static_cast<double>(a.batch);
  switch (a.pred.scalar_type()) {
#define PYFLOWMAP_CASE(ST, T, Acc)                                                              \
  case ST: {                                                                                  \
    const Acc* mp = mc.const_data_ptr<Acc>();                                                 \
    const Acc* wp = a.weight.defined() ? a.weight.const_data_ptr<Acc>() : nullptr;            \
    const Acc* gmp = has_gm ? gm.const_data_ptr<Acc>() : nullptr;                             \
    Acc* cp = coef.mutable_data_ptr<Acc>();                                                   \
    for (int64_t i = 0; i < a.batch; ++i) {                                                   \
      const double outer = g0 * (wp ? static_cast<double>(wp[i]) : 1.0) + (gmp ? gmp[i] : 0.0); \
      /* m'(d): 1 for l2sq; 1 / (2 sqrt(d + c^2)) = 1 / (2 (m + c)) for pseudo-Huber, with  */   \
      /* the subgradient 0 at the kink d = 0 of the plain L2 norm (c = 0).                  */   \
      const double denom = static_cast<double>(mp[i]) + c;                                    \
      const double mprime = mt == Metric::kL2Sq ? 1.0 : (denom > 0 ? 0.5 / denom : 0.0);      \
      cp[i] = static_cast<Acc>(2.0 * outer * mprime);                                         \
    }                                                                                         \
    backward_cpu<T, Acc>(residual<T>(a, scale), cp, dpred.mutable_data_ptr<T>(), a.batch, a.inner); \
    break;                                                                                    \
  }
    PYFLOWMAP_CASE(at::kFloat, float, float)
    PYFLOWMAP_CASE(at::kDouble, double, double)
    PYFLOWMAP_CASE(at::kBFloat16, c10::BFloat16, float)
#undef PYFLOWMAP_CASE
    default:
      TORCH_CHECK(false, op, ": unsupported dtype");
  }
  return dpred;
}

double check_scale(double inv_2h) {
  TORCH_CHECK(std::isfinite(inv_2h) && inv_2h > 0, "flowmap_fd_loss: `inv_2h` must be finite and positive");
  return inv_2h;
}

std::tuple<at::Tensor, at::Tensor> flowmap_loss_entry(const at::Tensor& pred, const std::optional<at::Tensor>& target,
                                                    const std::optional<at::Tensor>& weight,
                                                    std::string_view metric, double c) {
  const Metric mt = parse_metric(metric, c);
  return loss_forward(prepare(pred, at::Tensor(), target, weight, "flowmap_loss"), 1.0, mt, c);
}

at::Tensor flowmap_loss_backward_entry(const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_m,
                                     const at::Tensor& pred, const std::optional<at::Tensor>& target,
                                     const std::optional<at::Tensor>& weight, const at::Tensor& m,
                                     std::string_view metric, double c) {
  const Metric mt = parse_metric(metric, c);
  const Args a = prepare(pred, at::Tensor(), target, weight, "flowmap_loss_backward");
  return loss_backward(a, grad_loss, grad_m, m, 1.0, mt, c, "flowmap_loss_backward");
}

std::tuple<at::Tensor, at::Tensor> flowmap_fd_loss_entry(const at::Tensor& plus, const at::Tensor& minus,
                                                       const std::optional<at::Tensor>& target,
                                                       const std::optional<at::Tensor>& weight, double inv_2h,
                                                       std::string_view metric, double c) {
  const Metric mt = parse_metric(metric, c);
  return loss_forward(prepare(plus, minus, target, weight, "flowmap_fd_loss"), check_scale(inv_2h), mt, c);
}

at::Tensor flowmap_fd_loss_backward_entry(const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_m,
                                        const at::Tensor& plus, const at::Tensor& minus,
                                        const std::optional<at::Tensor>& target,
                                        const std::optional<at::Tensor>& weight, const at::Tensor& m,
                                        double inv_2h, std::string_view metric, double c) {
  const Metric mt = parse_metric(metric, c);
  const Args a = prepare(plus, minus, target, weight, "flowmap_fd_loss_backward");
  return loss_backward(a, grad_loss, grad_m, m, check_scale(inv_2h), mt, c, "flowmap_fd_loss_backward");
}

}  // namespace

TORCH_LIBRARY_IMPL(pyflowmap, CPU, m) {
  m.impl("flowmap_loss", &flowmap_loss_entry);
  m.impl("flowmap_loss_backward", &flowmap_loss_backward_entry);
  m.impl("flowmap_fd_loss", &flowmap_fd_loss_entry);
  m.impl("flowmap_fd_loss_backward", &flowmap_fd_loss_backward_entry);
}

#ifdef PYFLOWMAP_WITH_CUDA
// The same entry points: loss_forward / loss_backward branch on the device.
TORCH_LIBRARY_IMPL(pyflowmap, CUDA, m) {
  m.impl("flowmap_loss", &flowmap_loss_entry);
  m.impl("flowmap_loss_backward", &flowmap_loss_backward_entry);
  m.impl("flowmap_fd_loss", &flowmap_fd_loss_entry);
  m.impl("flowmap_fd_loss_backward", &flowmap_fd_loss_backward_entry);
}
#endif

}  // namespace pyflowmap::flowmap_loss
