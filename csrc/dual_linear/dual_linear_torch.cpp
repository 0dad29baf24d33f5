// pyflowmap::dual_linear: y = [x; x_dot] W^T with the bias on the primal half only. One GEMM
// over all 2B rows (W read once) and the bias added in place, so the layer is one autograd
// node with no concatenation. Written with ATen ops, so one CompositeExplicitAutograd kernel
// serves every device; the backward (pyflowmap/ops/dual_linear.py) is two GEMMs and a sum.
#include "common/checks.h"
#include "common/format.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <optional>

namespace pyflowmap::dual_linear {
namespace {

at::Tensor dual_linear(const at::Tensor& xx, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias) {
  check_stacked(xx, "dual_linear", "xx", /*min_dim=*/2);
  TORCH_CHECK(weight.dim() == 2, "dual_linear: `weight` must be [out, in], got ", fmt(weight.sizes()));
  TORCH_CHECK(xx.size(-1) == weight.size(1), "dual_linear: `xx` has ", fmt(xx.size(-1)),
              " features but `weight` expects ", fmt(weight.size(1)));
  check_same_dtype(xx, weight, "dual_linear", "xx", "weight");
  check_same_device(xx, weight, "dual_linear", "xx", "weight");
  const int64_t out_features = weight.size(0);
  const at::Tensor x2 = xx.reshape({-1, xx.size(-1)});
  at::Tensor y = at::mm(x2, weight.t());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_features,
                "dual_linear: `bias` must have shape [", fmt(out_features), "], got ", fmt(bias->sizes()));
    check_same_dtype(*bias, xx, "dual_linear", "bias", "xx");
    check_same_device(*bias, xx, "dual_linear", "bias", "xx");
    y.narrow(0, 0, x2.size(0) / 2).add_(*bias);  // stacking is along dim 0: the first half of the rows is primal
  }
  std::vector<int64_t> shape(xx.sizes().begin(), xx.sizes().end());
  shape.back() = out_features;
  return y.view(shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyflowmap, CompositeExplicitAutograd, m) { m.impl("dual_linear", &dual_linear); }

}  // namespace pyflowmap::dual_linear
