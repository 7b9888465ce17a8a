// AVX2 inner loop of the CPU 4-bit dequantize: the AVX-512 loop's idea
// (src/dequantize_4bit_avx512.cpp) with 256-bit registers, for CPUs whose class is Avx2.
//
// Idea: a scale block has only 16 distinct outputs, so the 16 finished values (code[k] *
// scale, rounded to the output type) are computed once per block into registers, and every
// 16 packed bytes (32 elements) then cost table lookups instead of 32 scalar multiplies:
// - fp32: two vpermps (entries 0-7 and 8-15) + one vblendvps per 8 outputs;
// - fp16 / bf16: the table split into low and high bytes, two vpshufb look up 32 elements'
//   bytes at once, two unpacks and two lane permutes rebuild them in order (src/avx2_nibbles.h).
// The scaling multiply is the same single fp32 rounding as the scalar path, bf16 rounding is
// the scalar round-to-nearest-even in integer arithmetic and fp16 is F16C's vcvtps2ph with
// round-to-nearest-even, so the output bits equal the scalar loop's (tested).
//
// Compiled for AVX2 + FMA + F16C through function target attributes only (src/avx2_nibbles.h
// says why not a file-wide -mavx2), and called only after the run-time check.
#include "dequantize_4bit_avx2.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#include <algorithm>

#include "avx2_nibbles.h"
#define FOURBIT_HAVE_AVX2_PATH 1
#endif

namespace fourbit {
namespace detail {

#ifdef FOURBIT_HAVE_AVX2_PATH

namespace {

// The 16 finished 16-bit outputs of a block as a vpshufb byte table.
FOURBIT_AVX2 inline Bytes16Table table_16bit(const float* code, float scale, DType dtype) {
  const __m256 s = _mm256_set1_ps(scale);
  const __m256 v0 = _mm256_mul_ps(_mm256_loadu_ps(code), s);
  const __m256 v1 = _mm256_mul_ps(_mm256_loadu_ps(code + 8), s);
  if (dtype == DType::BFloat16) {
    // 32-bit lanes holding the bf16 bits; packus keeps them (all <= 0xffff), in-lane: entries
    // 0-3 8-11 | 4-7 12-15, put back in order by the 64-bit permute.
    const __m256i packed = _mm256_permute4x64_epi64(
        _mm256_packus_epi32(to_bf16_bits_avx2(v0), to_bf16_bits_avx2(v1)), 0xd8);
    return split_16bit_table(_mm256_castsi256_si128(packed), _mm256_extracti128_si256(packed, 1));
  }
  constexpr int kRne = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  return split_16bit_table(_mm256_cvtps_ph(v0, kRne), _mm256_cvtps_ph(v1, kRne));
}

}  // namespace

FOURBIT_AVX2 int64_t dequantize_blocks_avx2(const uint8_t* packed, int64_t len, int64_t blocksize,
                                            const float* scales, const float* code, DType dtype,
                                            void* out) {
  int64_t done = 0;
  for (int64_t b = 0; done < len; ++b) {
    const int64_t vector_len = std::min(blocksize, len - done) / 32 * 32;
    const uint8_t* bytes = packed + done / 2;
    if (dtype == DType::Float32) {
      const Fp32Table table = fp32_table(code, scales[b]);
      float* dst = static_cast<float*>(out) + done;
      for (int64_t i = 0; i < vector_len; i += 32) decode32_fp32(bytes + i / 2, table, dst + i);
    } else {
      const Bytes16Table table = table_16bit(code, scales[b], dtype);
      uint16_t* dst = static_cast<uint16_t*>(out) + done;
      for (int64_t i = 0; i < vector_len; i += 32) decode32_16bit(bytes + i / 2, table, dst + i);
    }
    done += vector_len;
    if (vector_len < blocksize) break;  // a partial last block: the caller finishes it
  }
  return done;
}

#else  // not x86-64 with GCC/Clang: no vector path (kernel_isa() is never Avx2 there)

int64_t dequantize_blocks_avx2(const uint8_t*, int64_t, int64_t, const float*, const float*,
                               DType, void*) {
  return 0;
}

#endif

}  // namespace detail
}  // namespace fourbit
