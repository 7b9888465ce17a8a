// AVX2 inner loop of the CPU 4-bit dequantize (src/quantize_4bit.cpp). Internal header.
#pragma once

#include <cstdint>

#include "fourbit/types.h"

namespace fourbit {
namespace detail {

// Dequantizes elements [0, len) of consecutive scale blocks starting at a block boundary
// (block b has scale scales[b]): out[i] = round(code[nibble_i] * scale) to `dtype`, the
// same bits as the scalar loop. Stops at the first block whose length is not a multiple
// of 32 (only a partial last block can be) and returns how many elements it wrote; the
// caller finishes the rest. Only call where kernel_isa() >= CpuIsa::Avx2 (kernel_isa.h).
int64_t dequantize_blocks_avx2(const uint8_t* packed, int64_t len, int64_t blocksize,
                               const float* scales, const float* code, DType dtype, void* out);

}  // namespace detail
}  // namespace fourbit
