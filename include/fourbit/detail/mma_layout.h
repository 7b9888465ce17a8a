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

}  // namespace mma
}  // namespace fourbit
