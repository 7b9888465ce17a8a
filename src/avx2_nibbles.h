// AVX2 building blocks shared by the CPU dequantize (src/dequantize_4bit_avx2.cpp) and the
// CPU 4-bit matmul (src/gemm_4bit_avx2.cpp): packed nibbles to codebook indices, and the
// 16-entry table lookups that turn indices into finished values. Internal header; include
// only from files compiled for x86-64 with GCC or Clang, and call only where
// kernel_isa() is CpuIsa::Avx2 or above (src/kernel_isa.h).
//
// Why function target attributes and not file-wide -mavx2: an inline function of a shared
// header (element_math.h, <algorithm>) that the compiler emits out of line in a -mavx2
// translation unit is a weak symbol the linker may pick for every caller, including the
// portable ones; on a CPU without AVX2 that is an illegal instruction (always at -O0, the
// sanitizer build). Attributes keep the AVX2 instructions inside these functions.
#pragma once

#include <immintrin.h>

#include <cstdint>

// Functions compiled for AVX2 + FMA + F16C through a target attribute (no file-wide flags).
#define FOURBIT_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace fourbit {
namespace detail {

// 16 packed bytes -> the 32 nibble indices of elements 0..31 in element order (high nibble
// first), one per byte: .lo = elements 0..15, .hi = elements 16..31.
struct NibbleBytes {
  __m128i lo, hi;
};
FOURBIT_AVX2 inline NibbleBytes nibble_indices_epi8(const uint8_t* bytes) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes));
  const __m128i mask = _mm_set1_epi8(0x0f);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);  // byte j >> 4
  const __m128i lo = _mm_and_si128(b, mask);                     // byte j & 15
  // unpack interleaves: hi0 lo0 hi1 lo1 ... = elements 0, 1, 2, 3, ...
  return {_mm_unpacklo_epi8(hi, lo), _mm_unpackhi_epi8(hi, lo)};
}

// A 16-entry fp32 table in two registers: entries 0..7 and 8..15.
struct Fp32Table {
  __m256 lo, hi;
};
// The table code[k] * scale: one fp32 multiply per entry, the same single rounding as
// dequant_value (element_math.h), so a lookup gives exactly the scalar decode's float.
FOURBIT_AVX2 inline Fp32Table fp32_table(const float* code, float scale) {
  const __m256 s = _mm256_set1_ps(scale);
  return {_mm256_mul_ps(_mm256_loadu_ps(code), s), _mm256_mul_ps(_mm256_loadu_ps(code + 8), s)};
}

// table[idx[i]] for 8 indices in 0..15 (32-bit lanes): vpermps looks up the low 3 bits in
// both halves of the table, and bit 3, shifted into the sign bit, picks the half (vblendvps).
FOURBIT_AVX2 inline __m256 lookup_fp32(const Fp32Table& t, __m256i idx) {
  const __m256 from_lo = _mm256_permutevar8x32_ps(t.lo, idx);
  const __m256 from_hi = _mm256_permutevar8x32_ps(t.hi, idx);
  return _mm256_blendv_ps(from_lo, from_hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

// Decodes 32 elements (16 packed bytes) with table `t` into out[0..32): 4 x 8 lookups.
FOURBIT_AVX2 inline void decode32_fp32(const uint8_t* bytes, const Fp32Table& t, float* out) {
  const NibbleBytes n = nibble_indices_epi8(bytes);
  _mm256_storeu_ps(out, lookup_fp32(t, _mm256_cvtepu8_epi32(n.lo)));
  _mm256_storeu_ps(out + 8, lookup_fp32(t, _mm256_cvtepu8_epi32(_mm_srli_si128(n.lo, 8))));
  _mm256_storeu_ps(out + 16, lookup_fp32(t, _mm256_cvtepu8_epi32(n.hi)));
  _mm256_storeu_ps(out + 24, lookup_fp32(t, _mm256_cvtepu8_epi32(_mm_srli_si128(n.hi, 8))));
}

// fp32 -> bf16 with round-to-nearest-even and quiet NaN 0x7fc0 (as float_to_bf16),
// results in the low 16 bits of each 32-bit lane.
FOURBIT_AVX2 inline __m256i to_bf16_bits_avx2(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(
      _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const __m256 is_nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(is_nan));
}

// A 16-entry table of 16-bit values split into bytes for vpshufb: .lo holds the low byte of
// entry k in byte k, .hi its high byte (each copied into both 128-bit lanes).
struct Bytes16Table {
  __m256i lo, hi;
};
// From entries 0..7 (v0) and 8..15 (v1) as 16-bit lanes.
FOURBIT_AVX2 inline Bytes16Table split_16bit_table(__m128i v0, __m128i v1) {
  // Per register: low bytes of the 8 entries to bytes 0..7, high bytes to 8..15.
  const __m128i gather = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  const __m128i s0 = _mm_shuffle_epi8(v0, gather), s1 = _mm_shuffle_epi8(v1, gather);
  return {_mm256_broadcastsi128_si256(_mm_unpacklo_epi64(s0, s1)),
          _mm256_broadcastsi128_si256(_mm_unpackhi_epi64(s0, s1))};
}

// Decodes 32 elements (16 packed bytes) to 16-bit values: two vpshufb pick the low and high
// bytes of 32 entries at once, two byte unpacks rebuild the 16-bit values (in-lane, so
// elements 0-7 | 16-23 and 8-15 | 24-31), and two lane permutes put them in order.
FOURBIT_AVX2 inline void decode32_16bit(const uint8_t* bytes, const Bytes16Table& t, uint16_t* out) {
  const NibbleBytes n = nibble_indices_epi8(bytes);
  const __m256i idx = _mm256_set_m128i(n.hi, n.lo);
  const __m256i lo = _mm256_shuffle_epi8(t.lo, idx);
  const __m256i hi = _mm256_shuffle_epi8(t.hi, idx);
  const __m256i a = _mm256_unpacklo_epi8(lo, hi);  // elements 0..7 | 16..23
  const __m256i b = _mm256_unpackhi_epi8(lo, hi);  // elements 8..15 | 24..31
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_permute2x128_si256(a, b, 0x20));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16), _mm256_permute2x128_si256(a, b, 0x31));
}

}  // namespace detail
}  // namespace fourbit
