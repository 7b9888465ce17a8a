// The tensor-core tiled kernel's fragment addressing (include/fourbit/detail/mma_layout.h),
// checked on the CPU: a warp's ldmatrix.x4 (plain and .trans) and mma.m16n8k16 are emulated
// from the PTX ISA's fragment tables, fed with the lane addresses the kernel uses, and the
// accumulators read back through mma::acc must equal the matrix product. Small integers keep
// every sum exact.
#include <gtest/gtest.h>

#include <array>
#include <random>
#include <vector>

#include "fourbit/detail/mma_layout.h"

namespace {

namespace mma = fourbit::mma;
constexpr int kLanes = 32;
using Regs = std::array<std::array<std::array<float, 2>, 4>, kLanes>;  // [lane][reg][half]

// ldmatrix.sync.aligned.m8n8.x4(.trans).b16: lane 8q + r gives the address of row r of matrix
// q (8 consecutive elements); lane t's register q gets row t/4, columns 2(t%4) and 2(t%4)+1
// (transposed: column t/4, rows 2(t%4) and 2(t%4)+1).
Regs ldmatrix_x4(const std::array<const float*, kLanes>& row_addr, bool trans) {
  Regs out{};
  for (int q = 0; q < 4; ++q) {
    for (int t = 0; t < kLanes; ++t) {
      for (int h = 0; h < 2; ++h) {
        const int r = trans ? 2 * (t % 4) + h : t / 4;
        const int c = trans ? t / 4 : 2 * (t % 4) + h;
        out[t][q][h] = row_addr[8 * q + r][c];
      }
    }
  }
  return out;
}

// mma.sync.aligned.m16n8k16.row.col.f32: D = A B + C with the fragment layouts of the PTX ISA
// (g = lane / 4, t = lane % 4). a: 4 registers per lane; b: 2; c: 4 floats per lane.
void mma_m16n8k16(const Regs& a, const std::array<std::array<std::array<float, 2>, 2>, kLanes>& b,
                  std::array<std::array<float, 4>, kLanes>& c) {
  float A[16][16], B[16][8], D[16][8];
  for (int lane = 0; lane < kLanes; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int h = 0; h < 2; ++h) {
      A[g][2 * t + h] = a[lane][0][h];
      A[g + 8][2 * t + h] = a[lane][1][h];
      A[g][2 * t + 8 + h] = a[lane][2][h];
      A[g + 8][2 * t + 8 + h] = a[lane][3][h];
      B[2 * t + h][g] = b[lane][0][h];
      B[2 * t + 8 + h][g] = b[lane][1][h];
    }
    D[g][2 * t] = c[lane][0];
    D[g][2 * t + 1] = c[lane][1];
    D[g + 8][2 * t] = c[lane][2];
    D[g + 8][2 * t + 1] = c[lane][3];
  }
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 8; ++j)
      for (int k = 0; k < 16; ++k) D[i][j] += A[i][k] * B[k][j];
  for (int lane = 0; lane < kLanes; ++lane) {
    const int g = lane / 4, t = lane % 4;
    c[lane] = {D[g][2 * t], D[g][2 * t + 1], D[g + 8][2 * t], D[g + 8][2 * t + 1]};
  }
}

// One 16 x 16 output block = A[16][16] x B(k, n) over 16 columns n: two n8 mma blocks fed by
// one A load and one B load, as the kernel does per (i, j pair, kk).
void check_block(bool grad_input) {
  std::mt19937 rng(grad_input ? 5 : 4);
  std::uniform_int_distribution<int> small(-4, 4);
  constexpr int kLd = 40;  // padded row, as the kernel's tiles
  std::vector<float> a_tile(16 * kLd), w_tile(16 * kLd);
  for (auto& v : a_tile) v = static_cast<float>(small(rng));
  for (auto& v : w_tile) v = static_cast<float>(small(rng));
  // Reference B(k, n): forward W stored [n][k]; input gradient W stored [k][n].
  auto B = [&](int k, int n) { return grad_input ? w_tile[k * kLd + n] : w_tile[n * kLd + k]; };

  std::array<const float*, kLanes> a_addr, b_addr;
  for (int lane = 0; lane < kLanes; ++lane) {
    const mma::Coord ca = mma::a_ldsm(lane);
    a_addr[lane] = &a_tile[ca.row * kLd + ca.col];
    const mma::Coord cb = grad_input ? mma::b_ldsm_kn_trans(lane) : mma::b_ldsm_nk(lane);
    b_addr[lane] = &w_tile[cb.row * kLd + cb.col];
  }
  const Regs a = ldmatrix_x4(a_addr, false);
  const Regs b4 = ldmatrix_x4(b_addr, grad_input);
  for (int nb = 0; nb < 2; ++nb) {  // registers (2 nb, 2 nb + 1) are the b0, b1 of n8 block nb
    std::array<std::array<std::array<float, 2>, 2>, kLanes> b{};
    std::array<std::array<float, 4>, kLanes> c{};
    for (int lane = 0; lane < kLanes; ++lane) b[lane] = {b4[lane][2 * nb], b4[lane][2 * nb + 1]};
    mma_m16n8k16(a, b, c);
    for (int lane = 0; lane < kLanes; ++lane) {
      for (int r = 0; r < 4; ++r) {
        const mma::Coord o = mma::acc(lane, r);
        const int n = nb * 8 + o.col;
        float expect = 0.0f;
        for (int k = 0; k < 16; ++k) expect += a_tile[o.row * kLd + k] * B(k, n);
        ASSERT_EQ(c[lane][r], expect) << "lane " << lane << " reg " << r << " block " << nb;
      }
    }
  }
}

TEST(MmaLayout, ForwardFragmentsComposeToTheProduct) { check_block(false); }
TEST(MmaLayout, InputGradientFragmentsComposeToTheProduct) { check_block(true); }

// Every accumulator position of a 16 x 8 block is held by exactly one (lane, register).
TEST(MmaLayout, AccumulatorsCoverTheBlockOnce) {
  int seen[16][8] = {};
  for (int lane = 0; lane < kLanes; ++lane)
    for (int r = 0; r < 4; ++r) ++seen[mma::acc(lane, r).row][mma::acc(lane, r).col];
  for (auto& row : seen)
    for (int v : row) EXPECT_EQ(v, 1);
}

// ldmatrix needs 16-byte aligned row addresses: every lane's column offset is a multiple
// of 8 b16 elements.
TEST(MmaLayout, LaneAddressesAreSixteenByteAligned) {
  for (int lane = 0; lane < kLanes; ++lane) {
    EXPECT_EQ(mma::a_ldsm(lane).col % 8, 0);
    EXPECT_EQ(mma::b_ldsm_nk(lane).col % 8, 0);
    EXPECT_EQ(mma::b_ldsm_kn_trans(lane).col % 8, 0);
  }
}

}  // namespace
