// Bit-exact fp16 / bf16 <-> fp32 conversions for the CPU kernels (round to nearest even,
// as torch and CUDA's __float2half_rn / __float2bfloat16_rn do). Internal header.
#pragma once

#include <cstdint>
#include <cstring>

namespace fourbit {
namespace detail {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

inline uint16_t float_to_bf16(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN -> canonical quiet NaN
  const uint32_t rounding_bias = 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>((u + rounding_bias) >> 16);
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1f) return bits_float(sign | 0x7f800000u | (mantissa << 13));  // inf/NaN
  if (exponent == 0) {
    if (mantissa == 0) return bits_float(sign);
    // Subnormal half: value = mantissa * 2^-24, exact in fp32.
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return sign ? -magnitude : magnitude;
  }
  return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

inline uint16_t float_to_half(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs_bits = u & 0x7fffffffu;
  if (abs_bits > 0x7f800000u) return sign | 0x7e00u;          // NaN
  if (abs_bits >= 0x477ff000u) return sign | 0x7c00u;         // rounds to +-inf (>= 65520)
  if (abs_bits < 0x38800000u) {                                // below 2^-14: subnormal half
    // Adding 0.5 shifts the value's bits so that the fp32 adder rounds (to nearest even)
    // at the half-subnormal ulp of 2^-24; the low bits of the sum are the result.
    const float sum = bits_float(abs_bits) + 0.5f;
    return sign | static_cast<uint16_t>(float_bits(sum) - 0x3f000000u);
  }
  // Normal half: rebias the exponent, round the 13 dropped mantissa bits to nearest even.
  const uint32_t rounded = abs_bits + 0xfffu + ((abs_bits >> 13) & 1u);
  return sign | static_cast<uint16_t>((rounded - 0x38000000u) >> 13);
}

}  // namespace detail
}  // namespace fourbit
