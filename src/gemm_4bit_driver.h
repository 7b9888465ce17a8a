// The blocked drivers of the CPU 4-bit matmul, shared by the plain products
// (src/gemm_4bit.cpp) and the LoRA-fused ones (src/lora_4bit.cpp). Internal header.
//
// Every product is C[M, cols] = A[M, R] @ B with B produced tile by tile by a `fill`
// (decoded 4-bit weight, or a dense adapter matrix):
//
//   tasks = (column tile of kColTile) x (row chunk), spread over OpenMP threads; each task
//   owns its output tile, so there are no races and no reductions across threads. For each
//   reduction slice of kRedTile, the task fills the [kRedTile x kColTile] piece of B it needs
//   (L2-resident), converts its activation rows once, and sweeps the register micro-kernel
//   over the tile. The finished fp32 accumulator tile goes to a `finish(tile, acc)` callback,
//   which is where epilogues live (bias; LoRA's low-rank term) before the single rounding.
//
// Why it is fast: each 4-bit weight of a tile is decoded once per task and then reused by
// up to a row chunk of activation rows from cache; the micro-kernel keeps its outputs in
// registers across the whole slice (AVX-512: 16 FMAs per 10 loads; AVX2: 12 per 8). Small
// M (decode) takes gemv_rows: each weight row decoded once, in L1-sized pieces, dotted with
// every row.
//
// bf16 activations on CPUs with AVX512_BF16 take a twin built on bf16 dot products: the
// weight decoded to bf16 (exactly dequantize_4bit's bf16 values), products in fp32.
#pragma once

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "dequantize_4bit_avx512.h"
#include "element_io.h"
#include "fourbit/cpu_features.h"
#include "fourbit/gemm.h"
#include "gemm_4bit_kernels.h"
#include "gemm_4bit_tiles.h"
#include "kernel_isa.h"

namespace fourbit {
namespace detail {

// Forwards with at most kGemvMaxRows activation rows may take the gemv path; below
// gemv_max_rows<T>() they do: there the blocked path's tile decode (a transpose) costs more
// than its register blocking saves. The bf16 path's blocked kernel (decode in registers,
// bf16 dot products) wins from 5 rows (1024 x 4096 on this 2-core machine: M = 4 gemv
// 0.22 ms vs blocked 0.24 ms; M = 8 gemv 0.32 ms vs blocked 0.25 ms); fp32 gemv stays
// ahead through 8 rows (4096 x 4096: M = 6 gemv 1.6 ms vs M = 5 blocked 1.9 ms).
constexpr int64_t kGemvMaxRows = 8;
template <typename T>
int64_t gemv_max_rows() {
  return std::is_same<T, BFloat16>::value && kernel_isa() >= CpuIsa::Avx512Bf16 ? 4
                                                                               : kGemvMaxRows;
}
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

inline int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

// bf16 values as their bits (the AVX-512 kernels' view of BFloat16 arrays).
using Bf16Bits = uint16_t;

// Threads a parallel region would use (1 without OpenMP).
inline int64_t max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

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
constexpr MicroShape kBf16Micro{kMicroRowsBf16, kMicroColsBf16};

// Runs `body(tile, scratch, acc)` then `finish(tile, acc)` for every (column tile x row
// chunk) task, spread over OpenMP threads when the product has at least kParallelMinFlops
// multiply-adds (`flops`). `acc` is the task's zeroed fp32 [mlen][ld] accumulator;
// `Scratch` (tile buffers) is built once per thread and kept (under 1 MiB per thread).
template <typename Scratch, typename Body, typename Finish>
void for_each_output_tile(int64_t M, int64_t cols, int64_t flops, int64_t row_chunk,
                          MicroShape micro, const Body& body, const Finish& finish) {
  const int64_t col_tiles = (cols + kColTile - 1) / kColTile;
  // Narrow outputs (LoRA's adapter products, r columns; tiny weights) have fewer column
  // tiles than threads: shorter row chunks then give every thread a task.
  const int64_t threads = max_threads();
  if (col_tiles < threads) {
    const int64_t chunks_wanted = (threads + col_tiles - 1) / col_tiles;
    const int64_t rows = std::max<int64_t>(1, (M + chunks_wanted - 1) / chunks_wanted);
    row_chunk = std::min(row_chunk, round_up(rows, micro.rows));
  }
  const int64_t row_chunks = (M + row_chunk - 1) / row_chunk;
  const int64_t tasks = col_tiles * row_chunks;
  const bool parallel = flops >= kParallelMinFlops && tasks > 1;
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
      finish(t, acc.data());
    }
  }
}

// The plain finish: C[m0 + i][c0 + j] = acc[i][j] (+ bias[c0 + j]), rounded once to T.
template <typename T>
struct StoreTile {
  const T* bias;  // [cols] or null
  T* C;           // [M, cols]
  int64_t cols;
  void operator()(const OutputTile& t, const float* acc) const {
    for (int64_t i = 0; i < t.mlen; ++i) {
      T* out = C + (t.m0 + i) * cols + t.c0;
      const float* row = acc + i * t.ld;
      int64_t j = 0;
      if constexpr (std::is_same<T, BFloat16>::value) {
        if (kernel_isa() >= CpuIsa::Avx512) {
          const Bf16Bits* b = bias ? reinterpret_cast<const Bf16Bits*>(bias + t.c0) : nullptr;
          j = store_row_bf16_avx512(row, b, t.clen, reinterpret_cast<Bf16Bits*>(out));
        }
      }
      for (; j < t.clen; ++j) {
        const float b = bias ? to_float(bias[t.c0 + j]) : 0.0f;
        out[j] = from_float<T>(row[j] + b);
      }
    }
  }
};

// Fills one reduction slice of B panel by panel: the micro.cols columns from c are a
// contiguous [rows x micro.cols] block at tile + c * rows, with `fill(r0, rlen, c0, clen,
// dst, ld)` called per panel (ld = micro.cols). A contiguous panel (32 KiB) stays in L1;
// with the whole tile row-major (a 512-byte row stride) its lines fell into a quarter of
// L1's sets and were evicted while the micro-kernel swept it.
template <typename Elem, typename Fill>
void fill_panels(const Fill& fill, int64_t r0, int64_t rlen, int64_t rows, const OutputTile& t,
                 MicroShape micro, Elem* tile) {
  for (int64_t c = 0; c < t.ld; c += micro.cols) {
    fill(r0, rlen, t.c0 + c, std::min(micro.cols, t.clen - c), tile + c * rows, micro.cols);
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

// C[M, cols] = A[M, R] @ B, handed to `finish`. B is produced tile by tile by
// `fill_b(r0, rlen, c0, clen, tile, ld)`, which writes B[r0 + r][c0 + j] to tile[r * ld + j]
// for r < rlen, j < clen and zeros for clen <= j < ld. `extra_flops` counts work `finish`
// adds (for the parallel decision).
template <typename T, typename FillB, typename Finish>
void blocked_product(const T* A, int64_t M, int64_t R, int64_t cols, const FillB& fill_b,
                     const Finish& finish, int64_t extra_flops = 0) {
  auto task = [&](const OutputTile& t, Fp32Scratch& s, float* acc) {
    for (int64_t r0 = 0; r0 < R; r0 += kRedTile) {
      const int64_t rlen = std::min(kRedTile, R - r0);
      fill_panels(fill_b, r0, rlen, rlen, t, kFp32Micro, s.b_tile.data());
      // fp32 activations are used in place; others are converted once per slice.
      const float* a = nullptr;
      int64_t lda = 0;
      if constexpr (std::is_same<T, float>::value) {
        a = A + t.m0 * R + r0;
        lda = R;
      } else {
        for (int64_t i = 0; i < t.mlen; ++i) {
          const T* src = A + (t.m0 + i) * R + r0;
          for (int64_t r = 0; r < rlen; ++r) s.a_pack[i * rlen + r] = to_float(src[r]);
        }
        a = s.a_pack.data();
        lda = rlen;
      }
      sweep_micro_kernel(t, kFp32Micro, [&](int rows, int64_t m, int64_t c) {
        micro_kernel(rows, rlen, a + m * lda, lda, s.b_tile.data() + c * rlen, kMicroCols,
                     acc + m * t.ld + c, t.ld);
      });
    }
  };
  for_each_output_tile<Fp32Scratch>(M, cols, M * R * cols + extra_flops, kRowChunk, kFp32Micro,
                                    task, finish);
}

// A bf16 micro-kernel (C[rows][shape.cols] += A . B over pair words) and its output block:
// AVX-512's 6 x 64 register tile, or AMX's 32 x 32 block of 2 x 2 tiles (gemm_4bit_tiles.h).
using Bf16MicroFn = void (*)(int rows, int64_t pairs, const uint32_t* A, int64_t lda,
                             const uint32_t* B, int64_t ldb, float* C, int64_t ldc);
struct Bf16Micro {
  MicroShape shape;
  Bf16MicroFn fn;
};
constexpr MicroShape kAmxMicro{kAmxMicroRows, kAmxMicroCols};
// The bf16 products' kernel on this CPU: AMX tiles where kernel_isa() is Amx, else AVX-512.
inline Bf16Micro bf16_micro() {
  if (kernel_isa() == CpuIsa::Amx) return {kAmxMicro, micro_kernel_bf16_amx};
  return {kBf16Micro, micro_kernel_bf16_avx512};
}

struct Bf16Scratch {
  std::vector<uint32_t> b_tile = std::vector<uint32_t>(kRedTile / 2 * kColTile);
  std::vector<uint32_t> a_pack = std::vector<uint32_t>(kRowChunkBf16 * kRedTile / 2);
};

// The bf16 twin of blocked_product (AVX512_BF16 only). B comes from `fill_pairs(r0, rlen,
// c0, clen, tile, ld)`: tile[p * ld + j] = the pair (B[r0 + 2p][c0 + j], B[r0 + 2p + 1][c0 +
// j]), zero past rlen and for clen <= j < ld.
// `micro` is the kernel that sweeps the tile (bf16_micro() unless a test forces one).
template <typename FillPairs, typename Finish>
void blocked_product_bf16(const BFloat16* A, int64_t M, int64_t R, int64_t cols,
                          const FillPairs& fill_pairs, const Finish& finish,
                          int64_t extra_flops = 0, Bf16Micro micro = bf16_micro()) {
  const Bf16Bits* a_bits = reinterpret_cast<const Bf16Bits*>(A);
  const bool in_place = R % 2 == 0 && reinterpret_cast<uintptr_t>(A) % 4 == 0;
  auto task = [&](const OutputTile& t, Bf16Scratch& s, float* acc) {
    for (int64_t r0 = 0; r0 < R; r0 += kRedTile) {
      const int64_t rlen = std::min(kRedTile, R - r0);
      const int64_t pairs = (rlen + 1) / 2;
      fill_panels(fill_pairs, r0, rlen, pairs, t, micro.shape, s.b_tile.data());
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
      sweep_micro_kernel(t, micro.shape, [&](int rows, int64_t m, int64_t c) {
        micro.fn(rows, pairs, a + m * lda, lda, s.b_tile.data() + c * pairs, micro.shape.cols,
                 acc + m * t.ld + c, t.ld);
      });
    }
  };
  for_each_output_tile<Bf16Scratch>(M, cols, M * R * cols + extra_flops, kRowChunkBf16,
                                    micro.shape, task, finish);
}

// ------------------------------------------------------------------ the weight as B

// Forward, B[k][n] = W[n][k]: decode kTransposeRows weight rows at a time, then write them
// out as tile columns, one cache line of each tile row per step (a scalar scatter would
// write a whole line per element).
inline void fill_forward_fp32(const Weight4bit& w, const float* code, int64_t r0, int64_t rlen,
                              int64_t c0, int64_t clen, float* tile, int64_t ld) {
  float rows[kTransposeRows][kRedTile];
  const CpuIsa isa = kernel_isa();
  for (int64_t j0 = 0; j0 < clen; j0 += kTransposeRows) {
    const int64_t group = std::min(kTransposeRows, clen - j0);
    for (int64_t jj = 0; jj < group; ++jj) {
      decode_weight_span(w, code, (c0 + j0 + jj) * w.K + r0, rlen, rows[jj]);
    }
    if (group == kTransposeRows && isa >= CpuIsa::Avx2) {
      uint32_t* dst = reinterpret_cast<uint32_t*>(tile + j0);
      if (isa >= CpuIsa::Avx512) {
        transpose16_words_avx512(rows, sizeof(rows[0]), rlen, dst, ld);
      } else {
        transpose16_words_avx2(rows, sizeof(rows[0]), rlen, dst, ld);
      }
      continue;
    }
    for (int64_t r = 0; r < rlen; ++r) {
      float* dst = tile + r * ld + j0;
      for (int64_t jj = 0; jj < group; ++jj) dst[jj] = rows[jj][r];
    }
  }
  for (int64_t r = 0; r < rlen; ++r) std::fill(tile + r * ld + clen, tile + (r + 1) * ld, 0.0f);
}

// Input gradient, B[n][k] = W[n][k]: each tile row is a piece of one weight row.
inline void fill_grad_input_fp32(const Weight4bit& w, const float* code, int64_t r0, int64_t rlen,
                                 int64_t c0, int64_t clen, float* tile, int64_t ld) {
  for (int64_t r = 0; r < rlen; ++r) {
    decode_weight_span(w, code, (r0 + r) * w.K + c0, clen, tile + r * ld);
    std::fill(tile + r * ld + clen, tile + (r + 1) * ld, 0.0f);
  }
}

// bf16 forward pairs: pair p of tile column j is the 32-bit word of weight row (c0 + j)
// holding its elements r0 + 2p, r0 + 2p + 1: decode rows as bf16, then transpose words.
inline void fill_forward_bf16(const Weight4bit& w, const float* code, int64_t r0, int64_t rlen,
                              int64_t c0, int64_t clen, uint32_t* tile, int64_t ld) {
  const int64_t pairs = (rlen + 1) / 2;
  alignas(64) Bf16Bits rows[kTransposeRows][kRedTile + 2];
  // The common case, 16 rows of whole 32-element chunks: decoded and transposed in registers.
  const bool whole_chunks = w.K % 32 == 0 && r0 % 32 == 0 && rlen % 32 == 0;
  for (int64_t j0 = 0; j0 < clen; j0 += kTransposeRows) {
    const int64_t group = std::min(kTransposeRows, clen - j0);
    if (group == kTransposeRows && whole_chunks) {
      decode_transpose16_bf16_avx512(w, code, (c0 + j0) * w.K + r0, w.K, rlen, tile + j0, ld);
      continue;
    }
    for (int64_t jj = 0; jj < group; ++jj) {
      decode_weight_span_bf16(w, code, (c0 + j0 + jj) * w.K + r0, rlen, rows[jj]);
      rows[jj][rlen] = 0;
    }
    if (group == kTransposeRows) {
      transpose16_words_avx512(rows, sizeof(rows[0]), pairs, tile + j0, ld);
      continue;
    }
    for (int64_t q = 0; q < pairs; ++q) {
      uint32_t* dst = tile + q * ld + j0;
      for (int64_t jj = 0; jj < group; ++jj) std::memcpy(dst + jj, &rows[jj][2 * q], 4);
    }
  }
  for (int64_t q = 0; q < pairs; ++q) std::fill(tile + q * ld + clen, tile + (q + 1) * ld, 0u);
}

// bf16 input-gradient pairs: pair p of tile column j interleaves weight rows r0 + 2p and
// r0 + 2p + 1 at column c0 + j.
inline void fill_grad_input_bf16(const Weight4bit& w, const float* code, int64_t r0, int64_t rlen,
                                 int64_t c0, int64_t clen, uint32_t* tile, int64_t ld) {
  Bf16Bits lo[kColTile], hi[kColTile];
  int64_t q = 0;
  // The common case: whole row pairs decoded straight into pair words; then an odd last
  // row or unaligned columns through the decoded rows below.
  if (clen % 32 == 0 && c0 % 32 == 0 && w.K % 32 == 0) {
    q = rlen / 2;
    decode_pairs_bf16_avx512(w, code, r0 * w.K + c0, w.K, q, clen, tile, ld);
    for (int64_t p = 0; p < q; ++p) std::fill(tile + p * ld + clen, tile + (p + 1) * ld, 0u);
  }
  for (; q < (rlen + 1) / 2; ++q) {
    const int64_t n = r0 + 2 * q;
    decode_weight_span_bf16(w, code, n * w.K + c0, clen, lo);
    if (2 * q + 1 < rlen) {
      decode_weight_span_bf16(w, code, (n + 1) * w.K + c0, clen, hi);
    } else {
      std::fill(hi, hi + clen, Bf16Bits{0});
    }
    uint32_t* dst = tile + q * ld;
    for (int64_t j = interleave_bf16_rows_avx512(lo, hi, clen, dst); j < clen; ++j) {
      dst[j] = lo[j] | (static_cast<uint32_t>(hi[j]) << 16);
    }
    std::fill(dst + clen, dst + ld, 0u);
  }
}

// ------------------------------------------------------------------ whole products

// Forward for small M (M <= gemv_max_rows<T>()): each weight row decoded once, in L1-sized
// pieces of WElem (`decode(g, len, piece)`), and dotted with every activation row while
// the piece is hot (`dot(rows, len, x, ldx, piece, acc)`); then y[m][n] = acc + extra(m, n)
// in fp32 (bias, LoRA term), rounded once to T.
template <typename T, typename WElem, typename XElem, typename Decode, typename Dot,
          typename Extra>
void gemv_rows(const Weight4bit& w, const XElem* x, int64_t M, T* y, const Decode& decode,
               const Dot& dot, const Extra& extra) {
  const int64_t N = w.N, K = w.K;
#pragma omp parallel for schedule(static) if (M * N * K >= kParallelMinFlops)
  for (int64_t n = 0; n < N; ++n) {
    WElem piece[kGemvPiece];
    float acc[kGemvMaxRows] = {};
    for (int64_t k0 = 0; k0 < K; k0 += kGemvPiece) {
      const int64_t len = std::min(kGemvPiece, K - k0);
      decode(n * K + k0, len, piece);
      dot(static_cast<int>(M), len, x + k0, K, piece, acc);
    }
    for (int64_t m = 0; m < M; ++m) y[m * N + n] = from_float<T>(acc[m] + extra(m, n));
  }
}

// The small-M forward, y = X @ deq(W)^T + extra, picking the bf16 or fp32 flavour.
template <typename T, typename Extra>
void gemv_forward(const Weight4bit& w, const float* code, const T* x, int64_t M, T* y,
                  const Extra& extra) {
  if constexpr (std::is_same<T, BFloat16>::value) {
    if (kernel_isa() >= CpuIsa::Avx512Bf16) {
      auto decode = [&](int64_t g, int64_t len, Bf16Bits* out) {
        decode_weight_span_bf16(w, code, g, len, out);
      };
      gemv_rows<T, Bf16Bits>(w, reinterpret_cast<const Bf16Bits*>(x), M, y, decode,
                             dot_rows_bf16_avx512, extra);
      return;
    }
  }
  std::vector<float> x_converted;
  const float* xf = nullptr;
  if constexpr (std::is_same<T, float>::value) {
    xf = x;
  } else {
    x_converted.resize(M * w.K);
    for (size_t i = 0; i < x_converted.size(); ++i) x_converted[i] = to_float(x[i]);
    xf = x_converted.data();
  }
  auto decode = [&](int64_t g, int64_t len, float* out) {
    decode_weight_span(w, code, g, len, out);
  };
  gemv_rows<T, float>(w, xf, M, y, decode, dot_rows, extra);
}

// The blocked forward X[M, K] @ deq(W)^T, tiles handed to `finish`.
template <typename T, typename Finish>
void blocked_forward(const Weight4bit& w, const float* code, const T* x, int64_t M,
                     const Finish& finish, int64_t extra_flops = 0) {
  if constexpr (std::is_same<T, BFloat16>::value) {
    if (kernel_isa() >= CpuIsa::Avx512Bf16) {
      auto fill = [&](int64_t r0, int64_t rlen, int64_t c0, int64_t clen, uint32_t* tile,
                      int64_t ld) { fill_forward_bf16(w, code, r0, rlen, c0, clen, tile, ld); };
      blocked_product_bf16(x, M, w.K, w.N, fill, finish, extra_flops);
      return;
    }
  }
  auto fill = [&](int64_t r0, int64_t rlen, int64_t c0, int64_t clen, float* tile, int64_t ld) {
    fill_forward_fp32(w, code, r0, rlen, c0, clen, tile, ld);
  };
  blocked_product(x, M, w.K, w.N, fill, finish, extra_flops);
}

// The blocked input gradient dY[M, N] @ deq(W), tiles handed to `finish`.
template <typename T, typename Finish>
void blocked_grad_input(const Weight4bit& w, const float* code, const T* dy, int64_t M,
                        const Finish& finish, int64_t extra_flops = 0) {
  if constexpr (std::is_same<T, BFloat16>::value) {
    if (kernel_isa() >= CpuIsa::Avx512Bf16) {
      auto fill = [&](int64_t r0, int64_t rlen, int64_t c0, int64_t clen, uint32_t* tile,
                      int64_t ld) { fill_grad_input_bf16(w, code, r0, rlen, c0, clen, tile, ld); };
      blocked_product_bf16(dy, M, w.N, w.K, fill, finish, extra_flops);
      return;
    }
  }
  auto fill = [&](int64_t r0, int64_t rlen, int64_t c0, int64_t clen, float* tile, int64_t ld) {
    fill_grad_input_fp32(w, code, r0, rlen, c0, clen, tile, ld);
  };
  blocked_product(dy, M, w.N, w.K, fill, finish, extra_flops);
}

}  // namespace detail
}  // namespace fourbit
