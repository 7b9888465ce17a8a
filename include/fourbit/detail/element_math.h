// The element arithmetic of every fourbit kernel, CPU and CUDA alike: one source, compiled
// as `__host__ __device__` inline functions. A CPU kernel and its CUDA twin differ in how
// they walk the data, never in the arithmetic, so the bit-exact CPU tests cover the
// GPU's arithmetic too. Internal header (namespace fourbit::detail); no CUDA headers needed.
//
// What lives here:
//  - fp32 <-> bf16 / fp16 conversions, round to nearest even, with ONE canonical NaN
//    (bf16 0x7FC0, fp16 sign | 0x7E00) on every device;
//  - the fp32 operations with explicit rounding (no contraction into FMA on either side);
//  - 4-bit element decode: the nibble of element i, the block of element i by a shift
//    (blocksizes are powers of two), the plain or double-quantized block scale;
//  - the 4-bit quantizer's bucket (midpoint count) and the 8-bit nearest-code search;
//  - the AdamW element update and the 8-bit state requantization.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "fourbit/detail/host_device.h"
#include "fourbit/optim.h"
#include "fourbit/quantize.h"

namespace fourbit {
namespace detail {

// The one NaN each 16-bit type stores (the quiet NaN torch's CPU kernels produce).
constexpr uint16_t kBf16CanonicalNaN = 0x7fc0;
constexpr uint16_t kHalfCanonicalNaN = 0x7e00;  // or'ed with the sign of the input

// ------------------------------------------------------------------ fp32 bits and rounding

FOURBIT_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

FOURBIT_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

FOURBIT_HD bool is_nan(float x) { return (float_bits(x) & 0x7fffffffu) > 0x7f800000u; }
FOURBIT_HD float abs_f(float x) { return bits_float(float_bits(x) & 0x7fffffffu); }

// Correctly rounded fp32 operations. The device forms forbid contraction into FMA whatever
// the -fmad setting; the host library builds with -ffp-contract=off.
#if defined(__CUDA_ARCH__)
FOURBIT_HD float mul_rn(float a, float b) { return __fmul_rn(a, b); }
FOURBIT_HD float add_rn(float a, float b) { return __fadd_rn(a, b); }
FOURBIT_HD float sub_rn(float a, float b) { return __fsub_rn(a, b); }
FOURBIT_HD float div_rn(float a, float b) { return __fdiv_rn(a, b); }
FOURBIT_HD float sqrt_rn(float a) { return __fsqrt_rn(a); }
FOURBIT_HD float fma_rn(float a, float b, float c) { return __fmaf_rn(a, b, c); }
#else
FOURBIT_HD float mul_rn(float a, float b) { return a * b; }
FOURBIT_HD float add_rn(float a, float b) { return a + b; }
FOURBIT_HD float sub_rn(float a, float b) { return a - b; }
FOURBIT_HD float div_rn(float a, float b) { return a / b; }
FOURBIT_HD float sqrt_rn(float a) { return std::sqrt(a); }
FOURBIT_HD float fma_rn(float a, float b, float c) { return std::fma(a, b, c); }
#endif

// max(m, a) for the absmax reductions: a NaN `a` never compares greater and is ignored.
FOURBIT_HD float max_ignore_nan(float m, float a) { return a > m ? a : m; }

// max(m, |a|) over finite values only: NaN and +-inf are left out. The 8-bit optimizer's
// block absmax ("Non-finite gradients" in src/optim_adamw.cpp): a non-finite moment stays
// confined to its own element instead of turning its whole block's scale into inf.
FOURBIT_HD float max_abs_finite(float m, float a) {
  const float x = abs_f(a);
  return (x > m && x <= 3.40282347e+38f) ? x : m;
}

// max with NaN propagation (torch.max semantics): a NaN on either side wins.
FOURBIT_HD float max_propagate_nan(float m, float a) { return (is_nan(a) || a > m) ? a : m; }

// ------------------------------------------------------------------ bf16 / fp16

FOURBIT_HD float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

FOURBIT_HD uint16_t float_to_bf16(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return kBf16CanonicalNaN;
  const uint32_t rounding_bias = 0x7fffu + ((u >> 16) & 1u);  // round half to even
  return static_cast<uint16_t>((u + rounding_bias) >> 16);
}

FOURBIT_HD float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1f) return bits_float(sign | 0x7f800000u | (mantissa << 13));  // inf/NaN
  if (exponent == 0) {
    if (mantissa == 0) return bits_float(sign);
    // Subnormal half: value = mantissa * 2^-24, exact in fp32.
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return sign ? -magnitude : magnitude;
  }
  return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

FOURBIT_HD uint16_t float_to_half(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs_bits = u & 0x7fffffffu;
  if (abs_bits > 0x7f800000u) return sign | kHalfCanonicalNaN;
  if (abs_bits >= 0x477ff000u) return sign | 0x7c00u;  // rounds to +-inf (>= 65520)
  if (abs_bits < 0x38800000u) {                         // below 2^-14: subnormal half
    // Adding 0.5 shifts the value's bits so that the fp32 adder rounds (to nearest even)
    // at the half-subnormal ulp of 2^-24; the low bits of the sum are the result.
    const float sum = add_rn(bits_float(abs_bits), 0.5f);
    return sign | static_cast<uint16_t>(float_bits(sum) - 0x3f000000u);
  }
  // Normal half: rebias the exponent, round the 13 dropped mantissa bits to nearest even.
  const uint32_t rounded = abs_bits + 0xfffu + ((abs_bits >> 13) & 1u);
  return sign | static_cast<uint16_t>((rounded - 0x38000000u) >> 13);
}

// ------------------------------------------------------------------ 4-bit decode

// log2 of a power of two (> 0): the shift that replaces a division by a blocksize. A
// 64-bit division is a ~70-instruction software routine on the GPU; a shift is one.
FOURBIT_HD int log2_pow2(int64_t pow2) {
#if defined(__CUDA_ARCH__)
  return __ffsll(static_cast<long long>(pow2)) - 1;
#else
  return __builtin_ctzll(static_cast<unsigned long long>(pow2));
#endif
}

// The nibble of element i in its packed byte: even elements sit in the high nibble.
FOURBIT_HD int nibble_of(uint32_t byte, int64_t i) {
  return (i & 1) ? static_cast<int>(byte & 0x0fu) : static_cast<int>((byte >> 4) & 0x0fu);
}

// fp32 scale of block b, decoding the double-quantized form when present. Two separate
// fp32 roundings (multiply, then add), as bitsandbytes' two passes do. nested_blocksize is
// a power of two (validated), so its block is found by a shift.
FOURBIT_HD float nested_scale(float nested_code_value, float nested_absmax, float offset) {
  return add_rn(mul_rn(nested_code_value, nested_absmax), offset);
}

FOURBIT_HD float block_scale(const BlockScales& s, int64_t b) {
  if (s.absmax_q == nullptr) return s.absmax[b];
  const int64_t nested_block = b >> log2_pow2(s.nested_blocksize);
  return nested_scale(s.nested_code[s.absmax_q[b]], s.nested_absmax[nested_block], *s.offset);
}

// One decoded weight: codebook value times block scale, one rounding.
FOURBIT_HD float dequant_value(float code_value, float scale) { return mul_rn(code_value, scale); }

// ------------------------------------------------------------------ quantizer searches

// Position of x among the 16 sorted 4-bit codebook values: the number of the 15 midpoints
// below x (a value on a midpoint takes the lower code); NaN goes to the top position, as
// torch.bucketize does. `Midpoints` is a pointer or an array (a kernel parameter is read in
// place, with compile-time indices, never copied to local memory).
template <typename Midpoints>
FOURBIT_HD int bucket_4bit(float x, const Midpoints& midpoints) {
  if (is_nan(x)) return 15;
  int position = 0;
  FOURBIT_UNROLL
  for (int k = 0; k < 15; ++k) position += x > midpoints[k] ? 1 : 0;
  return position;
}

// First index in code[0..256) whose value is >= x (std::lower_bound).
FOURBIT_HD int lower_bound_256(const float* code, float x) {
  int lo = 0, count = 256;
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

// Index of the entry of the sorted 256-entry map `code` nearest to x: ties to the lower
// index, duplicated values (the padding zeros of short maps) to their first index, NaN to 0.
// A branchless 8-step search (pos = number of entries <= x, capped at 255), one neighbour
// comparison, and a lower_bound only when the chosen value is duplicated.
FOURBIT_HD uint8_t nearest_code_8bit(float x, const float* code) {
  if (is_nan(x)) return 0;
  int pos = 0;
  FOURBIT_UNROLL
  for (int s = 128; s >= 1; s >>= 1) {
    if (code[pos + s - 1] <= x) pos += s;
  }
  int idx = pos > 0 ? pos - 1 : 0;
  const float dist_left = abs_f(sub_rn(x, code[idx]));
  const float dist_right = abs_f(sub_rn(x, code[idx + 1]));
  if (dist_right < dist_left) idx += 1;
  if (idx > 0 && code[idx - 1] == code[idx]) idx = lower_bound_256(code, code[idx]);
  return static_cast<uint8_t>(idx);
}

// The 8-bit code of x in a block whose absmax is `absmax` (x / absmax, then the nearest
// entry; the 0/0 of an all-zero block is NaN and maps to 0).
FOURBIT_HD uint8_t quantize_8bit(float x, float absmax, const float* code) {
  return nearest_code_8bit(div_rn(x, absmax), code);
}

// ------------------------------------------------------------------ AdamW

// The per-step constants of the first-moment update (torch's lerp: weight < 0.5 takes
// m + w * (g - m), else g + (w - 1) * (g - m)).
struct AdamWLerp {
  bool small_weight;
  float coeff;
};

FOURBIT_HD AdamWLerp adamw_lerp(const AdamWCoefficients& c) {
  const bool small_weight = abs_f(c.one_minus_beta1) < 0.5f;
  return AdamWLerp{small_weight, small_weight ? c.one_minus_beta1 : sub_rn(c.one_minus_beta1, 1.0f)};
}

// One AdamW element in fp32, in place (optim.h and docs/kernels.md give the formulas):
// 8-bit states follow bitsandbytes (no FMA), 32-bit states torch's CPU arithmetic.
FOURBIT_HD void adamw_update(float& p, float g, float& m, float& v, const AdamWCoefficients& c,
                             const AdamWLerp& lerp, bool bits8) {
  if (bits8) {
    m = add_rn(mul_rn(m, c.beta1), mul_rn(g, c.one_minus_beta1));
    v = add_rn(mul_rn(v, c.beta2), mul_rn(c.one_minus_beta2, mul_rn(g, g)));
  } else {
    m = fma_rn(lerp.coeff, sub_rn(g, m), lerp.small_weight ? m : g);
    v = fma_rn(mul_rn(c.one_minus_beta2, g), g, mul_rn(v, c.beta2));
  }
  const float denom = add_rn(sqrt_rn(v), c.eps_scaled);
  p = add_rn(mul_rn(p, c.decay), div_rn(mul_rn(c.neg_step_size, m), denom));
}

}  // namespace detail
}  // namespace fourbit
