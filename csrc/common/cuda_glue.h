// Torch-side helpers for the CUDA registrations (included only in CUDA builds): the current
// stream, a device guard, and the dtype switch that maps torch's 16-bit types onto CUDA's.
#pragma once

#ifdef PYFLOWMAP_WITH_CUDA
#include <ATen/core/Tensor.h>
// c10/cuda only (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE headers): the
// glue then compile-checks against a CUDA torch's headers plus cudart alone.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

// Runs the body with T = the CUDA element type and TT = the torch element type.
#define PYFLOWMAP_CUDA_DISPATCH(DT, OP, ...)                                                   \
  switch (DT) {                                                                               \
    case at::kFloat: { using T = float; using TT = float; __VA_ARGS__; break; }               \
    case at::kDouble: { using T = double; using TT = double; __VA_ARGS__; break; }            \
    case at::kHalf: { using T = __half; using TT = c10::Half; __VA_ARGS__; break; }           \
    case at::kBFloat16: { using T = __nv_bfloat16; using TT = c10::BFloat16; __VA_ARGS__; break; } \
    default: TORCH_CHECK(false, OP, ": unsupported dtype ", DT);                              \
  }

#define PYFLOWMAP_CHECK_LAUNCH(ERR, OP) \
  TORCH_CHECK((ERR) == 0, OP, ": CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(ERR)))

namespace pyflowmap {
template <typename T, typename TT>
const T* cptr(const at::Tensor& t) { return t.defined() ? reinterpret_cast<const T*>(t.const_data_ptr<TT>()) : nullptr; }
template <typename T, typename TT>
T* mptr(at::Tensor& t) { return reinterpret_cast<T*>(t.mutable_data_ptr<TT>()); }
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }
}  // namespace pyflowmap
#endif
