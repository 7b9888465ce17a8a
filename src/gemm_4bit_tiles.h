// The AMX tile micro-kernel of the CPU 4-bit matmul, written once over a tile "backend":
// the real tile registers (src/gemm_4bit_amx.cpp, TDPBF16PS) or a scalar emulation of
// them (src/gemm_4bit_tiles.cpp), so the tiling and the operand layout are tested on any
// CPU. Internal header.
//
// What it computes: C[rows][32] += sum_p A[i][p] . B[p][0..32) over `pairs` reduction
// pairs, where A[i][p] and B[p][j] are 32-bit words holding the bf16 pair of reduction
// rows 2p, 2p + 1 (the "VNNI" layout). It is a drop-in for micro_kernel_bf16_avx512 in
// blocked_product_bf16 (src/gemm_4bit_driver.h): the drivers already decode the 4-bit
// weight into an L2-resident B tile of pair words, panel by panel, and those panels are
// exactly the byte layout AMX's B operand wants:
//
//   A tile (16 rows x 64 bytes): 16 activation rows, 16 pair words (32 bf16) each
//   B tile (16 rows x 64 bytes): 16 reduction pairs, 16 output columns, one pair word each
//   C tile (16 rows x 64 bytes): 16 x 16 fp32 accumulators
//
//   TDPBF16PS C, A, B:  C[m][n] += A[m][2k] * B[k][2n] + A[m][2k+1] * B[k][2n+1]
//                       for k < 16 (pairs), in fp32.
//
// A 32 x 32 output block is 2 x 2 C tiles (tmm0..3) fed by two A tiles (tmm4, 5: rows 0-15,
// 16-31) and two B tiles (tmm6, 7: columns 0-15, 16-31): 4 tile products per 4 tile loads,
// 32 x 32 x 32 multiply-adds each step. A full 32-row block accumulates into the caller's
// fp32 C in place (C tiles loaded and stored with its row stride); a short row block
// (rows < 32) and a short last step (pairs % 16) go through zero-padded copies in L1
// (2-4 KiB each), so the tile loads never read or write past an operand.
//
// Why it is fast: one TDPBF16PS is 16 x 16 x 32 multiply-adds (16x a vdpbf16ps), and the
// weight reaches the tiles as decoded bf16 pairs built from the 4-bit codes in L2-sized
// pieces: the full bf16 weight is never written to memory.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "fourbit/gemm.h"

namespace fourbit {
namespace detail {

// One tile: 16 rows of 64 bytes (AMX's maximum, palette 1).
constexpr int kTileRows = 16;
constexpr int kTileBytes = 64;
// Reduction pairs per tile product: 64 bytes of A row / 4 bytes per pair word.
constexpr int64_t kTilePairs = kTileBytes / 4;
// Output block of one micro-kernel call: 2 x 2 C tiles of 16 x 16 fp32.
constexpr int kAmxMicroRows = 2 * kTileRows;
constexpr int kAmxMicroCols = 2 * kTileBytes / 4;

// The micro-kernel over a tile backend `Tiles`, which provides config(), zero<t>(),
// load<t>(ptr, stride_bytes), dp<c, a, b>(), store<t>(ptr, stride_bytes) and release().
// Tile numbers are template arguments because the AMX instructions take them as immediates.
template <typename Tiles>
void tile_micro_kernel(Tiles& tiles, int rows, int64_t pairs, const uint32_t* A, int64_t lda,
                       const uint32_t* B, int64_t ldb, float* C, int64_t ldc) {
  alignas(64) uint32_t a_pad[kAmxMicroRows][kTilePairs];
  alignas(64) uint32_t b_pad[kTilePairs][kAmxMicroCols];
  alignas(64) float c_out[kAmxMicroRows][kAmxMicroCols];
  // A full 32-row block accumulates into C in place (C tiles loaded from and stored to the
  // caller's fp32 accumulator); a short one into zeroed tiles added to C row by row after.
  const bool in_place = rows == kAmxMicroRows;
  const int64_t c_stride = ldc * static_cast<int64_t>(sizeof(float));
  const int64_t half = kTileBytes / 4;  // the second column tile's offset, in floats
  tiles.config();
  if (in_place) {
    tiles.template load<0>(C, c_stride);
    tiles.template load<1>(C + half, c_stride);
    tiles.template load<2>(C + kTileRows * ldc, c_stride);
    tiles.template load<3>(C + kTileRows * ldc + half, c_stride);
  } else {
    tiles.template zero<0>();
    tiles.template zero<1>();
    tiles.template zero<2>();
    tiles.template zero<3>();
  }
  for (int64_t p0 = 0; p0 < pairs; p0 += kTilePairs) {
    const int64_t np = std::min(kTilePairs, pairs - p0);
    const uint32_t* a = A + p0;
    int64_t a_ld = lda;
    if (np < kTilePairs || rows < kAmxMicroRows) {
      for (int i = 0; i < kAmxMicroRows; ++i) {
        for (int64_t q = 0; q < kTilePairs; ++q) {
          a_pad[i][q] = i < rows && q < np ? A[i * lda + p0 + q] : 0u;
        }
      }
      a = &a_pad[0][0];
      a_ld = kTilePairs;
    }
    const uint32_t* b = B + p0 * ldb;
    int64_t b_ld = ldb;
    if (np < kTilePairs) {
      for (int64_t q = 0; q < kTilePairs; ++q) {
        for (int j = 0; j < kAmxMicroCols; ++j) b_pad[q][j] = q < np ? B[(p0 + q) * ldb + j] : 0u;
      }
      b = &b_pad[0][0];
      b_ld = kAmxMicroCols;
    }
    tiles.template load<4>(a, a_ld * 4);
    tiles.template load<5>(a + kTileRows * a_ld, a_ld * 4);
    tiles.template load<6>(b, b_ld * 4);
    tiles.template load<7>(b + kTileBytes / 4, b_ld * 4);
    tiles.template dp<0, 4, 6>();
    tiles.template dp<1, 4, 7>();
    tiles.template dp<2, 5, 6>();
    tiles.template dp<3, 5, 7>();
  }
  if (in_place) {
    tiles.template store<0>(C, c_stride);
    tiles.template store<1>(C + half, c_stride);
    tiles.template store<2>(C + kTileRows * ldc, c_stride);
    tiles.template store<3>(C + kTileRows * ldc + half, c_stride);
    tiles.release();
    return;
  }
  constexpr int64_t kStride = kAmxMicroCols * sizeof(float);
  tiles.template store<0>(&c_out[0][0], kStride);
  tiles.template store<1>(&c_out[0][half], kStride);
  tiles.template store<2>(&c_out[kTileRows][0], kStride);
  tiles.template store<3>(&c_out[kTileRows][half], kStride);
  tiles.release();
  for (int i = 0; i < rows; ++i) {
    for (int j = 0; j < kAmxMicroCols; ++j) C[i * ldc + j] += c_out[i][j];
  }
}

// The scalar model of the tile registers and TDPBF16PS (Intel SDM: bf16 inputs with
// denormals read as zero, each product exact in fp32, the two products of a pair added
// to the accumulator in order, round to nearest even; denormal results flushed to zero).
struct EmulatedTiles {
  alignas(64) uint8_t reg[8][kTileRows][kTileBytes];
  void config() {}
  void release() {}
  template <int T>
  void zero() { std::memset(reg[T], 0, sizeof(reg[T])); }
  template <int T>
  void load(const void* src, int64_t stride) {
    for (int r = 0; r < kTileRows; ++r) {
      std::memcpy(reg[T][r], static_cast<const uint8_t*>(src) + r * stride, kTileBytes);
    }
  }
  template <int T>
  void store(void* dst, int64_t stride) const {
    for (int r = 0; r < kTileRows; ++r) {
      std::memcpy(static_cast<uint8_t*>(dst) + r * stride, reg[T][r], kTileBytes);
    }
  }
  template <int Cr, int Ar, int Br>
  void dp() { dpbf16ps(reg[Cr], reg[Ar], reg[Br]); }
  static void dpbf16ps(uint8_t (*c)[kTileBytes], const uint8_t (*a)[kTileBytes],
                       const uint8_t (*b)[kTileBytes]);
};

// The micro-kernel on the emulated tiles (any CPU) and on AMX (only when cpu_isa() is Amx).
void micro_kernel_bf16_tiles_emulated(int rows, int64_t pairs, const uint32_t* A, int64_t lda,
                                      const uint32_t* B, int64_t ldb, float* C, int64_t ldc);
void micro_kernel_bf16_amx(int rows, int64_t pairs, const uint32_t* A, int64_t lda,
                           const uint32_t* B, int64_t ldb, float* C, int64_t ldc);
// True if this build compiled the AMX kernel (the compiler takes -mamx-tile -mamx-bf16).
bool amx_kernel_compiled();
// Asks Linux for permission to use AMX tile data in this process (once; true if granted).
bool amx_request_permission();

// The portable fills of the VNNI B tile (any CPU; the same bytes as fill_forward_bf16 and
// fill_grad_input_bf16, which need AVX-512): tile[p * ld + j] = the bf16 pair of B rows
// r0 + 2p, r0 + 2p + 1 at column c0 + j (zero past rlen and for clen <= j < ld), where
// B[k][n] = W[n][k] (forward) or B[n][k] = W[n][k] (input gradient).
void fill_forward_vnni_portable(const Weight4bit& w, const float* code, int64_t r0, int64_t rlen,
                                int64_t c0, int64_t clen, uint32_t* tile, int64_t ld);
void fill_grad_input_vnni_portable(const Weight4bit& w, const float* code, int64_t r0,
                                   int64_t rlen, int64_t c0, int64_t clen, uint32_t* tile,
                                   int64_t ld);

// The bf16 products through the tile path: `emulated` runs the scalar tile model with the
// portable fills (any CPU: the tests), otherwise the AMX kernel (only when cpu_isa() is
// Amx). Same contracts as gemm_4bit / gemm_4bit_grad_input with dtype bf16.
void gemm_4bit_bf16_tiles(const Gemm4bitParams& p, bool emulated);
void gemm_4bit_grad_input_bf16_tiles(const Gemm4bitGradInputParams& p, bool emulated);

}  // namespace detail
}  // namespace fourbit
