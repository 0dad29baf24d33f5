// Torch glue of pyflowmap::flowmap_step: argument checks, allocation, per-backend registration.
// The schema lives in csrc/pyflowmap.cpp; fake and autograd kernels in pyflowmap/ops/sampler.py.
#include "common/checks.h"
#include "common/cuda_glue.h"
#include "common/dispatch.h"
#include "sampler/flowmap_step.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <utility>

namespace pyflowmap::sampler {
namespace {

constexpr const char* kOp = "flowmap_step";

// The state dtypes the kernels are instantiated for (flowmap_step_cpu.cpp, flowmap_step.cu).
// Times are in acc_type of the state (bf16 times would be off by ~4e-3 near t = 1); every
// other combination is refused rather than cast silently.
using CpuTypes = dtypes<float, double, c10::BFloat16, c10::Half>;
using CudaTypes = CpuTypes;

struct StepArgs {
  at::Tensor x, v, s, t;  // contiguous
  int64_t batch, inner, s_stride, t_stride;
};

// The checks for every device.
StepArgs prepare(const at::Tensor& x, const at::Tensor& v, const at::Tensor& s, const at::Tensor& t) {
  TORCH_CHECK(x.dim() >= 1, kOp, ": `x` must have a batch dimension, got a scalar");
  check_like(v, x, kOp, "v", "x");
  check_floating(x, kOp, "x", CpuTypes::scalar_types, CudaTypes::scalar_types);
  for (const auto& [time, name] : {std::pair{&s, "s"}, std::pair{&t, "t"}}) {
    check_batch_vector(*time, x, kOp, name, "x", /*allow_scalar=*/true, "keep the time grid on the state's device");
  }
  StepArgs a{x.contiguous(), v.contiguous(), s.contiguous(), t.contiguous(), x.size(0), 0,
             s.dim() == 0 ? 0 : 1, t.dim() == 0 ? 0 : 1};
  a.inner = a.batch == 0 ? 0 : x.numel() / a.batch;
  return a;
}

at::Tensor flowmap_step_cpu(const StepArgs& a) {
  check_backend(a.x, kOp, "x", c10::DeviceType::CPU);
  at::Tensor out = at::empty(a.x.sizes(), a.x.options());
  dispatch_types(CpuTypes{}, a.x.scalar_type(), kOp, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using TimeT = acc_t<T>;
    forward_cpu<T, TimeT>(cptr<T>(a.x), cptr<T>(a.v), cptr<TimeT>(a.s), cptr<TimeT>(a.t), mptr<T>(out), a.batch,
                          a.inner, a.s_stride, a.t_stride);
  });
  return out;
}

#ifdef PYFLOWMAP_WITH_CUDA
at::Tensor flowmap_step_cuda(const StepArgs& a) {
  check_backend(a.x, kOp, "x", c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(a.x.device());
  at::Tensor out = at::empty(a.x.sizes(), a.x.options());
  dispatch_types(CudaTypes{}, a.x.scalar_type(), kOp, [&](auto tag) {
    using TT = typename decltype(tag)::type;
    using T = cuda_type_t<TT>;
    using TimeT = acc_t<TT>;
    PYFLOWMAP_CHECK_LAUNCH((forward_cuda<T, TimeT>(cuda_cptr<TT>(a.x), cuda_cptr<TT>(a.v), cptr<TimeT>(a.s),
                                                   cptr<TimeT>(a.t), cuda_mptr<TT>(out), a.batch, a.inner,
                                                   a.s_stride, a.t_stride, current_stream())),
                           kOp);
  });
  return out;
}
#endif

// The schema's entry for backend Run (flowmap_step_cpu / flowmap_step_cuda).
template <auto Run>
at::Tensor flowmap_step_entry(const at::Tensor& x, const at::Tensor& v, const at::Tensor& s, const at::Tensor& t) {
  return Run(prepare(x, v, s, t));
}

}  // namespace

TORCH_LIBRARY_IMPL(pyflowmap, CPU, m) { m.impl("flowmap_step", &flowmap_step_entry<flowmap_step_cpu>); }

#ifdef PYFLOWMAP_WITH_CUDA
TORCH_LIBRARY_IMPL(pyflowmap, CUDA, m) { m.impl("flowmap_step", &flowmap_step_entry<flowmap_step_cuda>); }
#endif

}  // namespace pyflowmap::sampler
