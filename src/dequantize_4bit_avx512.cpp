// AVX-512 inner loop of the CPU 4-bit dequantize.
//
// Idea: a scale block has only 16 distinct output values, so the 16 finished outputs
// (code[k] * scale, rounded to the output type) are computed once per block into one
// vector register, and every 16 packed bytes (32 elements) then cost one permute per
// 32 outputs (vpermw for 16-bit outputs, 2 x vpermps for fp32) plus one 64-byte store.
// The scaling multiply is the same single fp32 rounding as the scalar path, and the
// bf16/fp16 rounding is round-to-nearest-even, so the output bits are identical.
//
// Compiled for AVX-512 F+BW through function target attributes only (no file-wide
// -mavx512 flags), and called only after a runtime CPU check.
#include "dequantize_4bit_avx512.h"

#include "fourbit/cpu_features.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their own _mm512_undefined_*.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cstdlib>

#include "avx512_nibbles.h"
#define FOURBIT_HAVE_AVX512_PATH 1
#endif

namespace fourbit {
namespace detail {

#ifdef FOURBIT_HAVE_AVX512_PATH

// Both follow the ISA class (src/gemm_4bit_tiles.cpp), so FOURBIT_DISABLE_AVX512=1 and
// FOURBIT_DISABLE_AVX2=1 turn them off.
bool cpu_has_avx512bw() { return cpu_isa() >= CpuIsa::Avx512; }

bool cpu_has_avx512bf16() { return cpu_isa() >= CpuIsa::Avx512Bf16; }

namespace {

// The 16 finished 16-bit outputs of a block, in lanes 0..15 of a 32 x 16-bit register.
FOURBIT_AVX512 inline __m512i table_16bit(const float* code, float scale, DType dtype) {
  if (dtype == DType::BFloat16) return bf16_table(code, scale);
  const __m512 values = _mm512_mul_ps(_mm512_loadu_ps(code), _mm512_set1_ps(scale));
  return _mm512_castsi256_si512(_mm512_cvtps_ph(values, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// One scale block of 16-bit outputs: `len` is a multiple of 32.
FOURBIT_AVX512 inline void dequantize_block_16bit(const uint8_t* packed, int64_t len, float scale,
                                                  const float* code, DType dtype, uint16_t* out) {
  const __m512i table = table_16bit(code, scale, dtype);
  for (int64_t i = 0; i < len; i += 32) {
    const __m512i idx = nibble_indices_epi16(packed + i / 2);
    _mm512_storeu_si512(out + i, _mm512_permutexvar_epi16(idx, table));
  }
}

// One scale block of fp32 outputs: `len` is a multiple of 32.
FOURBIT_AVX512 inline void dequantize_block_fp32(const uint8_t* packed, int64_t len, float scale,
                                                 const float* code, float* out) {
  const __m512 table = _mm512_mul_ps(_mm512_loadu_ps(code), _mm512_set1_ps(scale));
  // Interleave hi/lo nibble indices into element order for the two 16-lane halves.
  const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (int64_t i = 0; i < len; i += 32) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + i / 2)));
    const __m512i hi = _mm512_srli_epi32(b, 4);
    const __m512i lo = _mm512_and_si512(b, _mm512_set1_epi32(0x0f));
    _mm512_storeu_ps(out + i, _mm512_permutexvar_ps(_mm512_permutex2var_epi32(hi, first, lo), table));
    _mm512_storeu_ps(out + i + 16, _mm512_permutexvar_ps(_mm512_permutex2var_epi32(hi, second, lo), table));
  }
}

}  // namespace

FOURBIT_AVX512 int64_t dequantize_blocks_avx512(const uint8_t* packed, int64_t len,
                                                int64_t blocksize, const float* scales,
                                                const float* code, DType dtype, void* out) {
  int64_t done = 0;
  for (int64_t b = 0; done < len; ++b) {
    const int64_t vector_len = std::min(blocksize, len - done) / 32 * 32;
    if (dtype == DType::Float32) {
      dequantize_block_fp32(packed + done / 2, vector_len, scales[b], code, static_cast<float*>(out) + done);
    } else {
      dequantize_block_16bit(packed + done / 2, vector_len, scales[b], code, dtype,
                             static_cast<uint16_t*>(out) + done);
    }
    done += vector_len;
    if (vector_len < blocksize) break;  // a partial last block: the caller finishes it
  }
  return done;
}

#else  // not x86-64 with GCC/Clang: no vector path

bool cpu_has_avx512bw() { return cpu_isa() >= CpuIsa::Avx512; }
bool cpu_has_avx512bf16() { return cpu_isa() >= CpuIsa::Avx512Bf16; }
int64_t dequantize_blocks_avx512(const uint8_t*, int64_t, int64_t, const float*, const float*,
                                 DType, void*) {
  return 0;
}

#endif

}  // namespace detail
}  // namespace fourbit
