// Codebooks: the 16-value NF4/FP4 tables and the 8-bit dynamic maps, bit-exact with
// bitsandbytes 0.50 (see docs/format.md).
#pragma once

#include <array>
#include <cstdint>

#include "fourbit/types.h"

namespace fourbit {

constexpr int kCodebook4bitSize = 16;
constexpr int kDynamicMapSize = 256;

// The 16 fp32 values of a 4-bit codebook, in code order (index = the nibble).
// NF4 is sorted ascending; FP4 is in bit-pattern order (bit 3 = sign).
const std::array<float, kCodebook4bitSize>& codebook_4bit(QuantType quant_type);

// Quantization rule for 4-bit codes, as bitsandbytes' CPU backend computes it:
// the codebook is sorted ascending (`sorted_order[k]` is the code of the k-th smallest
// value), `midpoints[k] = (sorted[k] + sorted[k+1]) / 2` in fp32, and a scaled value x
// maps to position p = #{k : midpoints[k] < x} (NaN maps to p = 15). A value exactly on
// a midpoint therefore takes the lower of the two codes.
struct Quantizer4bit {
  std::array<float, kCodebook4bitSize - 1> midpoints;
  std::array<uint8_t, kCodebook4bitSize> sorted_order;
};
const Quantizer4bit& quantizer_4bit(QuantType quant_type);

// bitsandbytes' create_dynamic_map(signed, max_exponent_bits, total_bits): 256 fp32 values
// sorted ascending (unused entries are zeros). Throws InvalidArgument for
// total_bits outside [2, 8] or max_exponent_bits outside [1, total_bits - 1].
std::array<float, kDynamicMapSize> create_dynamic_map(bool is_signed = true,
                                                      int max_exponent_bits = 7,
                                                      int total_bits = 8);

// True for the blocksizes fourbit supports: powers of two from 32 to 4096.
bool is_valid_blocksize(int64_t blocksize);

}  // namespace fourbit
