// AVX-512 inner loop of the CPU 4-bit dequantize (src/quantize_4bit.cpp). Internal header.
#pragma once

#include <cstdint>

#include "fourbit/types.h"

namespace fourbit {
namespace detail {

// True if cpu_isa() >= CpuIsa::Avx512: the CPU has AVX-512 F + BW and neither
// FOURBIT_DISABLE_AVX512 nor FOURBIT_DISABLE_AVX2 turns it off (checked once).
bool cpu_has_avx512bw();

// True if cpu_has_avx512bw() and the CPU has AVX512_BF16 (bf16 dot products; checked once).
bool cpu_has_avx512bf16();

// Dequantizes elements [0, len) of consecutive scale blocks starting at a block boundary
// (block b has scale scales[b]): out[i] = round(code[nibble_i] * scale) to `dtype`.
// Stops at the first block whose length is not a multiple of 32 (only a partial last
// block can be) and returns how many elements it wrote; the caller finishes the rest.
// Only call when cpu_has_avx512bw().
int64_t dequantize_blocks_avx512(const uint8_t* packed, int64_t len, int64_t blocksize,
                                 const float* scales, const float* code, DType dtype, void* out);

}  // namespace detail
}  // namespace fourbit
