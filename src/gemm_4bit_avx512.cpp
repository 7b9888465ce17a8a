// AVX-512 inner kernels of the CPU 4-bit matmul.
//
// - decode_aligned_avx512: 16 packed bytes -> 32 fp32 weights with two vpermps lookups
//   into a register holding the block's 16 finished values (code[k] * scale), so a weight
//   costs a fraction of an instruction and never a scalar table walk.
// - micro_kernel_avx512: an 8 x 32 fp32 output tile lives in 16 zmm registers for the
//   whole reduction; each step loads one 32-wide row of B (2 loads) and broadcasts one A
//   value per output row, 16 FMAs per 10 loads, so the FMA units, not memory, set the pace.
// - transpose16_words_avx512: 16 decoded weight rows -> 16 tile columns, 16 x 16 blocks
//   transposed in registers with three shuffle stages (the forward's B tile is the weight
//   transposed).
// - dot_rows_avx512: up to 4 activation rows against one decoded weight row, 16 lanes per
//   FMA, reduced once at the end (the gemv path for small M).
// - decode_transpose16_bf16_avx512: 16 weight rows decoded to bf16 pair words and
//   transposed in registers into 16 tile columns (the forward's B tile), no staging buffer.
// - decode_pairs_bf16_avx512: pairs of weight rows decoded to bf16 and interleaved into
//   pair words in registers (the input gradient's B tile), with no staging buffer.
// - store_row_bf16_avx512: an fp32 accumulator row (+ bias) rounded to bf16, 16 per step
//   (the epilogue of every bf16 product).
// - *_bf16: the same three for bf16 activations on CPUs with AVX512_BF16: the weight is
//   decoded to bf16 (vpermw from a 16-entry bf16 table, the same bits as dequantize_4bit)
//   and multiplied with vdpbf16ps, 32 multiply-adds per instruction into fp32
//   accumulators, twice the fp32 FMA rate. The micro-kernel's operands hold bf16 pairs
//   along the reduction as 32-bit words ("VNNI" layout).
//
// Compiled for AVX-512 through function target attributes only, and called only after a
// runtime CPU check (cpu_has_avx512bw()).
#include "gemm_4bit_kernels.h"

#include "fourbit/detail/element_math.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "avx512_nibbles.h"
#define FOURBIT_HAVE_AVX512_PATH 1
// bf16 dot products (vdpbf16ps: 32 multiply-adds per instruction, fp32 accumulation).
#define FOURBIT_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512bf16")))
#endif

namespace fourbit {
namespace detail {

#ifdef FOURBIT_HAVE_AVX512_PATH

namespace {

// log2(blocksize): blocksizes are powers of two (validate.cpp), so the block of element e
// is e >> block_shift(w), a shift instead of a 64-bit division per 32 weights.
inline int block_shift(const Weight4bit& w) { return log2_pow2(w.blocksize); }

// Decodes one weight row to bf16, 32 elements (16 packed bytes) per call, keeping the bf16
// table of the current scale block and rebuilding it only when the block changes.
class Bf16RowDecoder {
 public:
  // The 32 bf16 values of elements [g, g + 32), g % 32 == 0 (a chunk is in one block).
  FOURBIT_AVX512 __m512i decode32(const Weight4bit& w, const float* code, int64_t g) {
    const int64_t block = g >> block_shift(w);
    if (block != block_) {
      block_ = block;
      table_ = bf16_table(code, block_scale(w.scales, block));
    }
    return _mm512_permutexvar_epi16(nibble_indices_epi16(w.packed + g / 2), table_);
  }

 private:
  int64_t block_ = -1;  // no block yet: table_ is set before its first use
  __m512i table_;
};

// dst[j] = lo[j] | hi[j] << 16 for j < 32: two permutes pick 16 lo/hi pairs each from the
// 64 halves.
FOURBIT_AVX512 inline void store_interleaved_words(__m512i lo, __m512i hi, uint32_t* dst) {
  const __m512i first = _mm512_setr_epi32(
      0x00200000, 0x00210001, 0x00220002, 0x00230003, 0x00240004, 0x00250005, 0x00260006, 0x00270007,
      0x00280008, 0x00290009, 0x002a000a, 0x002b000b, 0x002c000c, 0x002d000d, 0x002e000e, 0x002f000f);
  const __m512i second = _mm512_add_epi16(first, _mm512_set1_epi16(16));
  _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(lo, first, hi));
  _mm512_storeu_si512(dst + 16, _mm512_permutex2var_epi16(lo, second, hi));
}

}  // namespace

FOURBIT_AVX512 void decode_aligned_avx512(const Weight4bit& w, const float* code, int64_t g,
                                          int64_t len, float* out) {
  // Element order within 16 bytes: lane 2j = high nibble of byte j, lane 2j+1 = low nibble.
  const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const __m512 codes = _mm512_loadu_ps(code);
  const __m512i low_mask = _mm512_set1_epi32(0x0f);
  int64_t current_block = -1;
  __m512 table = _mm512_setzero_ps();
  const int shift = block_shift(w);
  for (int64_t i = 0; i < len; i += 32) {
    const int64_t block = (g + i) >> shift;  // 32 | blocksize: a chunk is in one block
    if (block != current_block) {
      table = _mm512_mul_ps(codes, _mm512_set1_ps(block_scale(w.scales, block)));
      current_block = block;
    }
    const __m512i b = _mm512_cvtepu8_epi32(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.packed + (g + i) / 2)));
    const __m512i hi = _mm512_srli_epi32(b, 4);
    const __m512i lo = _mm512_and_si512(b, low_mask);
    _mm512_storeu_ps(out + i, _mm512_permutexvar_ps(_mm512_permutex2var_epi32(hi, first, lo), table));
    _mm512_storeu_ps(out + i + 16,
                     _mm512_permutexvar_ps(_mm512_permutex2var_epi32(hi, second, lo), table));
  }
}

namespace {

// Transposes a 16 x 16 block of 32-bit words held in r[0..15] (r[i] = row i) and stores
// column q of it to dst + q * ld. Three shuffle stages: 32-bit pairs, 64-bit pairs, then
// a 4 x 4 transpose of 128-bit lanes.
FOURBIT_AVX512 inline void transpose16x16_store(const __m512i* r, uint32_t* dst, int64_t ld) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);      // lane: a0 b0 a1 b1
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);  // lane: a2 b2 a3 b3
  }
  for (int i = 0; i < 16; i += 4) {  // u[i + c], lane L: rows i..i+3 at column 4L + c
    u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512i w0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44);
    const __m512i w1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xee);
    const __m512i w2 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44);
    const __m512i w3 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xee);
    _mm512_storeu_si512(dst + (0 + c) * ld, _mm512_shuffle_i32x4(w0, w2, 0x88));
    _mm512_storeu_si512(dst + (4 + c) * ld, _mm512_shuffle_i32x4(w0, w2, 0xdd));
    _mm512_storeu_si512(dst + (8 + c) * ld, _mm512_shuffle_i32x4(w1, w3, 0x88));
    _mm512_storeu_si512(dst + (12 + c) * ld, _mm512_shuffle_i32x4(w1, w3, 0xdd));
  }
}

}  // namespace

FOURBIT_AVX512 void decode_transpose16_bf16_avx512(const Weight4bit& w, const float* code,
                                                   int64_t g0, int64_t stride, int64_t len,
                                                   uint32_t* dst, int64_t ld) {
  // Per 32-element chunk: the 16 rows decoded into 16 registers of pair words, transposed
  // in registers and stored as 16 tile rows; the decoded rows never touch memory.
  Bf16RowDecoder rows[16];
  for (int64_t i = 0; i < len; i += 32) {
    __m512i r[16];
    for (int jj = 0; jj < 16; ++jj) r[jj] = rows[jj].decode32(w, code, g0 + jj * stride + i);
    transpose16x16_store(r, dst + (i / 2) * ld, ld);
  }
}

FOURBIT_AVX512 void transpose16_words_avx512(const void* rows, int64_t row_stride_bytes,
                                             int64_t words, uint32_t* dst, int64_t ld) {
  const char* base = static_cast<const char*>(rows);
  int64_t q = 0;
  for (; q + 16 <= words; q += 16) {
    __m512i r[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(base + i * row_stride_bytes + 4 * q);
    transpose16x16_store(r, dst + q * ld, ld);
  }
  // The last words % 16 columns: one gather per column.
  const __m512i offsets = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(static_cast<int>(row_stride_bytes)));
  for (; q < words; ++q) {
    _mm512_storeu_si512(dst + q * ld, _mm512_i32gather_epi32(offsets, base + 4 * q, 1));
  }
}

namespace {

template <int kRows>
FOURBIT_AVX512 inline void micro_tile(int64_t R, const float* A, int64_t lda, const float* B,
                                      int64_t ldb, float* C, int64_t ldc) {
  __m512 c0[kRows], c1[kRows];
  for (int i = 0; i < kRows; ++i) {
    c0[i] = _mm512_loadu_ps(C + i * ldc);
    c1[i] = _mm512_loadu_ps(C + i * ldc + 16);
  }
  for (int64_t r = 0; r < R; ++r) {
    const __m512 b0 = _mm512_loadu_ps(B + r * ldb);
    const __m512 b1 = _mm512_loadu_ps(B + r * ldb + 16);
    for (int i = 0; i < kRows; ++i) {
      const __m512 a = _mm512_set1_ps(A[i * lda + r]);
      c0[i] = _mm512_fmadd_ps(a, b0, c0[i]);
      c1[i] = _mm512_fmadd_ps(a, b1, c1[i]);
    }
  }
  for (int i = 0; i < kRows; ++i) {
    _mm512_storeu_ps(C + i * ldc, c0[i]);
    _mm512_storeu_ps(C + i * ldc + 16, c1[i]);
  }
}

template <int kRows>
FOURBIT_AVX512 inline void dot_tile(int64_t len, const float* x, int64_t ldx, const float* w,
                                    float* acc) {
  __m512 sum[kRows];
  for (int m = 0; m < kRows; ++m) sum[m] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) {
    const __m512 wv = _mm512_loadu_ps(w + i);
    for (int m = 0; m < kRows; ++m) sum[m] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * ldx + i), wv, sum[m]);
  }
  if (i < len) {  // masked tail: lanes past len load nothing and add zero
    const __mmask16 mask = static_cast<__mmask16>((1u << (len - i)) - 1);
    const __m512 wv = _mm512_maskz_loadu_ps(mask, w + i);
    for (int m = 0; m < kRows; ++m) {
      sum[m] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, x + m * ldx + i), wv, sum[m]);
    }
  }
  for (int m = 0; m < kRows; ++m) acc[m] += _mm512_reduce_add_ps(sum[m]);
}

}  // namespace

FOURBIT_AVX512 void micro_kernel_avx512(int rows, int64_t R, const float* A, int64_t lda,
                                        const float* B, int64_t ldb, float* C, int64_t ldc) {
  switch (rows) {
    case 8: micro_tile<8>(R, A, lda, B, ldb, C, ldc); return;
    case 7: micro_tile<7>(R, A, lda, B, ldb, C, ldc); return;
    case 6: micro_tile<6>(R, A, lda, B, ldb, C, ldc); return;
    case 5: micro_tile<5>(R, A, lda, B, ldb, C, ldc); return;
    case 4: micro_tile<4>(R, A, lda, B, ldb, C, ldc); return;
    case 3: micro_tile<3>(R, A, lda, B, ldb, C, ldc); return;
    case 2: micro_tile<2>(R, A, lda, B, ldb, C, ldc); return;
    case 1: micro_tile<1>(R, A, lda, B, ldb, C, ldc); return;
    default: return;
  }
}

FOURBIT_AVX512 void dot_rows_avx512(int rows, int64_t len, const float* x, int64_t ldx,
                                    const float* w, float* acc) {
  for (int m = 0; m < rows; m += 4) {
    switch (rows - m) {
      case 1: dot_tile<1>(len, x + m * ldx, ldx, w, acc + m); break;
      case 2: dot_tile<2>(len, x + m * ldx, ldx, w, acc + m); break;
      case 3: dot_tile<3>(len, x + m * ldx, ldx, w, acc + m); break;
      default: dot_tile<4>(len, x + m * ldx, ldx, w, acc + m); break;
    }
  }
}

FOURBIT_AVX512 void decode_aligned_bf16_avx512(const Weight4bit& w, const float* code, int64_t g,
                                               int64_t len, uint16_t* out) {
  Bf16RowDecoder row;
  for (int64_t i = 0; i < len; i += 32) _mm512_storeu_si512(out + i, row.decode32(w, code, g + i));
}

FOURBIT_AVX512 void decode_pairs_bf16_avx512(const Weight4bit& w, const float* code, int64_t g0,
                                             int64_t stride, int64_t pairs, int64_t len,
                                             uint32_t* dst, int64_t ld) {
  for (int64_t q = 0; q < pairs; ++q) {
    const int64_t g_lo = g0 + 2 * q * stride, g_hi = g_lo + stride;
    Bf16RowDecoder lo, hi;
    for (int64_t i = 0; i < len; i += 32) {
      store_interleaved_words(lo.decode32(w, code, g_lo + i), hi.decode32(w, code, g_hi + i),
                              dst + q * ld + i);
    }
  }
}

FOURBIT_AVX512 int64_t store_row_bf16_avx512(const float* acc, const uint16_t* bias, int64_t len,
                                             uint16_t* out) {
  // acc + bias in fp32 (bf16 -> fp32 is a 16-bit shift), + 0.0f without a bias, exactly as
  // the scalar epilogue (which turns -0.0 into +0.0 that way), then one rounding.
  int64_t j = 0;
  for (; j + 16 <= len; j += 16) {
    __m512 b = _mm512_setzero_ps();
    if (bias != nullptr) {
      const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bias + j));
      b = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
    }
    const __m512 v = _mm512_add_ps(_mm512_loadu_ps(acc + j), b);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), _mm512_cvtepi32_epi16(to_bf16_bits(v)));
  }
  return j;
}

FOURBIT_AVX512 int64_t interleave_bf16_rows_avx512(const uint16_t* lo, const uint16_t* hi,
                                                  int64_t len, uint32_t* dst) {
  int64_t j = 0;
  for (; j + 32 <= len; j += 32) {
    store_interleaved_words(_mm512_loadu_si512(lo + j), _mm512_loadu_si512(hi + j), dst + j);
  }
  return j;
}

namespace {

FOURBIT_AVX512_BF16 inline __m512bh load_bf16(const void* p) {
  return (__m512bh)_mm512_loadu_si512(p);
}

template <int kRows>
FOURBIT_AVX512_BF16 inline void micro_tile_bf16(int64_t pairs, const uint32_t* A, int64_t lda,
                                                const uint32_t* B, int64_t ldb, float* C,
                                                int64_t ldc) {
  constexpr int kVecs = kMicroColsBf16 / 16;
  __m512 c[kRows][kVecs];
  for (int i = 0; i < kRows; ++i)
    for (int v = 0; v < kVecs; ++v) c[i][v] = _mm512_loadu_ps(C + i * ldc + 16 * v);
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh b[kVecs];
    for (int v = 0; v < kVecs; ++v) b[v] = load_bf16(B + p * ldb + 16 * v);
    for (int i = 0; i < kRows; ++i) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(A[i * lda + p]));
      for (int v = 0; v < kVecs; ++v) c[i][v] = _mm512_dpbf16_ps(c[i][v], a, b[v]);
    }
  }
  for (int i = 0; i < kRows; ++i)
    for (int v = 0; v < kVecs; ++v) _mm512_storeu_ps(C + i * ldc + 16 * v, c[i][v]);
}

template <int kRows>
FOURBIT_AVX512_BF16 inline void dot_tile_bf16(int64_t len, const uint16_t* x, int64_t ldx,
                                              const uint16_t* w, float* acc) {
  __m512 sum[kRows];
  for (int m = 0; m < kRows; ++m) sum[m] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= len; i += 32) {
    const __m512bh wv = load_bf16(w + i);
    for (int m = 0; m < kRows; ++m) sum[m] = _mm512_dpbf16_ps(sum[m], load_bf16(x + m * ldx + i), wv);
  }
  if (i < len) {  // masked tail: lanes past len load zeros
    const __mmask32 mask = static_cast<__mmask32>((uint32_t{1} << (len - i)) - 1);
    const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + i);
    for (int m = 0; m < kRows; ++m) {
      sum[m] = _mm512_dpbf16_ps(sum[m], (__m512bh)_mm512_maskz_loadu_epi16(mask, x + m * ldx + i), wv);
    }
  }
  for (int m = 0; m < kRows; ++m) acc[m] += _mm512_reduce_add_ps(sum[m]);
}

}  // namespace

FOURBIT_AVX512_BF16 void micro_kernel_bf16_avx512(int rows, int64_t pairs, const uint32_t* A,
                                                  int64_t lda, const uint32_t* B, int64_t ldb,
                                                  float* C, int64_t ldc) {
  static_assert(kMicroRowsBf16 == 6, "one case per row count");
  switch (rows) {
    case 6: micro_tile_bf16<6>(pairs, A, lda, B, ldb, C, ldc); return;
    case 5: micro_tile_bf16<5>(pairs, A, lda, B, ldb, C, ldc); return;
    case 4: micro_tile_bf16<4>(pairs, A, lda, B, ldb, C, ldc); return;
    case 3: micro_tile_bf16<3>(pairs, A, lda, B, ldb, C, ldc); return;
    case 2: micro_tile_bf16<2>(pairs, A, lda, B, ldb, C, ldc); return;
    case 1: micro_tile_bf16<1>(pairs, A, lda, B, ldb, C, ldc); return;
    default: return;
  }
}

FOURBIT_AVX512_BF16 void dot_rows_bf16_avx512(int rows, int64_t len, const uint16_t* x,
                                              int64_t ldx, const uint16_t* w, float* acc) {
  for (int m = 0; m < rows; m += 4) {
    switch (rows - m) {
      case 1: dot_tile_bf16<1>(len, x + m * ldx, ldx, w, acc + m); break;
      case 2: dot_tile_bf16<2>(len, x + m * ldx, ldx, w, acc + m); break;
      case 3: dot_tile_bf16<3>(len, x + m * ldx, ldx, w, acc + m); break;
      default: dot_tile_bf16<4>(len, x + m * ldx, ldx, w, acc + m); break;
    }
  }
}

#else  // no AVX-512 path on this compiler/CPU: never called (cpu_has_avx512bw() is false)

void decode_aligned_avx512(const Weight4bit&, const float*, int64_t, int64_t, float*) {}
void micro_kernel_avx512(int, int64_t, const float*, int64_t, const float*, int64_t, float*,
                         int64_t) {}
void dot_rows_avx512(int, int64_t, const float*, int64_t, const float*, float*) {}
void transpose16_words_avx512(const void*, int64_t, int64_t, uint32_t*, int64_t) {}
void decode_transpose16_bf16_avx512(const Weight4bit&, const float*, int64_t, int64_t, int64_t,
                                    uint32_t*, int64_t) {}
int64_t interleave_bf16_rows_avx512(const uint16_t*, const uint16_t*, int64_t, uint32_t*) {
  return 0;
}
int64_t store_row_bf16_avx512(const float*, const uint16_t*, int64_t, uint16_t*) { return 0; }
void decode_aligned_bf16_avx512(const Weight4bit&, const float*, int64_t, int64_t, uint16_t*) {}
void decode_pairs_bf16_avx512(const Weight4bit&, const float*, int64_t, int64_t, int64_t, int64_t,
                              uint32_t*, int64_t) {}
void micro_kernel_bf16_avx512(int, int64_t, const uint32_t*, int64_t, const uint32_t*, int64_t,
                              float*, int64_t) {}
void dot_rows_bf16_avx512(int, int64_t, const uint16_t*, int64_t, const uint16_t*, float*) {}

#endif

}  // namespace detail
}  // namespace fourbit
