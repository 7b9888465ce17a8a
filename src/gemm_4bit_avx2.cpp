// AVX2 + FMA inner kernels of the CPU 4-bit matmul, for CPUs whose class is Avx2 (no
// AVX-512: many cloud VMs, AMD Zen 2/3, Xeons before Skylake-SP; or FOURBIT_DISABLE_AVX512=1).
// They plug into the same drivers as the AVX-512 kernels (src/gemm_4bit_driver.h) with the
// same contracts, fp32 throughout; bf16/fp16 activations are converted to fp32 by the drivers.
//
// - decode_aligned_avx2: 16 packed bytes -> 32 fp32 weights through a 16-entry table of the
//   block's finished values (code[k] * scale) held in two ymm registers: per 8 weights one
//   zero-extension, two vpermps and one vblendvps, never a scalar table walk or multiply
//   (src/avx2_nibbles.h). The values are exactly the scalar decode's.
// - micro_kernel_avx2: the drivers' 32-column panel as two 16-column halves; per half an
//   up-to-6 x 16 fp32 output tile lives in 12 ymm accumulators for the whole reduction,
//   and each step loads 2 vectors of B and broadcasts one A value per row: 12 FMAs per 8
//   loads (the classic Haswell 6 x 16 shape: 12 + 2 + 1 of the 16 ymm registers), so the
//   two FMA ports, not the load ports, set the pace. 7 or 8 rows go as 4 + 3 / 4 + 4 (a
//   2-row tile has too few FMA chains). The A value is a plain load + set1, not a
//   broadcast from a pointer: with the pointer form GCC 12 kept the accumulator arrays in
//   memory and stored all 12 every step (70 instead of 120-130 GFLOP/s per core on the
//   EPYC of docs/BENCHMARKS.md, measured on the kernel alone).
// - transpose16_words_avx2: 16 decoded weight rows -> 16 tile columns, 8 x 8 blocks
//   transposed in registers (unpack, shuffle, 128-bit lane permute) instead of a scalar
//   scatter that writes a cache line per element (the forward's B tile is W transposed).
// - dot_rows_avx2: the gemv path (small M): up to 4 activation rows against one decoded
//   weight row, two independent 8-lane FMA chains per row to cover the FMA latency,
//   reduced once at the end; the tail is a masked load.
//
// Compiled for AVX2 + FMA + F16C through function target attributes only (src/avx2_nibbles.h
// says why not a file-wide -mavx2), and called only where kernel_isa() is Avx2 (the AVX-512
// classes take the AVX-512 kernels).
#include "gemm_4bit_kernels.h"

#include <algorithm>
#include <cstring>

#include "fourbit/detail/element_math.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#include "avx2_nibbles.h"
#define FOURBIT_HAVE_AVX2_PATH 1
#endif

namespace fourbit {
namespace detail {

#ifdef FOURBIT_HAVE_AVX2_PATH

FOURBIT_AVX2 void decode_aligned_avx2(const Weight4bit& w, const float* code, int64_t g,
                                      int64_t len, float* out) {
  const int shift = log2_pow2(w.blocksize);  // blocksizes are powers of two (validate.cpp)
  int64_t current_block = -1;
  Fp32Table table = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t i = 0; i < len; i += 32) {
    const int64_t block = (g + i) >> shift;  // 32 | blocksize: a chunk is in one block
    if (block != current_block) {
      table = fp32_table(code, block_scale(w.scales, block));
      current_block = block;
    }
    decode32_fp32(w.packed + (g + i) / 2, table, out + i);
  }
}

namespace {

// Transposes the 8 x 8 block of 32-bit words r[0..7] (r[i] = row i) in place: afterwards
// r[c] holds column c. Stage 1 interleaves row pairs, stage 2 gathers 4-word columns per
// 128-bit lane, stage 3 swaps lanes.
FOURBIT_AVX2 inline void transpose8x8(__m256* r) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);      // per lane: a0 b0 a1 b1
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);  // per lane: a2 b2 a3 b3
  }
  for (int i = 0; i < 8; i += 4) {  // u[i + c], lane L: rows i..i+3 at column 4L + c
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xee);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xee);
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x20);
    r[4 + c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x31);
  }
}

}  // namespace

FOURBIT_AVX2 void transpose16_words_avx2(const void* rows, int64_t row_stride_bytes, int64_t words,
                                         uint32_t* dst, int64_t ld) {
  const char* base = static_cast<const char*>(rows);
  int64_t q = 0;
  for (; q + 8 <= words; q += 8) {
    for (int half = 0; half < 16; half += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) {
        r[i] = _mm256_loadu_ps(reinterpret_cast<const float*>(base + (half + i) * row_stride_bytes + 4 * q));
      }
      transpose8x8(r);
      for (int c = 0; c < 8; ++c) {
        _mm256_storeu_ps(reinterpret_cast<float*>(dst + (q + c) * ld + half), r[c]);
      }
    }
  }
  for (; q < words; ++q) {  // the last words % 8 columns, word by word
    for (int i = 0; i < 16; ++i) {
      std::memcpy(dst + q * ld + i, base + i * row_stride_bytes + 4 * q, 4);
    }
  }
}

namespace {

// Rows of one register tile: 6 rows x 2 vectors = 12 accumulators + 2 B vectors + 1
// broadcast = 15 of the 16 ymm registers.
constexpr int kAvx2TileRows = 6;

// C[kRows][16] += A[kRows][R] @ B[R][16].
template <int kRows>
FOURBIT_AVX2 inline void micro_tile_avx2(int64_t R, const float* A, int64_t lda, const float* B,
                                         int64_t ldb, float* C, int64_t ldc) {
  __m256 c0[kRows], c1[kRows];
  for (int i = 0; i < kRows; ++i) {
    c0[i] = _mm256_loadu_ps(C + i * ldc);
    c1[i] = _mm256_loadu_ps(C + i * ldc + 8);
  }
  for (int64_t r = 0; r < R; ++r) {
    const __m256 b0 = _mm256_loadu_ps(B + r * ldb);
    const __m256 b1 = _mm256_loadu_ps(B + r * ldb + 8);
    for (int i = 0; i < kRows; ++i) {
      const __m256 a = _mm256_set1_ps(A[i * lda + r]);
      c0[i] = _mm256_fmadd_ps(a, b0, c0[i]);
      c1[i] = _mm256_fmadd_ps(a, b1, c1[i]);
    }
  }
  for (int i = 0; i < kRows; ++i) {
    _mm256_storeu_ps(C + i * ldc, c0[i]);
    _mm256_storeu_ps(C + i * ldc + 8, c1[i]);
  }
}

FOURBIT_AVX2 inline void micro_half_avx2(int rows, int64_t R, const float* A, int64_t lda,
                                         const float* B, int64_t ldb, float* C, int64_t ldc) {
  // 7 or 8 rows as 4 + 3 or 4 + 4: a 6 + 2 split leaves a 2-row tile of 4 accumulators,
  // too few independent FMA chains to hide the FMA latency.
  const int step = rows > kAvx2TileRows ? (rows + 1) / 2 : kAvx2TileRows;
  for (int m = 0; m < rows; m += step) {
    const float* a = A + m * lda;
    float* c = C + m * ldc;
    switch (std::min(step, rows - m)) {
      case 1: micro_tile_avx2<1>(R, a, lda, B, ldb, c, ldc); break;
      case 2: micro_tile_avx2<2>(R, a, lda, B, ldb, c, ldc); break;
      case 3: micro_tile_avx2<3>(R, a, lda, B, ldb, c, ldc); break;
      case 4: micro_tile_avx2<4>(R, a, lda, B, ldb, c, ldc); break;
      case 5: micro_tile_avx2<5>(R, a, lda, B, ldb, c, ldc); break;
      default: micro_tile_avx2<kAvx2TileRows>(R, a, lda, B, ldb, c, ldc); break;
    }
  }
}

// Horizontal sum of 8 lanes.
FOURBIT_AVX2 inline float reduce_add(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int kRows>
FOURBIT_AVX2 inline void dot_tile_avx2(int64_t len, const float* x, int64_t ldx, const float* w,
                                       float* acc) {
  __m256 s0[kRows], s1[kRows];
  for (int m = 0; m < kRows; ++m) s0[m] = s1[m] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) {
    const __m256 w0 = _mm256_loadu_ps(w + i), w1 = _mm256_loadu_ps(w + i + 8);
    for (int m = 0; m < kRows; ++m) {
      s0[m] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * ldx + i), w0, s0[m]);
      s1[m] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * ldx + i + 8), w1, s1[m]);
    }
  }
  for (; i < len; i += 8) {  // masked tail: lanes past len load zeros and add nothing
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(len - i)), lane);
    const __m256 wv = _mm256_maskload_ps(w + i, mask);
    for (int m = 0; m < kRows; ++m) {
      s0[m] = _mm256_fmadd_ps(_mm256_maskload_ps(x + m * ldx + i, mask), wv, s0[m]);
    }
  }
  for (int m = 0; m < kRows; ++m) acc[m] += reduce_add(_mm256_add_ps(s0[m], s1[m]));
}

}  // namespace

FOURBIT_AVX2 void micro_kernel_avx2(int rows, int64_t R, const float* A, int64_t lda,
                                    const float* B, int64_t ldb, float* C, int64_t ldc) {
  static_assert(kMicroCols == 32, "two 16-column halves");
  micro_half_avx2(rows, R, A, lda, B, ldb, C, ldc);
  micro_half_avx2(rows, R, A, lda, B + 16, ldb, C + 16, ldc);
}

FOURBIT_AVX2 void dot_rows_avx2(int rows, int64_t len, const float* x, int64_t ldx, const float* w,
                                float* acc) {
  for (int m = 0; m < rows; m += 4) {
    switch (rows - m) {
      case 1: dot_tile_avx2<1>(len, x + m * ldx, ldx, w, acc + m); break;
      case 2: dot_tile_avx2<2>(len, x + m * ldx, ldx, w, acc + m); break;
      case 3: dot_tile_avx2<3>(len, x + m * ldx, ldx, w, acc + m); break;
      default: dot_tile_avx2<4>(len, x + m * ldx, ldx, w, acc + m); break;
    }
  }
}

#else  // no AVX2 path on this compiler/CPU: never called (kernel_isa() is never Avx2 there)

void decode_aligned_avx2(const Weight4bit&, const float*, int64_t, int64_t, float*) {}
void micro_kernel_avx2(int, int64_t, const float*, int64_t, const float*, int64_t, float*,
                       int64_t) {}
void dot_rows_avx2(int, int64_t, const float*, int64_t, const float*, float*) {}
void transpose16_words_avx2(const void*, int64_t, int64_t, uint32_t*, int64_t) {}

#endif

}  // namespace detail
}  // namespace fourbit
