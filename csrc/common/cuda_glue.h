// Torch-side helpers for the CUDA registrations (included only in CUDA builds): the current
// stream, a device guard, the launch check, and the map from torch element types to CUDA's.
#pragma once

#ifdef PYFLOWMAP_WITH_CUDA
#include "common/dispatch.h"

#include <ATen/core/Tensor.h>
// c10/cuda only (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE headers): the
// glue then compile-checks against a CUDA torch's headers plus cudart alone.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

// ERR: the int a launcher returns (its cudaError_t).
#define PYFLOWMAP_CHECK_LAUNCH(ERR, OP) \
  TORCH_CHECK((ERR) == 0, OP, ": CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(ERR)))

namespace pyflowmap {

// The CUDA element type of a torch element type: inside dispatch_types, TT is the torch type
// and `using T = cuda_type_t<TT>;` the type the .cu launchers are instantiated for.
template <typename TT> struct cuda_type { using type = TT; };  // float, double
template <> struct cuda_type<c10::Half> { using type = __half; };
template <> struct cuda_type<c10::BFloat16> { using type = __nv_bfloat16; };
template <typename TT> using cuda_type_t = typename cuda_type<TT>::type;

// cptr / mptr (common/dispatch.h) as CUDA element pointers; nullptr for an undefined tensor.
template <typename TT>
const cuda_type_t<TT>* cuda_cptr(const at::Tensor& t) { return reinterpret_cast<const cuda_type_t<TT>*>(cptr<TT>(t)); }
template <typename TT>
cuda_type_t<TT>* cuda_mptr(at::Tensor& t) { return reinterpret_cast<cuda_type_t<TT>*>(mptr<TT>(t)); }

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }

}  // namespace pyflowmap
#endif
