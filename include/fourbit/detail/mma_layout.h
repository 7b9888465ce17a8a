// Which shared-memory element each lane addresses for `ldmatrix`, and which output element
// each accumulator register of `mma.sync.m16n8k16` holds, for the tensor-core tiled kernel
// (cuda/gemm_4bit_tiled.cu). Host-visible so tests/cpp/test_mma_layout.cpp can emulate a
// warp's ldmatrix + mma from the PTX ISA's fragment tables and check the composition is a
// matrix product. Internal header.
//
// ldmatrix .x4 loads four 8x8 b16 matrices; lanes 8q..8q+7 give the addresses of matrix q's
// rows, and register q of lane t receives row t/4, columns 2(t%4), 2(t%4)+1 of matrix q
// (.trans: column t/4, rows 2(t%4), 2(t%4)+1).
#pragma once

#include "fourbit/detail/host_device.h"

namespace fourbit {
namespace mma {

struct Coord {
  int row;
  int col;
};

// A operand, a 16 x 16 sub-tile of a row-major [m][k] tile: registers a0..a3 = (rows 0-7,
// k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15), as mma wants.
FOURBIT_HD Coord a_ldsm(int lane) { return Coord{lane % 16, (lane / 16) * 8}; }

// B operand from a [n][k] tile (the weight as rows of W: the forward's B(k, n) = W[n][k]),
// 16 columns n x 16 k, non-transposed ldmatrix: registers = (n 0-7: k 0-7, k 8-15),
// (n 8-15: k 0-7, k 8-15), i.e. b0, b1 of two n8 blocks.
FOURBIT_HD Coord b_ldsm_nk(int lane) {
  return Coord{(lane & 7) + ((lane >> 4) << 3), ((lane >> 3) & 1) * 8};
}

// B operand from a [k][n] tile (the input gradient's B(k, n) = W[k][n]), transposed
// ldmatrix: same register order as b_ldsm_nk.
FOURBIT_HD Coord b_ldsm_kn_trans(int lane) {
  return Coord{(lane & 7) + ((lane >> 3) & 1) * 8, (lane >> 4) * 8};
}

// Accumulator register c (0..3) of `lane` in a 16 x 8 output block.
FOURBIT_HD Coord acc(int lane, int c) {
  return Coord{(lane >> 2) + (c >= 2 ? 8 : 0), (lane & 3) * 2 + (c & 1)};
}

// Hopper wgmma.mma_async.m64nNk16 (sm90a), for the warpgroup path still to be built (issue
// 14, item 3). f32 accumulators: warp w of the warpgroup owns rows 16 w .. 16 w + 15, and its
// register r (0 .. N / 2 - 1) is acc(lane, r % 4) of the 16 x 8 column block r / 4.
FOURBIT_HD Coord wgmma_acc(int warp, int lane, int r) {
  const Coord c = acc(lane, r & 3);
  return Coord{16 * warp + c.row, 8 * (r >> 2) + c.col};
}

// A from registers (16-bit types): warp w holds rows 16 w .. 16 w + 15 of the 64 x 16 A tile;
// register q (0..3) of `lane` holds (row, col) and (row, col + 1), laid out as mma.m16n8k16's A.
// The fragment layout's words are exactly this for W as A (Y^T = W X^T): register q of k16
// step s is the (n8 half j = q % 2, pair r = q / 2) of frag::decode_word (test_fragment_layout).
FOURBIT_HD Coord wgmma_a_reg(int warp, int lane, int q) {
  return Coord{16 * warp + (lane >> 2) + 8 * (q & 1), 2 * (lane & 3) + 8 * (q >> 1)};
}

}  // namespace mma
}  // namespace fourbit
