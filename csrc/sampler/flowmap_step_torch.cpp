// Torch glue of pyflowmap::flowmap_step: argument checks, allocation, per-backend registration.
// The schema lives in csrc/pyflowmap.cpp; fake and autograd kernels in pyflowmap/ops/sampler.py.
#include "common/format.h"
#include "sampler/flowmap_step.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>
#include <torch/library.h>

#include "common/cuda_glue.h"

namespace pyflowmap::sampler {
namespace {

struct StepArgs {
  at::Tensor x, v, s, t;  // contiguous
  int64_t batch, inner, s_stride, t_stride;
};

// Times are float32 for 16/32-bit states (bf16 times would be off by ~4e-3 near t = 1) and
// float64 for float64 states; every other combination is refused rather than cast silently.
at::ScalarType time_dtype_for(at::ScalarType x_dtype) {
  return x_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

void check_time(const at::Tensor& time, const char* name, const at::Tensor& x) {
  TORCH_CHECK(time.dim() == 0 || (time.dim() == 1 && time.size(0) == x.size(0)),
              "flowmap_step: `", name, "` must be a scalar tensor or have shape [batch] = [",
              fmt(x.size(0)), "], got ", fmt(time.sizes()));
  TORCH_CHECK(time.scalar_type() == time_dtype_for(x.scalar_type()), "flowmap_step: `", name,
              "` must have dtype ", time_dtype_for(x.scalar_type()), " for x of dtype ",
              x.scalar_type(), ", got ", time.scalar_type());
  TORCH_CHECK(time.device() == x.device(), "flowmap_step: `", name, "` is on ", time.device(),
              " but x is on ", x.device(), "; keep the time grid on the state's device");
}

StepArgs prepare(const at::Tensor& x, const at::Tensor& v, const at::Tensor& s,
                 const at::Tensor& t) {
  TORCH_CHECK(x.dim() >= 1, "flowmap_step: `x` must have a batch dimension, got a scalar");
  TORCH_CHECK(v.sizes() == x.sizes(), "flowmap_step: `v` must have the shape of `x` ", fmt(x.sizes()),
              ", got ", fmt(v.sizes()));
  TORCH_CHECK(v.scalar_type() == x.scalar_type(), "flowmap_step: `v` has dtype ", v.scalar_type(),
              " but `x` has dtype ", x.scalar_type());
  TORCH_CHECK(v.device() == x.device(), "flowmap_step: `v` is on ", v.device(), " but `x` is on ",
              x.device());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
              "flowmap_step: `x` must be float32, float64, bfloat16 or float16, got ", dt);
  check_time(s, "s", x);
  check_time(t, "t", x);
  StepArgs a{x.contiguous(), v.contiguous(), s.contiguous(), t.contiguous(), x.size(0), 0,
             s.dim() == 0 ? 0 : 1, t.dim() == 0 ? 0 : 1};
  a.inner = a.batch == 0 ? 0 : x.numel() / a.batch;
  return a;
}

at::Tensor flowmap_step_cpu_impl(const at::Tensor& x, const at::Tensor& v, const at::Tensor& s,
                                 const at::Tensor& t) {
  TORCH_CHECK(x.device().is_cpu(), "flowmap_step (CPU kernel): `x` must be on the CPU");
  StepArgs a = prepare(x, v, s, t);
  at::Tensor out = at::empty(x.sizes(), a.x.options());
  switch (x.scalar_type()) {
#define PYFLOWMAP_CASE(ST, T, TimeT)                                                            \
  case ST:                                                                                    \
    flowmap_step_cpu<T, TimeT>(a.x.const_data_ptr<T>(), a.v.const_data_ptr<T>(),              \
                               a.s.const_data_ptr<TimeT>(), a.t.const_data_ptr<TimeT>(),      \
                               out.mutable_data_ptr<T>(), a.batch, a.inner, a.s_stride,       \
                               a.t_stride);                                                   \
    break;
    PYFLOWMAP_CASE(at::kFloat, float, float)
    PYFLOWMAP_CASE(at::kDouble, double, double)
    PYFLOWMAP_CASE(at::kBFloat16, c10::BFloat16, float)
    PYFLOWMAP_CASE(at::kHalf, c10::Half, float)
#undef PYFLOWMAP_CASE
    default:
      TORCH_CHECK(false, "flowmap_step: unsupported dtype ", x.scalar_type());
  }
  return out;
}

#ifdef PYFLOWMAP_WITH_CUDA
at::Tensor flowmap_step_cuda_impl(const at::Tensor& x, const at::Tensor& v, const at::Tensor& s,
                                  const at::Tensor& t) {
  TORCH_CHECK(x.is_cuda(), "flowmap_step (CUDA kernel): `x` must be a CUDA tensor");
  StepArgs a = prepare(x, v, s, t);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), a.x.options());
  cudaStream_t stream = current_stream();
  int err = 0;
  switch (x.scalar_type()) {
#define PYFLOWMAP_CASE(ST, T, TT, TimeT)                                                        \
  case ST:                                                                                    \
    err = flowmap_step_cuda<T, TimeT>(                                                        \
        reinterpret_cast<const T*>(a.x.const_data_ptr<TT>()),                                 \
        reinterpret_cast<const T*>(a.v.const_data_ptr<TT>()), a.s.const_data_ptr<TimeT>(),    \
        a.t.const_data_ptr<TimeT>(), reinterpret_cast<T*>(out.mutable_data_ptr<TT>()),        \
        a.batch, a.inner, a.s_stride, a.t_stride, stream);                                    \
    break;
    PYFLOWMAP_CASE(at::kFloat, float, float, float)
    PYFLOWMAP_CASE(at::kDouble, double, double, double)
    PYFLOWMAP_CASE(at::kBFloat16, __nv_bfloat16, c10::BFloat16, float)
    PYFLOWMAP_CASE(at::kHalf, __half, c10::Half, float)
#undef PYFLOWMAP_CASE
    default:
      TORCH_CHECK(false, "flowmap_step: unsupported dtype ", x.scalar_type());
  }
  TORCH_CHECK(err == 0, "flowmap_step: CUDA launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
  return out;
}
#endif

}  // namespace

TORCH_LIBRARY_IMPL(pyflowmap, CPU, m) { m.impl("flowmap_step", &flowmap_step_cpu_impl); }

#ifdef PYFLOWMAP_WITH_CUDA
TORCH_LIBRARY_IMPL(pyflowmap, CUDA, m) { m.impl("flowmap_step", &flowmap_step_cuda_impl); }
#endif

}  // namespace pyflowmap::sampler
