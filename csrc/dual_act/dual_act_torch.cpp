// Torch glue of pyflowmap::dual_act and dual_act_backward (schemas in csrc/pyflowmap.cpp;
// fake and autograd kernels in pyflowmap/ops/dual_act.py).
#include "common/checks.h"
#include "common/cuda_glue.h"
#include "common/dispatch.h"
#include "dual_act/dual_act.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <string_view>
#include <utility>

namespace pyflowmap::dual_act {
namespace {

Kind parse_kind(std::string_view kind, const char* op) {
  if (kind == "gelu") return Kind::kGelu;
  if (kind == "silu") return Kind::kSilu;
  TORCH_CHECK(false, op, ": `kind` must be 'gelu' or 'silu', got '", std::string(kind), "'");
}

// The dtypes the kernels are instantiated for (dual_act_cpu.cpp, dual_act.cu).
using CpuTypes = dtypes<float, double, c10::BFloat16>;
using CudaTypes = dtypes<float, double, c10::BFloat16, c10::Half>;

struct ActArgs {
  const char* op;
  at::Tensor zz, grad;  // contiguous; grad undefined for the forward
  int64_t n;            // elements per half
  Kind kind;
};

// The checks of both ops for every device; `grad` is undefined for the forward.
ActArgs prepare(const at::Tensor& zz, const at::Tensor& grad, std::string_view kind, const char* op) {
  for (const auto& [t, name] : {std::pair{&zz, "zz"}, std::pair{&grad, "grad"}}) {
    if (!t->defined()) continue;
    check_stacked(*t, op, name);
    check_floating(*t, op, name, CpuTypes::scalar_types, CudaTypes::scalar_types);
  }
  if (grad.defined()) check_like(grad, zz, op, "grad", "zz");
  const Kind k = parse_kind(kind, op);
  return {op, zz.contiguous(), grad.defined() ? grad.contiguous() : at::Tensor(), zz.numel() / 2, k};
}

// One function per backend serves both ops: the backward when `grad` is given.
at::Tensor dual_act_cpu(const ActArgs& a) {
  check_backend(a.zz, a.op, "zz", c10::DeviceType::CPU);
  at::Tensor out = at::empty(a.zz.sizes(), a.zz.options());
  dispatch_types(CpuTypes{}, a.zz.scalar_type(), a.op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T *z = cptr<T>(a.zz), *g = cptr<T>(a.grad);
    T* o = mptr<T>(out);
    if (g) {
      backward_cpu<T>(g, g + a.n, z, z + a.n, o, o + a.n, a.n, a.kind);
    } else {
      forward_cpu<T>(z, z + a.n, o, o + a.n, a.n, a.kind);
    }
  });
  return out;
}

#ifdef PYFLOWMAP_WITH_CUDA
at::Tensor dual_act_cuda(const ActArgs& a) {
  check_backend(a.zz, a.op, "zz", c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(a.zz.device());
  at::Tensor out = at::empty(a.zz.sizes(), a.zz.options());
  dispatch_types(CudaTypes{}, a.zz.scalar_type(), a.op, [&](auto tag) {
    using TT = typename decltype(tag)::type;
    using T = cuda_type_t<TT>;
    const T *z = cuda_cptr<TT>(a.zz), *g = cuda_cptr<TT>(a.grad);
    T* o = cuda_mptr<TT>(out);
    PYFLOWMAP_CHECK_LAUNCH(g ? backward_cuda<T>(g, g + a.n, z, z + a.n, o, o + a.n, a.n, a.kind, current_stream())
                             : forward_cuda<T>(z, z + a.n, o, o + a.n, a.n, a.kind, current_stream()),
                           a.op);
  });
  return out;
}
#endif

// The schemas' entries for backend Run (dual_act_cpu / dual_act_cuda).
template <auto Run>
at::Tensor dual_act_entry(const at::Tensor& zz, std::string_view kind) {
  return Run(prepare(zz, at::Tensor(), kind, "dual_act"));
}

template <auto Run>
at::Tensor dual_act_backward_entry(const at::Tensor& grad, const at::Tensor& zz, std::string_view kind) {
  return Run(prepare(zz, grad, kind, "dual_act_backward"));
}

}  // namespace

TORCH_LIBRARY_IMPL(pyflowmap, CPU, m) {
  m.impl("dual_act", &dual_act_entry<dual_act_cpu>);
  m.impl("dual_act_backward", &dual_act_backward_entry<dual_act_cpu>);
}

#ifdef PYFLOWMAP_WITH_CUDA
TORCH_LIBRARY_IMPL(pyflowmap, CUDA, m) {
  m.impl("dual_act", &dual_act_entry<dual_act_cuda>);
  m.impl("dual_act_backward", &dual_act_backward_entry<dual_act_cuda>);
}
#endif

}  // namespace pyflowmap::dual_act
