// The one dtype dispatch of the torch glue, for CPU and CUDA alike (the glue files include
// ATen already; no CUDA here: common/cuda_glue.h maps the torch types onto CUDA's).
//
// Each op family names, once per backend, the element types its kernels are instantiated for:
//   using CpuTypes = dtypes<float, double, c10::BFloat16>;
// The glue checks inputs against CpuTypes::scalar_types (check_floating in common/checks.h) and
// dispatches over the same list:
//   dispatch_types(CpuTypes{}, x.scalar_type(), "op", [&](auto tag) {
//     using T = typename decltype(tag)::type;  // float, double, c10::BFloat16, ...
//     forward_cpu<T>(cptr<T>(x), mptr<T>(out), n);
//   });
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <array>
#include <utility>

namespace pyflowmap {

template <typename T>
struct type_tag {
  using type = T;
};

// A list of torch element types (float, double, c10::Half, c10::BFloat16). The order is the
// order in which an error message lists them.
template <typename... Ts>
struct dtypes {
  static constexpr std::array<at::ScalarType, sizeof...(Ts)> scalar_types{c10::CppTypeToScalarType<Ts>::value...};
  static constexpr bool contains(at::ScalarType dt) { return ((dt == c10::CppTypeToScalarType<Ts>::value) || ...); }
};

// Calls f(type_tag<T>{}) for the T of Ts whose dtype is dt; any other dtype is an error.
template <typename... Ts, typename F>
void dispatch_types(dtypes<Ts...>, at::ScalarType dt, const char* op, F&& f) {
  const bool found = ((dt == c10::CppTypeToScalarType<Ts>::value && (f(type_tag<Ts>{}), true)) || ...);
  TORCH_CHECK(found, op, ": unsupported dtype ", dt);
}

// Element pointers of a tensor (nullptr for an undefined one: an absent optional argument).
template <typename T>
const T* cptr(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}
template <typename T>
T* mptr(at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

}  // namespace pyflowmap
