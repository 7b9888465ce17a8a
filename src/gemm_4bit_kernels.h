// Inner kernels of the CPU 4-bit matmul (src/gemm_4bit.cpp): weight decode, the register
// micro-kernel and the gemv dot products, each in a portable, an AVX2 and an AVX-512
// flavour (picked per call from kernel_isa(), src/kernel_isa.h). Internal header.
#pragma once

#include <cstdint>

#include "fourbit/gemm.h"

namespace fourbit {
namespace detail {

// Columns of the micro-kernel's output tile: two 16-float AVX-512 registers per row.
constexpr int kMicroCols = 32;
// Rows of the micro-kernel's output tile: 8 rows x 2 registers = 16 accumulators, which
// leaves registers for the two B loads and the A broadcast.
constexpr int kMicroRows = 8;
// The bf16 micro-kernel's tile: 6 rows x 64 columns = 24 accumulators (4 per row), so each
// reduction step loads 4 vectors of B and 6 broadcasts of A for 24 dot-product
// instructions: fewer loads per multiply than 8 x 32, which keeps vdpbf16ps busy.
constexpr int kMicroColsBf16 = 64;
constexpr int kMicroRowsBf16 = 6;

// Decodes elements [g, g + len) of the flattened weight into fp32: out[i] =
// code[nibble(g + i)] * scale((g + i) / blocksize), the same floats as dequantize_4bit.
void decode_weight_span(const Weight4bit& w, const float* code, int64_t g, int64_t len,
                        float* out);

// C[rows][32] += A[rows][R] @ B[R][32] for rows <= kMicroRows (row strides lda, ldb, ldc).
void micro_kernel(int rows, int64_t R, const float* A, int64_t lda, const float* B, int64_t ldb,
                  float* C, int64_t ldc);

// acc[m] += dot(x[m * ldx .. + len], w[0 .. len]) for m < rows.
void dot_rows(int rows, int64_t len, const float* x, int64_t ldx, const float* w, float* acc);

// AVX2 + FMA versions (src/gemm_4bit_avx2.cpp; call only where kernel_isa() >= Avx2), with
// the contracts of the AVX-512 ones below. decode_aligned_avx2 needs g % 32 == 0 and
// len % 32 == 0.
void decode_aligned_avx2(const Weight4bit& w, const float* code, int64_t g, int64_t len,
                         float* out);
void micro_kernel_avx2(int rows, int64_t R, const float* A, int64_t lda, const float* B,
                       int64_t ldb, float* C, int64_t ldc);
void dot_rows_avx2(int rows, int64_t len, const float* x, int64_t ldx, const float* w, float* acc);
void transpose16_words_avx2(const void* rows, int64_t row_stride_bytes, int64_t words,
                            uint32_t* dst, int64_t ld);

// AVX-512 versions (call only when cpu_has_avx512bw()). decode_aligned_avx512 needs
// g % 32 == 0 and len % 32 == 0.
void decode_aligned_avx512(const Weight4bit& w, const float* code, int64_t g, int64_t len,
                           float* out);
void micro_kernel_avx512(int rows, int64_t R, const float* A, int64_t lda, const float* B,
                         int64_t ldb, float* C, int64_t ldc);
void dot_rows_avx512(int rows, int64_t len, const float* x, int64_t ldx, const float* w,
                     float* acc);
// dst[q * ld + j] = word q of row j, for 16 rows of 32-bit words starting row_stride_bytes
// apart (fp32 values, or bf16 pairs).
void transpose16_words_avx512(const void* rows, int64_t row_stride_bytes, int64_t words,
                              uint32_t* dst, int64_t ld);

// The bf16 flavour (call only when cpu_has_avx512bf16()): weights decoded to bf16 (the
// bits dequantize_4bit gives), products of bf16 pairs accumulated in fp32.
// decode_weight_span_bf16 works anywhere; decode_aligned_bf16_avx512 needs g % 32 == 0
// and len % 32 == 0.
void decode_weight_span_bf16(const Weight4bit& w, const float* code, int64_t g, int64_t len,
                             uint16_t* out);
void decode_aligned_bf16_avx512(const Weight4bit& w, const float* code, int64_t g, int64_t len,
                                uint16_t* out);
// dst[q * ld + jj] = the bf16 pair word q of weight row jj (its elements g0 + jj * stride +
// 2q, + 2q + 1), for jj < 16 and q < len / 2: 16 rows decoded and transposed. Needs
// g0 % 32 == 0, stride % 32 == 0 and len % 32 == 0.
void decode_transpose16_bf16_avx512(const Weight4bit& w, const float* code, int64_t g0,
                                    int64_t stride, int64_t len, uint32_t* dst, int64_t ld);
// dst[q * ld + j] = bf16 bits of element g0 + 2q * stride + j | those of element
// g0 + (2q + 1) * stride + j << 16, for q < pairs and j < len: pairs of weight rows
// decoded and interleaved into pair words. Needs g0 % 32 == 0, stride % 32 == 0 and
// len % 32 == 0.
void decode_pairs_bf16_avx512(const Weight4bit& w, const float* code, int64_t g0, int64_t stride,
                              int64_t pairs, int64_t len, uint32_t* dst, int64_t ld);
// out[j] = bf16(acc[j] + bias[j]) (bias may be null), rounded as float_to_bf16, for whole
// 16-element chunks of len; returns how many it did.
int64_t store_row_bf16_avx512(const float* acc, const uint16_t* bias, int64_t len, uint16_t* out);
// dst[j] = lo[j] | hi[j] << 16 for whole 32-element chunks of len; returns how many it did.
int64_t interleave_bf16_rows_avx512(const uint16_t* lo, const uint16_t* hi, int64_t len,
                                    uint32_t* dst);
// C[rows][64] += sum_p A[i][p] . B[p][0..64) for rows <= kMicroRowsBf16, where A[i][p]
// and B[p][j] are 32-bit words holding the bf16 pair of reduction rows 2p, 2p + 1.
void micro_kernel_bf16_avx512(int rows, int64_t pairs, const uint32_t* A, int64_t lda,
                              const uint32_t* B, int64_t ldb, float* C, int64_t ldc);
// acc[m] += dot(x[m * ldx .. + len], w[0 .. len]) over bf16 values.
void dot_rows_bf16_avx512(int rows, int64_t len, const uint16_t* x, int64_t ldx,
                          const uint16_t* w, float* acc);

}  // namespace detail
}  // namespace fourbit
