// Hopper wgmma's shared-memory operand for the sm90a fused kernel (cuda/gemm_4bit_fused_sm90.cu):
// the 64-bit matrix descriptor, and the layout the kernel gives its activation tile so that
// the descriptor addresses it. Host-visible so tests/cpp/test_wgmma_smem.cpp can decode the
// descriptor bit by bit, read B through it by the PTX ISA's core-matrix rule, and prove the
// warpgroup product. Internal header.
//
// The product is Y^T = W X^T (W rows are wgmma's M, 64 per warpgroup; A = the decoded
// fragment-layout words in registers, mma::wgmma_a_reg). B = X^T, K x N with N = the CTA's X
// rows: B(k, n) = X[n][k], which is "K-major" (the k of one n contiguous): wgmma's
// non-transposed B (imm-trans-b = 0).
//
// Layout chosen: no swizzle ("interleave", descriptor swizzle mode 0). Its unit is the core
// matrix: 8 rows (n) x 16 bytes (8 k of b16), 128 contiguous bytes, row r at byte 16 r. A
// stage holds X rows [0, kRows) x k [0, 64):
//
//     byte(n, k) = (n / 8) * kSbo + (k / 8) * kLbo + (n % 8) * 16 + (k % 8) * 2
//
//     kLbo = 128  : next core matrix along K (the descriptor's "leading dimension byte offset")
//     kSbo = 1024 : next 8 rows along N (8 core matrices of k per 64-deep stage; "stride
//                   dimension byte offset")
//
//       k:  0..7   8..15  16..23 ... 56..63
//   n 0-7  [cm 0] [cm 1] [cm 2]  ... [cm 7]    <- 1024 bytes, core matrix c at 128 c
//   n 8-15 [cm 8] [cm 9]  ...                  <- next 1024 bytes
//
// k16 step s of the stage starts 2 core matrices on: descriptor start = tile + s * 2 * kLbo.
// Every 16-byte cp.async chunk (8 k of one row) is one core-matrix row, so the global ->
// shared copy needs no per-element shuffle; 8 consecutive rows of one k chunk are 128
// contiguous bytes (no bank conflict when 8 threads store them). Why not 128B swizzle: this
// layout is conflict-free for the tensor cores' 8 x 16-byte row reads as it is, and it needs
// no alignment of the tile to 1024 bytes nor a base-offset field to be right.
#pragma once

#include <cstdint>

#include "fourbit/detail/host_device.h"

namespace fourbit {
namespace wgmma {

// Descriptor swizzle modes (bits 62-63).
enum class Swizzle : uint32_t { None = 0, B128 = 1, B64 = 2, B32 = 3 };

// The matrix descriptor, PTX ISA "Matrix Descriptor Format": bits 0-13 start address >> 4,
// 16-29 leading dimension byte offset >> 4, 32-45 stride dimension byte offset >> 4, 49-51
// matrix base offset (0: the tile does not start mid swizzle pattern; unused without swizzle),
// 62-63 swizzle mode. `smem_addr` is a shared-state-space address (16-byte aligned; the 14-bit
// field covers 256 KB), the offsets multiples of 16.
FOURBIT_HD uint64_t smem_desc(uint32_t smem_addr, uint32_t lbo_bytes, uint32_t sbo_bytes,
                              Swizzle swizzle = Swizzle::None) {
  return static_cast<uint64_t>((smem_addr >> 4) & 0x3FFFu) |
         (static_cast<uint64_t>((lbo_bytes >> 4) & 0x3FFFu) << 16) |
         (static_cast<uint64_t>((sbo_bytes >> 4) & 0x3FFFu) << 32) |
         (static_cast<uint64_t>(static_cast<uint32_t>(swizzle) & 3u) << 62);
}

// The activation stage's layout (no swizzle, K-major, b16 elements).
constexpr int kStageK = 64;                 // one fragment tile deep
constexpr uint32_t kCoreBytes = 128;        // 8 rows x 16 bytes
constexpr uint32_t kLbo = kCoreBytes;       // along K
constexpr uint32_t kSbo = kCoreBytes * (kStageK / 8);  // along N: 8 core matrices of k
constexpr uint32_t kStepBytes = 2 * kLbo;   // one k16 step: two core matrices along K

// Byte offset of element (n, k) (X row n of the tile, k < 64) in the stage.
FOURBIT_HD uint32_t x_offset(int n, int k) {
  return static_cast<uint32_t>(n >> 3) * kSbo + static_cast<uint32_t>(k >> 3) * kLbo +
         static_cast<uint32_t>(n & 7) * 16u + static_cast<uint32_t>(k & 7) * 2u;
}

// Bytes of a stage of `rows` X rows (rows % 8 == 0).
FOURBIT_HD uint32_t x_stage_bytes(int rows) { return static_cast<uint32_t>(rows >> 3) * kSbo; }

// The global -> shared copy: 16-byte chunk c of a stage (c < rows * 8) is X row
// 8 (c / 64) + c % 8, k chunk (c / 8) % 8 (k = 8 that .. 8 that + 7). A warp's 32 chunks cover
// 8 rows x 4 k chunks (two full 32-byte sectors of each row), and chunk c lands at byte 16 c
// of the stage (x_offset), so consecutive threads store consecutive 16 bytes.
struct Chunk {
  int row;
  int kc;
};
FOURBIT_HD Chunk x_chunk(int c) { return Chunk{(c & 7) + ((c >> 6) << 3), (c >> 3) & 7}; }

// The descriptor of k16 step `s` of a stage whose tile starts at shared address `tile`.
FOURBIT_HD uint64_t x_step_desc(uint32_t tile, int s) {
  return smem_desc(tile + static_cast<uint32_t>(s) * kStepBytes, kLbo, kSbo, Swizzle::None);
}

}  // namespace wgmma
}  // namespace fourbit
