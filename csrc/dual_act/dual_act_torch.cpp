// Torch glue of pyflowmap::dual_act and dual_act_backward (schemas in csrc/pyflowmap.cpp;
// fake and autograd kernels in pyflowmap/ops/dual_act.py).
#include "common/checks.h"
#include "common/cuda_glue.h"
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
  const bool half_ok = t.is_cuda();  // the CUDA kernel also covers float16
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || (half_ok && dt == at::kHalf), op,
              ": `", name, "` must be float32, float64 or bfloat16", half_ok ? " or float16" : "", ", got ", dt);
}

void check_same(const at::Tensor& a, const at::Tensor& b, const char* op) {
  TORCH_CHECK(a.sizes() == b.sizes(), op, ": `grad` shape ", fmt(a.sizes()), " differs from `zz` shape ",
              fmt(b.sizes()));
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": `grad` dtype ", a.scalar_type(),
              " differs from `zz` dtype ", b.scalar_type());
  TORCH_CHECK(a.device() == b.device(), op, ": `grad` is on ", a.device(), " but `zz` is on ", b.device());
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
  TORCH_CHECK(zz_in.device().is_cpu(), "dual_act (CPU kernel): `zz` must be on the CPU");
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
  check_same(grad_in, zz_in, "dual_act_backward");
  TORCH_CHECK(zz_in.device().is_cpu(), "dual_act_backward (CPU kernel): `zz` must be on the CPU");
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

#ifdef PYFLOWMAP_WITH_CUDA
at::Tensor dual_act_cuda(const at::Tensor& zz_in, std::string_view kind) {
  check_input(zz_in, "dual_act", "zz");
  TORCH_CHECK(zz_in.is_cuda(), "dual_act (CUDA kernel): `zz` must be a CUDA tensor");
  const Kind k = parse_kind(kind);
  const c10::cuda::CUDAGuard guard(zz_in.device());
  const at::Tensor zz = zz_in.contiguous();
  at::Tensor out = at::empty(zz.sizes(), zz.options());
  const int64_t n = zz.numel() / 2;
  PYFLOWMAP_CUDA_DISPATCH(zz.scalar_type(), "dual_act", {
    const T* z = cptr<T, TT>(zz);
    T* y = mptr<T, TT>(out);
    PYFLOWMAP_CHECK_LAUNCH(forward_cuda<T>(z, z + n, y, y + n, n, k, current_stream()), "dual_act");
  })
  return out;
}

at::Tensor dual_act_backward_cuda(const at::Tensor& grad_in, const at::Tensor& zz_in, std::string_view kind) {
  check_input(zz_in, "dual_act_backward", "zz");
  check_input(grad_in, "dual_act_backward", "grad");
  check_same(grad_in, zz_in, "dual_act_backward");
  TORCH_CHECK(zz_in.is_cuda(), "dual_act_backward (CUDA kernel): `zz` must be a CUDA tensor");
  const Kind k = parse_kind(kind);
  const c10::cuda::CUDAGuard guard(zz_in.device());
  const at::Tensor zz = zz_in.contiguous(), g = grad_in.contiguous();
  at::Tensor out = at::empty(zz.sizes(), zz.options());
  const int64_t n = zz.numel() / 2;
  PYFLOWMAP_CUDA_DISPATCH(zz.scalar_type(), "dual_act_backward", {
    const T* z = cptr<T, TT>(zz);
    const T* gp = cptr<T, TT>(g);
    T* o = mptr<T, TT>(out);
    PYFLOWMAP_CHECK_LAUNCH(backward_cuda<T>(gp, gp + n, z, z + n, o, o + n, n, k, current_stream()),
                           "dual_act_backward");
  })
  return out;
}
#endif

}  // namespace

TORCH_LIBRARY_IMPL(pyflowmap, CPU, m) {
  m.impl("dual_act", &dual_act_cpu);
  m.impl("dual_act_backward", &dual_act_backward_cpu);
}

#ifdef PYFLOWMAP_WITH_CUDA
TORCH_LIBRARY_IMPL(pyflowmap, CUDA, m) {
  m.impl("dual_act", &dual_act_cuda);
  m.impl("dual_act_backward", &dual_act_backward_cuda);
}
#endif

}  // namespace pyflowmap::dual_act
