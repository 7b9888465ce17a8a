// Binary searches over a sorted 256-entry 8-bit code (the dynamic map), shared by the
// blockwise quantizer and the 8-bit optimizer. Internal header.
#pragma once

#include "fourbit/codebook.h"

namespace fourbit {
namespace cuda {

// First index in code[0..256) whose value is >= x (std::lower_bound): duplicated map
// entries resolve to their first index.
__device__ __forceinline__ int lower_bound_256(const float* code, float x) {
  int lo = 0, count = kDynamicMapSize;
  while (count > 0) {
    const int step = count / 2;
    if (code[lo + step] < x) {
      lo += step + 1;
      count -= step + 1;
    } else {
      count = step;
    }
  }
  return lo;
}

}  // namespace cuda
}  // namespace fourbit
