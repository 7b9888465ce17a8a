// The fused kernel's weight layout ("fragment layout"): the packed 4-bit weight permuted so
// that one lane's 16-byte load is exactly its share of the mma.sync.m16n8k16 B operands
// for a 16 x 64 slice of W, and the block scales transposed to match. Everything that
// knows this permutation is in this header (__host__ __device__): the CPU repack/unpack
// (src/fragment_repack.cpp), the CUDA repack kernel and the fused kernel
// (cuda/gemm_4bit_fused.cu), and the CPU emulation test (tests/cpp/test_fragment_layout.cpp).
// Checkpoints never see it: state_dict() and every file keep bitsandbytes' bytes; the
// fragment copy is derived from them. Internal header.
//
// Fragment tile (nt, kt): rows n in [16 nt, 16 nt + 16) of W, columns k in [64 kt, 64 kt + 64),
// 1024 codes = 512 bytes = 32 lanes x 16 bytes. Tiles are stored kt-major (offset
// (kt * n_tiles + nt) * 512), so the tiles a CTA needs for one k step are contiguous.
// Lane l's 16 bytes are four 32-bit words, word s = the k16 step s (k in [16 s, 16 s + 16)).
// Word s holds 8 nibbles, nibble e at bits [4e, 4e + 4): e = 4 j + i, j = the n8 half of the
// tile, i = the element of mma's B fragment (b0.lo, b0.hi, b1.lo, b1.hi), i.e.
//   n = 8 j + l / 4,   k = 16 s + 2 (l % 4) + (i & 1) + 8 (i >> 1)
// which is the PTX ISA's B-fragment table of m16n8k16 (row = k, col = n). N is padded to a
// multiple of 16 with zero nibbles; K must be a multiple of 64.
//
// Scales: one per (scale block kb, row n), at kb * n_pad + n (n_pad = 16 n_tiles): fp32 absmax,
// or the uint8 absmax_q of the double-quantized form (decoded in the kernel with the nested
// absmax of the original block index n * (K / blocksize) + kb). K % blocksize == 0, so a
// scale block never spans two rows. Padded rows hold 0.
#pragma once

#include <cstdint>

#include "fourbit/detail/element_math.h"
#include "fourbit/detail/host_device.h"

namespace fourbit {
namespace frag {

constexpr int kTileN = 16;     // rows of W per fragment tile: two mma n8 blocks
constexpr int kTileK = 64;     // columns of W per fragment tile: four mma k16 steps
constexpr int kLanes = 32;     // one warp loads one tile
constexpr int kLaneBytes = 16; // one 16-byte load per lane per tile (cp.async / ld.shared.v4)
constexpr int kTileBytes = kTileN * kTileK / 2;  // 512
constexpr int kWordsPerLane = kLaneBytes / 4;    // 4 k16 steps
static_assert(kTileBytes == kLanes * kLaneBytes, "a tile is one 16-byte load per lane");

struct Shape {
  int64_t n_tiles = 0;  // ceil(N / 16)
  int64_t k_tiles = 0;  // K / 64
  FOURBIT_HD int64_t n_pad() const { return n_tiles * kTileN; }
  FOURBIT_HD int64_t bytes() const { return n_tiles * k_tiles * kTileBytes; }
};

// The fragment layout of an N x K weight; K % 64 == 0 (checked by the callers).
FOURBIT_HD Shape shape_of(int64_t N, int64_t K) {
  return Shape{(N + kTileN - 1) >> 4, K >> 6};
}

struct Element {
  int64_t n;
  int64_t k;
};

// Which element of W (within its tile: n < 16, k < 64) lane `lane`'s word `word`, nibble
// `nibble` holds.
FOURBIT_HD Element element_in_tile(int lane, int word, int nibble) {
  const int j = nibble >> 2, i = nibble & 3;
  return Element{8 * j + (lane >> 2), 16 * word + 2 * (lane & 3) + (i & 1) + 8 * (i >> 1)};
}

// The element of W held by nibble `high` (0: bits 0-3, 1: bits 4-7) of fragment byte `byte`.
FOURBIT_HD Element element_of_byte(const Shape& s, int64_t byte, int high) {
  const int64_t tile = byte >> 9;  // / kTileBytes
  const int within = static_cast<int>(byte & (kTileBytes - 1));
  const int64_t kt = tile / s.n_tiles;  // host repack only; the kernels never call this
  const int64_t nt = tile - kt * s.n_tiles;
  const int lane = within >> 4, word = (within >> 2) & 3, nibble = 2 * (within & 3) + high;
  const Element e = element_in_tile(lane, word, nibble);
  return Element{nt * kTileN + e.n, kt * kTileK + e.k};
}

struct Position {
  int64_t byte;
  int shift;  // 0: low nibble, 4: high nibble
};

// Inverse of element_of_byte: where element (n, k) of W lives in the fragment layout.
FOURBIT_HD Position position_of(const Shape& s, int64_t n, int64_t k) {
  const int64_t nt = n >> 4, kt = k >> 6;
  const int nl = static_cast<int>(n & 15), kl = static_cast<int>(k & 63);
  const int word = kl >> 4, kk = kl & 15;
  const int lane = (nl & 7) * 4 + ((kk & 7) >> 1);
  const int nibble = 4 * (nl >> 3) + (kk & 1) + 2 * (kk >> 3);
  const int64_t byte = (kt * s.n_tiles + nt) * kTileBytes + lane * kLaneBytes + word * 4 + (nibble >> 1);
  return Position{byte, 4 * (nibble & 1)};
}

// Scale of (scale block kb, row n) in the transposed scale array.
FOURBIT_HD int64_t scale_index(const Shape& s, int64_t kb, int64_t n) { return kb * s.n_pad() + n; }

// The four fp32 weights of n8 half `j` in a lane's word (mma B order b0.lo, b0.hi, b1.lo,
// b1.hi), each codebook value times the row's scale, one rounding (as dequantize_4bit).
FOURBIT_HD void decode_word(uint32_t word, int j, const float* lut, float scale, float (&out)[4]) {
  const uint32_t bits = word >> (16 * j);
  FOURBIT_UNROLL
  for (int i = 0; i < 4; ++i) out[i] = detail::dequant_value(lut[(bits >> (4 * i)) & 15u], scale);
}

}  // namespace frag
}  // namespace fourbit
