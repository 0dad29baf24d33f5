// Argument checks shared by the torch glue files (they include ATen already), and the
// accumulation dtype rule. Every message starts with "<op>: " and names the argument in
// backticks; numbers go through fmt() (common/format.h says why).
#pragma once

#include "common/format.h"

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>
#include <vector>

namespace pyflowmap {

// The dtype accumulations, times, per-sample values and weights go with a tensor of dtype t:
// float64 stays float64, every other floating type (float32, bfloat16, float16) is float32.
// (pyflowmap/_tensors.py acc_dtype is the same rule on the Python side.)
constexpr at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }
template <typename T>
using acc_t = c10::impl::ScalarTypeToCPPTypeT<acc_type(c10::CppTypeToScalarType<T>::value)>;

// An optional tensor argument as a tensor, undefined when absent.
inline at::Tensor value_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? *t : at::Tensor();
}

namespace detail {
inline const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kBFloat16: return "bfloat16";
    case at::kHalf: return "float16";
    default: return c10::toString(t);
  }
}

// "float32, float64 or bfloat16" (sep ", ", last " or "); "float16 / bfloat16" (both " / ")
inline std::string dtype_names(c10::ArrayRef<at::ScalarType> ts, const char* sep, const char* last) {
  std::string out;
  for (size_t i = 0; i < ts.size(); ++i) {
    if (i) out += i + 1 == ts.size() ? last : sep;
    out += dtype_name(ts[i]);
  }
  return out;
}

inline bool has(c10::ArrayRef<at::ScalarType> ts, at::ScalarType t) {
  for (auto x : ts)
    if (x == t) return true;
  return false;
}
}  // namespace detail

// `t` has one of the dtypes the kernels of its backend are instantiated for (`cpu` or `cuda`,
// a dtypes<...>::scalar_types list of common/dispatch.h, chosen by t's device). On the CPU the
// message also names the dtypes only CUDA covers.
inline void check_floating(const at::Tensor& t, const char* op, const char* name, c10::ArrayRef<at::ScalarType> cpu,
                           c10::ArrayRef<at::ScalarType> cuda) {
  const c10::ArrayRef<at::ScalarType> allowed = t.is_cuda() ? cuda : cpu;
  const at::ScalarType dt = t.scalar_type();
  if (detail::has(allowed, dt)) return;
  std::string names = detail::dtype_names(allowed, ", ", " or ");
  if (!t.is_cuda()) {
    std::vector<at::ScalarType> extra;
    for (auto x : cuda)
      if (!detail::has(cpu, x)) extra.push_back(x);
    if (!extra.empty()) names += " (or " + detail::dtype_names(extra, " / ", " / ") + " on CUDA)";
  }
  TORCH_CHECK(false, op, ": `", name, "` must be ", names, ", got ", dt);
}

// A stacked dual tensor [primal; tangent]: at least `min_dim` dims and an even leading dim.
inline void check_stacked(const at::Tensor& t, const char* op, const char* name, int64_t min_dim = 1) {
  TORCH_CHECK(t.dim() >= min_dim && t.size(0) % 2 == 0, op, ": `", name,
              "` must be a stacked [primal; tangent] tensor with an even leading dim and at least ",
              fmt(min_dim), " dims, got shape ", fmt(t.sizes()));
}

inline void check_same_shape(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                             const char* ref_name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": `", name, "` shape ", fmt(t.sizes()), " differs from `", ref_name,
              "` shape ", fmt(ref.sizes()));
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                             const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": `", name, "` dtype ", t.scalar_type(), " differs from `",
              ref_name, "` dtype ", ref.scalar_type());
}

// `hint`, when given, is appended after "; ".
inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                              const char* ref_name, const char* hint = nullptr) {
  TORCH_CHECK(t.device() == ref.device(), op, ": `", name, "` is on ", t.device().str(), " but `", ref_name,
              "` is on ", ref.device().str(), hint ? "; " : "", hint ? hint : "");
}

// Same shape, dtype and device as `ref`.
inline void check_like(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                       const char* ref_name) {
  check_same_shape(t, ref, op, name, ref_name);
  check_same_dtype(t, ref, op, name, ref_name);
  check_same_device(t, ref, op, name, ref_name);
}

// One value per sample of `ref` ([batch] = [ref.size(0)]; with allow_scalar also a 0-dim
// tensor, one value for all) in acc_type(ref's dtype), on ref's device (`device_hint` as in
// check_same_device).
inline void check_batch_vector(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                               const char* ref_name, bool allow_scalar = false, const char* device_hint = nullptr) {
  const int64_t batch = ref.size(0);
  TORCH_CHECK((allow_scalar && t.dim() == 0) || (t.dim() == 1 && t.size(0) == batch), op, ": `", name, "` must ",
              allow_scalar ? "be a scalar tensor or have" : "have", " shape [batch] = [", fmt(batch), "], got ",
              fmt(t.sizes()));
  const at::ScalarType want = acc_type(ref.scalar_type());
  TORCH_CHECK(t.scalar_type() == want, op, ": `", name, "` must have dtype ", want, " for `", ref_name, "` of dtype ",
              ref.scalar_type(), ", got ", t.scalar_type());
  check_same_device(t, ref, op, name, ref_name, device_hint);
}

// A tensor the forward returned and the backward takes back: `shape_ok` (the caller's test of
// its shape), dtype `dtype` and ref's device, else "`name` must be the forward's <what>".
inline void check_saved(const at::Tensor& t, bool shape_ok, at::ScalarType dtype, const at::Tensor& ref,
                        const char* op, const char* name, const std::string& what) {
  TORCH_CHECK(shape_ok && t.scalar_type() == dtype && t.device() == ref.device(), op, ": `", name,
              "` must be the forward's ", what);
}

// The dispatcher picks a backend's kernel from all tensor arguments; this is the kernel's own
// guard that `t` (the argument that decides the device) is on that backend.
inline void check_backend(const at::Tensor& t, const char* op, const char* name, c10::DeviceType backend) {
  if (backend == c10::DeviceType::CUDA) {
    TORCH_CHECK(t.is_cuda(), op, " (CUDA kernel): `", name, "` must be a CUDA tensor");
  } else {
    TORCH_CHECK(t.device().type() == backend, op, " (CPU kernel): `", name, "` must be on the CPU");
  }
}

}  // namespace pyflowmap
