// AVX-512 building blocks shared by the CPU dequantize and the CPU 4-bit matmul: packed
// nibbles to lane indices, and fp32 -> bf16 rounding. Internal header; include only from
// files compiled for x86-64 with GCC or Clang, and call only after a runtime CPU check.
#pragma once

#include <immintrin.h>

#include <cstdint>

// Functions compiled for AVX-512 F + BW through a target attribute (no file-wide flags).
#define FOURBIT_AVX512 __attribute__((target("avx512f,avx512bw")))

namespace fourbit {
namespace detail {

// 16 packed bytes -> 32 nibble indices in element order (high nibble first), one per
// 16-bit lane: lane 2j = byte_j >> 4, lane 2j+1 = byte_j & 15.
FOURBIT_AVX512 inline __m512i nibble_indices_epi16(const uint8_t* bytes) {
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
  const __m512i hi = _mm512_srli_epi32(b, 4);
  const __m512i lo = _mm512_and_si512(b, _mm512_set1_epi32(0x0f));
  return _mm512_or_si512(hi, _mm512_slli_epi32(lo, 16));
}

// fp32 -> bf16 with round-to-nearest-even and quiet NaN 0x7fc0 (as float_to_bf16),
// results in the low 16 bits of each 32-bit lane.
FOURBIT_AVX512 inline __m512i to_bf16_bits(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(
      _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 is_nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_mask_mov_epi32(rounded, is_nan, _mm512_set1_epi32(0x7fc0));
}

// The 16 bf16 values code[k] * scale in lanes 0..15 of a 32 x 16-bit register (a table
// for _mm512_permutexvar_epi16 with nibble indices).
FOURBIT_AVX512 inline __m512i bf16_table(const float* code, float scale) {
  const __m512 values = _mm512_mul_ps(_mm512_loadu_ps(code), _mm512_set1_ps(scale));
  return _mm512_castsi256_si512(_mm512_cvtepi32_epi16(to_bf16_bits(values)));
}

}  // namespace detail
}  // namespace fourbit
