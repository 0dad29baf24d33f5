// Error-message formatting that never goes through iostream number formatting.
//
// Why: on the lent GPU machine (torch 2.11, GCC 13.3 from /opt/gcc) the extension crashed
// (SIGSEGV in std::ostream::_M_insert<long>, instantiated inside our .so) whenever a
// TORCH_CHECK message streamed an integer; strings were fine. std::to_string avoids the locale
// facets involved. Use these helpers for every number in a check message.
#pragma once

#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <string>

namespace pyflowmap {

inline std::string fmt(int64_t v) { return std::to_string(v); }

inline std::string fmt(c10::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(sizes[i]);
  }
  return out + "]";
}

}  // namespace pyflowmap
