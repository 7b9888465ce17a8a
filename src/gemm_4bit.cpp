// CPU 4-bit matmul: Y = X @ deq(W)^T (+ bias) and dX = dY @ deq(W), W never dequantized
// in full.
//
// Both products are C[M, cols] = A[M, R] @ B[R, cols] with B a view of the weight:
// forward B[k][n] = W[n][k] (R = K, cols = N), input gradient B[n][k] = W[n][k]
// (R = N, cols = K). One blocked driver serves both:
//
//   tasks = (column tile of kColTile) x (row chunk of kRowChunk), spread over OpenMP threads;
//   each task owns its output tile, so there are no races and no reductions across threads.
//   For each reduction slice of kRedTile, the task decodes the [kRedTile x kColTile] piece of
//   B it needs into an fp32 tile (L2-resident), converts its activation rows to fp32 once,
//   and sweeps the register micro-kernel (8 x 32 outputs) over the tile.
//
// Why it is fast: each 4-bit weight of a tile is decoded once per task and then reused by
// up to kRowChunk activation rows from cache; the micro-kernel keeps its outputs in
// registers across the whole slice (AVX-512: 16 FMAs per 10 loads).
//
// Small M (decode, M <= kGemvMaxRows) is bound by reading the weight: the gemv path
// decodes each weight row once, in L1-sized pieces, and dots it with every activation row
// while the piece is hot. Accumulation is fp32 throughout; bias is added in fp32 and the
// result rounded once to the output dtype.
//
// bf16 activations on CPUs with AVX512_BF16 take a twin of both paths built on bf16 dot
// products: the weight is decoded to bf16 (exactly dequantize_4bit's bf16 values, as
// bitsandbytes and torch would multiply them) and products accumulate in fp32. Other
// dtypes, and bf16 elsewhere, use the fp32 paths with the weight in fp32.
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "block_scale.h"
#include "dequantize_4bit_avx512.h"
#include "element_io.h"
#include "fourbit/codebook.h"
#include "fourbit/gemm.h"
#include "gemm_4bit_kernels.h"

namespace fourbit {
namespace detail {

namespace {

// Decodes [g, g + len) of the weight into `out`: scalar up to the first 32-element
// boundary and for the ragged end, `decode_aligned` (AVX-512) for whole 32-element chunks.
// `convert` turns the fp32 weight code * scale into the output element.
template <typename Out, typename Convert, typename DecodeAligned>
void decode_span(const Weight4bit& w, const float* code, int64_t g, int64_t len, Out* out,
                 const Convert& convert, const DecodeAligned& decode_aligned) {
  int64_t i = 0;
  auto scalar_until = [&](int64_t end) {
    int64_t current_block = -1;
    float scale = 0.0f;
    for (; i < end; ++i) {
      const int64_t e = g + i;
      const int64_t block = e / w.blocksize;
      if (block != current_block) {
        scale = block_scale(w.scales, block);
        current_block = block;
      }
      const uint8_t byte = w.packed[e >> 1];
      out[i] = convert(code[(e & 1) ? (byte & 0x0f) : (byte >> 4)] * scale);
    }
  };
  if (cpu_has_avx512bw()) {
    scalar_until(std::min(len, (32 - g % 32) % 32));
    const int64_t body = (len - i) / 32 * 32;
    if (body > 0) {
      decode_aligned(w, code, g + i, body, out + i);
      i += body;
    }
  }
  scalar_until(len);
}

}  // namespace

void decode_weight_span(const Weight4bit& w, const float* code, int64_t g, int64_t len,
                        float* out) {
  decode_span(w, code, g, len, out, [](float v) { return v; }, decode_aligned_avx512);
}

void decode_weight_span_bf16(const Weight4bit& w, const float* code, int64_t g, int64_t len,
                             uint16_t* out) {
  decode_span(w, code, g, len, out, float_to_bf16, decode_aligned_bf16_avx512);
}

void micro_kernel(int rows, int64_t R, const float* A, int64_t lda, const float* B, int64_t ldb,
                  float* C, int64_t ldc) {
  if (cpu_has_avx512bw()) {
    micro_kernel_avx512(rows, R, A, lda, B, ldb, C, ldc);
    return;
  }
  for (int i = 0; i < rows; ++i) {
    float* c = C + i * ldc;
    for (int64_t r = 0; r < R; ++r) {
      const float a = A[i * lda + r];
      const float* b = B + r * ldb;
      for (int j = 0; j < kMicroCols; ++j) c[j] += a * b[j];
    }
  }
}

void dot_rows(int rows, int64_t len, const float* x, int64_t ldx, const float* w, float* acc) {
  if (cpu_has_avx512bw()) {
    dot_rows_avx512(rows, len, x, ldx, w, acc);
    return;
  }
  for (int m = 0; m < rows; ++m) {
    float sum = 0.0f;
    for (int64_t i = 0; i < len; ++i) sum += x[m * ldx + i] * w[i];
    acc[m] += sum;
  }
}

}  // namespace detail

namespace {

using detail::kMicroCols;
using detail::kMicroRows;

// Forward with at most this many activation rows takes the gemv path: below it the
// blocked path's tile decode (a transpose) costs more than its register blocking saves.
constexpr int64_t kGemvMaxRows = 8;
// Weight rows the forward tile fill decodes before transposing them: 16 floats = one
// 64-byte line of a tile row.
constexpr int64_t kTransposeRows = 16;
// Weight elements a gemv step decodes at once: 2 KiB of fp32, hot in L1 for the dots.
constexpr int64_t kGemvPiece = 512;
// Output columns per task: 4 micro-kernel panels; the B tile (kRedTile x kColTile fp32,
// 128 KiB) stays in L2 while a 32-column panel of it (32 KiB) stays in L1.
constexpr int64_t kColTile = 128;
// Reduction depth per B tile.
constexpr int64_t kRedTile = 256;
// Activation rows per task: 256 x kRedTile fp32 = 256 KiB of converted activations in L2.
// Every row chunk decodes the whole weight again, so chunks are as tall as L2 allows.
constexpr int64_t kRowChunk = 256;
// The bf16 path's operands are half the size: 512 rows x kRedTile bf16 = 256 KiB.
constexpr int64_t kRowChunkBf16 = 512;
// Below this many multiply-adds the OpenMP fork costs more than it saves.
constexpr int64_t kParallelMinFlops = int64_t{1} << 18;

int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

// One task of the blocked drivers: an output tile of clen columns from c0 (ld = clen
// rounded up to whole micro-kernel panels) and mlen rows from m0.
struct OutputTile {
  int64_t c0, clen, ld, m0, mlen;
};

// The register tile of a micro-kernel: `rows` x `cols` outputs.
struct MicroShape {
  int64_t rows, cols;
};
constexpr MicroShape kFp32Micro{kMicroRows, kMicroCols};
constexpr MicroShape kBf16Micro{detail::kMicroRowsBf16, detail::kMicroColsBf16};

// Runs `body(tile, scratch, acc)` for every (column tile x row chunk) task, spread over
// OpenMP threads, then writes C = acc (+ bias), rounded once. `acc` is the task's zeroed
// fp32 [mlen][ld] accumulator; `Scratch` (tile buffers) is built once per thread and kept
// (under 1 MiB per thread).
template <typename Scratch, typename T, typename Body>
void for_each_output_tile(int64_t M, int64_t R, int64_t cols, int64_t row_chunk,
                          MicroShape micro, const T* bias, T* C, const Body& body) {
  const int64_t col_tiles = (cols + kColTile - 1) / kColTile;
  const int64_t row_chunks = (M + row_chunk - 1) / row_chunk;
  const int64_t tasks = col_tiles * row_chunks;
  const bool parallel = M * R * cols >= kParallelMinFlops && tasks > 1;
#pragma omp parallel if (parallel)
  {
    // Per-thread buffers live as long as the (pooled) thread: a call pays no allocation
    // or page faults for them, which matters for small products.
    static thread_local Scratch scratch;
    static thread_local std::vector<float> acc;
    if (acc.size() < static_cast<size_t>(row_chunk * kColTile)) acc.resize(row_chunk * kColTile);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      OutputTile t;
      t.c0 = (task % col_tiles) * kColTile;
      t.clen = std::min(kColTile, cols - t.c0);
      t.ld = round_up(t.clen, micro.cols);
      t.m0 = (task / col_tiles) * row_chunk;
      t.mlen = std::min(row_chunk, M - t.m0);
      std::fill(acc.begin(), acc.begin() + t.mlen * t.ld, 0.0f);
      body(t, scratch, acc.data());
      for (int64_t i = 0; i < t.mlen; ++i) {
        T* out = C + (t.m0 + i) * cols + t.c0;
        const float* row = acc.data() + i * t.ld;
        for (int64_t j = 0; j < t.clen; ++j) {
          const float b = bias ? detail::to_float(bias[t.c0 + j]) : 0.0f;
          out[j] = detail::from_float<T>(row[j] + b);
        }
      }
    }
  }
}

// Sweeps the micro-kernel `micro(rows, m, c)` over a tile: column panels outside (a panel
// of B stays in L1), blocks of rows inside.
template <typename Micro>
void sweep_micro_kernel(const OutputTile& t, MicroShape shape, const Micro& micro) {
  for (int64_t c = 0; c < t.ld; c += shape.cols) {
    for (int64_t m = 0; m < t.mlen; m += shape.rows) {
      micro(static_cast<int>(std::min<int64_t>(shape.rows, t.mlen - m)), m, c);
    }
  }
}

struct Fp32Scratch {
  std::vector<float> b_tile = std::vector<float>(kRedTile * kColTile);
  std::vector<float> a_pack = std::vector<float>(kRowChunk * kRedTile);
};

// C[M, cols] = A[M, R] @ B (+ bias), B produced tile by tile by `fill_b(r0, rlen, c0, clen,
// tile, ld)`, which writes B[r0 + r][c0 + j] to tile[r * ld + j] for r < rlen, j < clen and
// zeros for clen <= j < ld.
template <typename T, typename FillB>
void blocked_product(const T* A, int64_t M, int64_t R, int64_t cols, const T* bias, T* C,
                     const FillB& fill_b) {
  auto task = [&](const OutputTile& t, Fp32Scratch& s, float* acc) {
    for (int64_t r0 = 0; r0 < R; r0 += kRedTile) {
      const int64_t rlen = std::min(kRedTile, R - r0);
      fill_b(r0, rlen, t.c0, t.clen, s.b_tile.data(), t.ld);
      // fp32 activations are used in place; others are converted once per slice.
      const float* a = nullptr;
      int64_t lda = 0;
      if constexpr (std::is_same<T, float>::value) {
        a = A + t.m0 * R + r0;
        lda = R;
      } else {
        for (int64_t i = 0; i < t.mlen; ++i) {
          const T* src = A + (t.m0 + i) * R + r0;
          for (int64_t r = 0; r < rlen; ++r) s.a_pack[i * rlen + r] = detail::to_float(src[r]);
        }
        a = s.a_pack.data();
        lda = rlen;
      }
      sweep_micro_kernel(t, kFp32Micro, [&](int rows, int64_t m, int64_t c) {
        detail::micro_kernel(rows, rlen, a + m * lda, lda, s.b_tile.data() + c, t.ld,
                             acc + m * t.ld + c, t.ld);
      });
    }
  };
  for_each_output_tile<Fp32Scratch>(M, R, cols, kRowChunk, kFp32Micro, bias, C, task);
}

// Forward for small M: each weight row decoded once, in L1-sized pieces of WElem
// (`decode(g, len, piece)`), and dotted with every activation row while the piece is hot
// (`dot(rows, len, x, ldx, piece, acc)`); bias added in fp32, rounded once to T.
template <typename T, typename WElem, typename XElem, typename Decode, typename Dot>
void gemv_rows(const Gemm4bitParams& p, const XElem* x, const Decode& decode, const Dot& dot) {
  const int64_t M = p.M, N = p.weight.N, K = p.weight.K;
  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);
#pragma omp parallel for schedule(static) if (M * N * K >= kParallelMinFlops)
  for (int64_t n = 0; n < N; ++n) {
    WElem piece[kGemvPiece];
    float acc[kGemvMaxRows] = {};
    for (int64_t k0 = 0; k0 < K; k0 += kGemvPiece) {
      const int64_t len = std::min(kGemvPiece, K - k0);
      decode(n * K + k0, len, piece);
      dot(static_cast<int>(M), len, x + k0, K, piece, acc);
    }
    const float b = bias ? detail::to_float(bias[n]) : 0.0f;
    for (int64_t m = 0; m < M; ++m) y[m * N + n] = detail::from_float<T>(acc[m] + b);
  }
}

// The fp32 gemv: activations converted to fp32 once, weights decoded to fp32.
template <typename T>
void gemv_forward(const Gemm4bitParams& p, const float* code) {
  const T* x = static_cast<const T*>(p.x);
  std::vector<float> x_converted;
  const float* xf = nullptr;
  if constexpr (std::is_same<T, float>::value) {
    xf = x;
  } else {
    x_converted.resize(p.M * p.weight.K);
    for (size_t i = 0; i < x_converted.size(); ++i) x_converted[i] = detail::to_float(x[i]);
    xf = x_converted.data();
  }
  auto decode = [&](int64_t g, int64_t len, float* out) {
    detail::decode_weight_span(p.weight, code, g, len, out);
  };
  gemv_rows<T, float>(p, xf, decode, detail::dot_rows);
}

// ---------------------------------------------------------------------------- bf16 path
// bf16 activations on CPUs with AVX512_BF16: the weight is decoded to bf16 and multiplied
// with bf16 dot products (twice the fp32 FMA rate), accumulating in fp32. Same structure
// as above; the reduction is taken in pairs, so B tiles and packed activations hold 32-bit
// words of two bf16 values (reduction rows 2p and 2p + 1).

using Bf16Bits = uint16_t;

struct Bf16Scratch {
  std::vector<uint32_t> b_tile = std::vector<uint32_t>(kRedTile / 2 * kColTile);
  std::vector<uint32_t> a_pack = std::vector<uint32_t>(kRowChunkBf16 * kRedTile / 2);
};

// C[M, cols] = A[M, R] @ B (+ bias) in bf16, B produced by `fill_pairs(r0, rlen, c0, clen,
// tile, ld)`: tile[p * ld + j] = the pair (B[r0 + 2p][c0 + j], B[r0 + 2p + 1][c0 + j]),
// zero past rlen and for clen <= j < ld.
template <typename FillPairs>
void blocked_product_bf16(const detail::BFloat16* A, int64_t M, int64_t R, int64_t cols,
                          const detail::BFloat16* bias, detail::BFloat16* C,
                          const FillPairs& fill_pairs) {
  const Bf16Bits* a_bits = reinterpret_cast<const Bf16Bits*>(A);
  const bool in_place = R % 2 == 0 && reinterpret_cast<uintptr_t>(A) % 4 == 0;
  auto task = [&](const OutputTile& t, Bf16Scratch& s, float* acc) {
    for (int64_t r0 = 0; r0 < R; r0 += kRedTile) {
      const int64_t rlen = std::min(kRedTile, R - r0);
      const int64_t pairs = (rlen + 1) / 2;
      fill_pairs(r0, rlen, t.c0, t.clen, s.b_tile.data(), t.ld);
      // Activation rows as pair words: in place when every row starts on a word (even R,
      // 4-byte aligned A); otherwise a copy, with a zero partner for an odd last element.
      const uint32_t* a = nullptr;
      int64_t lda = 0;
      if (in_place) {
        a = reinterpret_cast<const uint32_t*>(a_bits + t.m0 * R + r0);
        lda = R / 2;
      } else {
        for (int64_t i = 0; i < t.mlen; ++i) {
          const Bf16Bits* src = a_bits + (t.m0 + i) * R + r0;
          uint32_t* dst = s.a_pack.data() + i * pairs;
          std::memcpy(dst, src, static_cast<size_t>(rlen / 2) * 4);
          if (rlen % 2) dst[pairs - 1] = src[rlen - 1];
        }
        a = s.a_pack.data();
        lda = pairs;
      }
      sweep_micro_kernel(t, kBf16Micro, [&](int rows, int64_t m, int64_t c) {
        detail::micro_kernel_bf16_avx512(rows, pairs, a + m * lda, lda, s.b_tile.data() + c, t.ld,
                                         acc + m * t.ld + c, t.ld);
      });
    }
  };
  for_each_output_tile<Bf16Scratch>(M, R, cols, kRowChunkBf16, kBf16Micro, bias, C, task);
}

// The bf16 gemv: bf16 activations read as they are, weights decoded to bf16.
void gemv_forward_bf16(const Gemm4bitParams& p, const float* code) {
  auto decode = [&](int64_t g, int64_t len, Bf16Bits* out) {
    detail::decode_weight_span_bf16(p.weight, code, g, len, out);
  };
  gemv_rows<detail::BFloat16, Bf16Bits>(p, static_cast<const Bf16Bits*>(p.x), decode,
                                        detail::dot_rows_bf16_avx512);
}

void gemm_forward_bf16(const Gemm4bitParams& p, const float* code) {
  if (p.M <= kGemvMaxRows) {
    gemv_forward_bf16(p, code);
    return;
  }
  const Weight4bit& w = p.weight;
  // Pair p of tile column j is the 32-bit word of weight row (c0 + j) holding its
  // elements r0 + 2p, r0 + 2p + 1: decode rows as bf16, then transpose words.
  auto fill = [&](int64_t r0, int64_t rlen, int64_t c0, int64_t clen, uint32_t* tile, int64_t ld) {
    const int64_t pairs = (rlen + 1) / 2;
    alignas(64) Bf16Bits rows[kTransposeRows][kRedTile + 2];
    for (int64_t j0 = 0; j0 < clen; j0 += kTransposeRows) {
      const int64_t group = std::min(kTransposeRows, clen - j0);
      for (int64_t jj = 0; jj < group; ++jj) {
        detail::decode_weight_span_bf16(w, code, (c0 + j0 + jj) * w.K + r0, rlen, rows[jj]);
        rows[jj][rlen] = 0;
      }
      if (group == kTransposeRows) {
        detail::transpose16_words_avx512(rows, sizeof(rows[0]), pairs, tile + j0, ld);
        continue;
      }
      for (int64_t q = 0; q < pairs; ++q) {
        uint32_t* dst = tile + q * ld + j0;
        for (int64_t jj = 0; jj < group; ++jj) std::memcpy(dst + jj, &rows[jj][2 * q], 4);
      }
    }
    for (int64_t q = 0; q < pairs; ++q) std::fill(tile + q * ld + clen, tile + (q + 1) * ld, 0u);
  };
  blocked_product_bf16(static_cast<const detail::BFloat16*>(p.x), p.M, w.K, w.N,
                       static_cast<const detail::BFloat16*>(p.bias),
                       static_cast<detail::BFloat16*>(p.y), fill);
}

void gemm_grad_input_bf16(const Gemm4bitGradInputParams& p, const float* code) {
  const Weight4bit& w = p.weight;
  // Pair p of tile column j interleaves weight rows r0 + 2p and r0 + 2p + 1 at column c0 + j.
  auto fill = [&](int64_t r0, int64_t rlen, int64_t c0, int64_t clen, uint32_t* tile, int64_t ld) {
    Bf16Bits lo[kColTile], hi[kColTile];
    for (int64_t q = 0; q < (rlen + 1) / 2; ++q) {
      const int64_t n = r0 + 2 * q;
      detail::decode_weight_span_bf16(w, code, n * w.K + c0, clen, lo);
      if (2 * q + 1 < rlen) {
        detail::decode_weight_span_bf16(w, code, (n + 1) * w.K + c0, clen, hi);
      } else {
        std::fill(hi, hi + clen, Bf16Bits{0});
      }
      uint32_t* dst = tile + q * ld;
      for (int64_t j = detail::interleave_bf16_rows_avx512(lo, hi, clen, dst); j < clen; ++j) {
        dst[j] = lo[j] | (static_cast<uint32_t>(hi[j]) << 16);
      }
      std::fill(dst + clen, dst + ld, 0u);
    }
  };
  blocked_product_bf16(static_cast<const detail::BFloat16*>(p.grad_output), p.M, w.N, w.K,
                       nullptr, static_cast<detail::BFloat16*>(p.grad_input), fill);
}

// ---------------------------------------------------------------------------- entry

template <typename T>
void gemm_forward(const Gemm4bitParams& p) {
  const Weight4bit& w = p.weight;
  const float* code = codebook_4bit(w.quant_type).data();
  if constexpr (std::is_same<T, detail::BFloat16>::value) {
    if (detail::cpu_has_avx512bf16()) {
      gemm_forward_bf16(p, code);
      return;
    }
  }
  if (p.M <= kGemvMaxRows) {
    gemv_forward<T>(p, code);
    return;
  }
  // B[k][n] = W[n][k]: decode kTransposeRows weight rows at a time, then write them out as
  // tile columns, one cache line of each tile row per step (a scalar scatter would write a
  // whole line per element).
  auto fill = [&](int64_t r0, int64_t rlen, int64_t c0, int64_t clen, float* tile, int64_t ld) {
    float rows[kTransposeRows][kRedTile];
    for (int64_t j0 = 0; j0 < clen; j0 += kTransposeRows) {
      const int64_t group = std::min(kTransposeRows, clen - j0);
      for (int64_t jj = 0; jj < group; ++jj) {
        detail::decode_weight_span(w, code, (c0 + j0 + jj) * w.K + r0, rlen, rows[jj]);
      }
      if (group == kTransposeRows && detail::cpu_has_avx512bw()) {
        detail::transpose16_words_avx512(rows, sizeof(rows[0]), rlen,
                                         reinterpret_cast<uint32_t*>(tile + j0), ld);
        continue;
      }
      for (int64_t r = 0; r < rlen; ++r) {
        float* dst = tile + r * ld + j0;
        for (int64_t jj = 0; jj < group; ++jj) dst[jj] = rows[jj][r];
      }
    }
    for (int64_t r = 0; r < rlen; ++r) std::fill(tile + r * ld + clen, tile + (r + 1) * ld, 0.0f);
  };
  blocked_product(static_cast<const T*>(p.x), p.M, w.K, w.N, static_cast<const T*>(p.bias),
                  static_cast<T*>(p.y), fill);
}

template <typename T>
void gemm_grad_input(const Gemm4bitGradInputParams& p) {
  const Weight4bit& w = p.weight;
  const float* code = codebook_4bit(w.quant_type).data();
  if constexpr (std::is_same<T, detail::BFloat16>::value) {
    if (detail::cpu_has_avx512bf16()) {
      gemm_grad_input_bf16(p, code);
      return;
    }
  }
  // B[n][k] = W[n][k]: each tile row is a piece of one weight row, decoded in place.
  auto fill = [&](int64_t r0, int64_t rlen, int64_t c0, int64_t clen, float* tile, int64_t ld) {
    for (int64_t r = 0; r < rlen; ++r) {
      detail::decode_weight_span(w, code, (r0 + r) * w.K + c0, clen, tile + r * ld);
      std::fill(tile + r * ld + clen, tile + (r + 1) * ld, 0.0f);
    }
  };
  blocked_product(static_cast<const T*>(p.grad_output), p.M, w.N, w.K, static_cast<const T*>(nullptr),
                  static_cast<T*>(p.grad_input), fill);
}

}  // namespace

void gemm_4bit(const Gemm4bitParams& p) {
  validate(p);
  if (p.M == 0 || p.weight.N == 0) return;
  detail::dispatch_dtype(p.dtype, [&](auto tag) { gemm_forward<decltype(tag)>(p); });
}

void gemm_4bit_grad_input(const Gemm4bitGradInputParams& p) {
  validate(p);
  if (p.M == 0 || p.weight.K == 0) return;
  detail::dispatch_dtype(p.dtype, [&](auto tag) { gemm_grad_input<decltype(tag)>(p); });
}

}  // namespace fourbit
