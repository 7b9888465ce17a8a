// The fp32 scale of one 4-bit block, plain or double-quantized. Internal header shared by
// the CPU dequantize and the CPU 4-bit matmul, so both decode a weight to the same floats.
#pragma once

#include <cstdint>

#include "fourbit/quantize.h"

namespace fourbit {
namespace detail {

// fp32 scale of block b, decoding the double-quantized form when present.
inline float block_scale(const BlockScales& s, int64_t b) {
  if (!s.nested()) return s.absmax[b];
  // Two separate fp32 roundings (multiply, then add), as bitsandbytes' two passes do.
  const float decoded = s.nested_code[s.absmax_q[b]] * s.nested_absmax[b / s.nested_blocksize];
  return decoded + *s.offset;
}

}  // namespace detail
}  // namespace fourbit
