// Torch glue of pyflowmap::dual_act and dual_act_backward (schemas in csrc/pyflowmap.cpp;
// fake and autograd kernels in pyflowmap/ops/dual_act.py).
#include "common/checks.h"
#include "common/format.h"
#include "dual_act/dual_act.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <string_view>

namespace pyflowmap::dual_act {
namespace {

Kind parse_kind(std::string_view kind) {
  if (kind == "gelu") return Kind::kGelu;
  if (kind == "silu") return Kind::kSilu;
  TORCH_CHECK(false, "dual_act: `kind` must be 'gelu' or 'silu', got '", std::string(kind), "'");
}

void check_input(const at::Tensor& t, const char* op, const char* name) {
  check_stacked(t, op, name);
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16, op, ": `", name,
              "` must be float32, float64 or bfloat16, got ", dt);
  TORCH_CHECK(t.device().is_cpu(), op, " (CPU kernel): `", name, "` must be on the CPU");
}

#define PYFLOWMAP_DISPATCH(DT, ...)                                                   \
  switch (DT) {                                                                      \
    case at::kFloat: { using T = float; __VA_ARGS__; break; }                        \
    case at::kDouble: { using T = double; __VA_ARGS__; break; }                      \
    case at::kBFloat16: { using T = c10::BFloat16; __VA_ARGS__; break; }             \
    default: TORCH_CHECK(false, "dual_act: unsupported dtype ", DT);                 \
  }

at::Tensor dual_act_cpu(const at::Tensor& zz_in, std::string_view kind) {
  check_input(zz_in, "dual_act", "zz");
  const Kind k = parse_kind(kind);
  const at::Tensor zz = zz_in.contiguous();
  at::Tensor out = at::empty(zz.sizes(), zz.options());
  const int64_t n = zz.numel() / 2;
  PYFLOWMAP_DISPATCH(zz.scalar_type(), {
    const T* z = zz.const_data_ptr<T>();
    T* y = out.mutable_data_ptr<T>();
    forward_cpu<T>(z, z + n, y, y + n, n, k);
  })
  return out;
}

at::Tensor dual_act_backward_cpu(const at::Tensor& grad_in, const at::Tensor& zz_in,
                                 std::string_view kind) {
  check_input(zz_in, "dual_act_backward", "zz");
  check_input(grad_in, "dual_act_backward", "grad");
  TORCH_CHECK(grad_in.sizes() == zz_in.sizes(), "dual_act_backward: `grad` shape ",
              fmt(grad_in.sizes()), " differs from `zz` shape ", fmt(zz_in.sizes()));
  TORCH_CHECK(grad_in.scalar_type() == zz_in.scalar_type(), "dual_act_backward: `grad` dtype ",
              grad_in.scalar_type(), " differs from `zz` dtype ", zz_in.scalar_type());
  const Kind k = parse_kind(kind);
  const at::Tensor zz = zz_in.contiguous();
  const at::Tensor g = grad_in.contiguous();
  at::Tensor out = at::empty(zz.sizes(), zz.options());
  const int64_t n = zz.numel() / 2;
  PYFLOWMAP_DISPATCH(zz.scalar_type(), {
    const T* z = zz.const_data_ptr<T>();
    const T* gp = g.const_data_ptr<T>();
    T* o = out.mutable_data_ptr<T>();
    backward_cpu<T>(gp, gp + n, z, z + n, o, o + n, n, k);
  })
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyflowmap, CPU, m) {
  m.impl("dual_act", &dual_act_cpu);
  m.impl("dual_act_backward", &dual_act_backward_cpu);
}

}  // namespace pyflowmap::dual_act
