// Argument checks shared by the torch glue files (they include ATen already).
#pragma once

#include "common/format.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace pyflowmap {

// A stacked dual tensor [primal; tangent]: at least `min_dim` dims and an even leading dim.
inline void check_stacked(const at::Tensor& t, const char* op, const char* name, int64_t min_dim = 1) {
  TORCH_CHECK(t.dim() >= min_dim && t.size(0) % 2 == 0, op, ": `", name,
              "` must be a stacked [primal; tangent] tensor with an even leading dim and at least ",
              fmt(min_dim), " dims, got shape ", fmt(t.sizes()));
}

}  // namespace pyflowmap
