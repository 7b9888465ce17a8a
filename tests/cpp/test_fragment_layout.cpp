// The fused kernel's fragment layout (include/fourbit/detail/fragment_layout.h), on the CPU:
//   - repack then unpack gives bitsandbytes' bytes and scales back, byte for byte;
//   - the permutation is a bijection and its element map is the PTX ISA's B-fragment table
//     of mma.m16n8k16 (stated again here, independently);
//   - an emulation of the kernel's warp tile product -- each lane's 16 bytes decoded by
//     frag::decode_word with its transposed scale (nested absmax decoded as the kernel does),
//     rounded to bf16, A fragments by ldmatrix from mma::a_ldsm, mma.m16n8k16 from the ISA's
//     tables, accumulators read through mma::acc -- equals X @ deq(W)^T, for the forward and
//     for the input gradient (weights transposed in registers by movmatrix, emulated);
//   - the same fragments, as wgmma's register A operand for a warpgroup (the Hopper path's
//     way to feed decoded weights to wgmma), give W X^T;
//   - the same emulations with a wrong fragment map do not.
#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <random>
#include <vector>

#include "fourbit/codebook.h"
#include "fourbit/detail/element_math.h"
#include "fourbit/detail/fragment_layout.h"
#include "fourbit/detail/launch_plan.h"
#include "fourbit/detail/mma_layout.h"
#include "fourbit/gemm_fused.h"
#include "quantized_weight.h"

namespace {

namespace frag = fourbit::frag;
namespace mma = fourbit::mma;
namespace detail = fourbit::detail;
using fourbit::QuantType;
using fourbit_test::QuantizedWeight;

constexpr int kLanes = 32;

struct Case {
  int64_t N, K, blocksize;
  QuantType quant_type;
  bool nested;
};
const Case kCases[] = {
    {1, 64, 64, QuantType::NF4, false},    {16, 64, 32, QuantType::FP4, true},
    {17, 128, 32, QuantType::NF4, true},   {50, 192, 64, QuantType::NF4, true},
    {33, 256, 256, QuantType::FP4, false}, {40, 1024, 1024, QuantType::NF4, true},
    {3, 4096, 4096, QuantType::NF4, false},
};

// The fragment copy of a weight, owning its buffers.
struct Fragments {
  std::vector<uint8_t> packed;
  std::vector<float> absmax;
  std::vector<uint8_t> absmax_q;
  explicit Fragments(const QuantizedWeight& q) {
    packed.resize(static_cast<size_t>(fourbit::fragment_packed_bytes(q.N, q.K)));
    const auto count = static_cast<size_t>(fourbit::fragment_scale_count(q.N, q.K, q.blocksize));
    void* scales = nullptr;
    if (q.nested) {
      absmax_q.resize(count);
      scales = absmax_q.data();
    } else {
      absmax.resize(count);
      scales = absmax.data();
    }
    fourbit::repack_4bit_fragments(q.view(), packed.data(), scales);
  }
};

TEST(FragmentLayout, RepackThenUnpackGivesTheSameBytes) {
  for (const Case& c : kCases) {
    const QuantizedWeight q(c.N, c.K, c.blocksize, c.quant_type, c.nested, 7);
    const Fragments f(q);
    EXPECT_EQ(static_cast<int64_t>(f.packed.size()), ((c.N + 15) / 16) * 16 * c.K / 2);
    std::vector<uint8_t> packed(q.packed.size(), 0xAB);
    std::vector<float> absmax(q.absmax.size(), -1.0f);
    std::vector<uint8_t> absmax_q(q.absmax_q.size(), 0xCD);
    fourbit::unpack_4bit_fragments(q.view(), f.packed.data(),
                                   c.nested ? static_cast<const void*>(f.absmax_q.data()) : f.absmax.data(),
                                   packed.data(), c.nested ? static_cast<void*>(absmax_q.data()) : absmax.data());
    EXPECT_EQ(packed, q.packed) << "N=" << c.N << " K=" << c.K;
    if (c.nested) {
      EXPECT_EQ(absmax_q, q.absmax_q);
    } else {
      EXPECT_EQ(absmax, q.absmax);
    }
  }
}

TEST(FragmentLayout, PermutationIsABijection) {
  const frag::Shape s = frag::shape_of(37, 192);
  std::vector<int> seen(static_cast<size_t>(s.bytes() * 2), 0);
  for (int64_t n = 0; n < s.n_pad(); ++n) {
    for (int64_t k = 0; k < 192; ++k) {
      const frag::Position p = frag::position_of(s, n, k);
      ASSERT_TRUE(p.byte >= 0 && p.byte < s.bytes() && (p.shift == 0 || p.shift == 4));
      ++seen[static_cast<size_t>(p.byte * 2 + p.shift / 4)];
      const frag::Element e = frag::element_of_byte(s, p.byte, p.shift / 4);
      ASSERT_EQ(e.n, n);
      ASSERT_EQ(e.k, k);
    }
  }
  for (int v : seen) ASSERT_EQ(v, 1);
}

// PTX ISA, mma.m16n8k16 .f16/.bf16, B fragment (16 x 8, "col"): register b_r (r = 0, 1) of
// lane l holds two elements, h = 0, 1: row (k) = 2 (l % 4) + h + 8 r, column (n) = l / 4.
TEST(FragmentLayout, LaneWordsAreTheIsaBFragments) {
  for (int lane = 0; lane < kLanes; ++lane) {
    for (int word = 0; word < frag::kWordsPerLane; ++word) {
      for (int j = 0; j < 2; ++j) {
        for (int r = 0; r < 2; ++r) {
          for (int h = 0; h < 2; ++h) {
            const frag::Element e = frag::element_in_tile(lane, word, 4 * j + 2 * r + h);
            EXPECT_EQ(e.n, 8 * j + lane / 4);
            EXPECT_EQ(e.k, 16 * word + 2 * (lane % 4) + h + 8 * r);
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------- warp emulation

using Pair = std::array<float, 2>;  // one 32-bit register of two b16 values (lo, hi)

float bf16(float x) { return detail::bf16_to_float(detail::float_to_bf16(x)); }

// mma.m16n8k16.row.col, fp32 accumulate, from the ISA's tables (g = lane / 4, t = lane % 4):
// a0..a3 = A(g, 2t+h), A(g+8, 2t+h), A(g, 2t+8+h), A(g+8, 2t+8+h); b0, b1 = B(2t+h, g),
// B(2t+8+h, g); c0..c3 = C(g, 2t), C(g, 2t+1), C(g+8, 2t), C(g+8, 2t+1).
void mma_16816(const std::array<std::array<Pair, 4>, kLanes>& a, const std::array<std::array<Pair, 2>, kLanes>& b,
               std::array<std::array<float, 4>, kLanes>& c) {
  double A[16][16], B[16][8];
  for (int l = 0; l < kLanes; ++l) {
    const int g = l / 4, t = l % 4;
    for (int h = 0; h < 2; ++h) {
      A[g][2 * t + h] = a[l][0][h];
      A[g + 8][2 * t + h] = a[l][1][h];
      A[g][2 * t + 8 + h] = a[l][2][h];
      A[g + 8][2 * t + 8 + h] = a[l][3][h];
      B[2 * t + h][g] = b[l][0][h];
      B[2 * t + 8 + h][g] = b[l][1][h];
    }
  }
  for (int l = 0; l < kLanes; ++l) {
    const int g = l / 4, t = l % 4;
    for (int r = 0; r < 4; ++r) {
      const int row = g + (r >= 2 ? 8 : 0), col = 2 * t + (r & 1);
      double sum = 0;
      for (int k = 0; k < 16; ++k) sum += A[row][k] * B[k][col];
      c[l][r] += static_cast<float>(sum);
    }
  }
}

// ldmatrix.x4 (no .trans): lane 8q + i addresses row i of matrix q; register q of lane l gets
// row l / 4, columns 2 (l % 4), 2 (l % 4) + 1 of matrix q.
std::array<std::array<Pair, 4>, kLanes> ldmatrix_x4(const std::array<const float*, kLanes>& rows) {
  std::array<std::array<Pair, 4>, kLanes> out{};
  for (int l = 0; l < kLanes; ++l)
    for (int q = 0; q < 4; ++q)
      for (int h = 0; h < 2; ++h) out[l][q][h] = rows[8 * q + l / 4][2 * (l % 4) + h];
  return out;
}

// movmatrix.m8n8.trans.b16: lane l holds row l / 4, columns 2 (l % 4) + h of an 8 x 8 matrix;
// afterwards the same positions of its transpose.
std::array<Pair, kLanes> movmatrix_trans(const std::array<Pair, kLanes>& in) {
  float M[8][8];
  for (int l = 0; l < kLanes; ++l)
    for (int h = 0; h < 2; ++h) M[l / 4][2 * (l % 4) + h] = in[l][h];
  std::array<Pair, kLanes> out{};
  for (int l = 0; l < kLanes; ++l)
    for (int h = 0; h < 2; ++h) out[l][h] = M[2 * (l % 4) + h][l / 4];
  return out;
}

enum class Fault { None, SwapNibbleHalves, WrongScaleRow, TilesNMajor };

// The fused kernel's decode of one lane's share of tile (nt, kt): [word][j] -> (b0, b1) as bf16
// values, through frag::decode_word and the transposed scales. A Fault breaks one map.
struct Decoder {
  const QuantizedWeight& q;
  const Fragments& f;
  frag::Shape s;
  std::array<float, 16> lut;
  Fault fault;

  float scale(int64_t n, int64_t k) const {
    if (n >= q.N) return 0.0f;
    const int64_t kb = k / q.blocksize, idx = frag::scale_index(s, kb, n);
    if (!q.nested) return f.absmax[static_cast<size_t>(idx)];
    const int64_t block = n * (q.K / q.blocksize) + kb;
    return detail::nested_scale(q.nested_code[f.absmax_q[static_cast<size_t>(idx)]],
                                q.nested_absmax[static_cast<size_t>(block / 256)], q.offset);
  }

  // regs[word][j][r] for lane l.
  std::array<std::array<std::array<Pair, 2>, 2>, 4> lane(int64_t nt, int64_t kt, int l) const {
    const int64_t tile = fault == Fault::TilesNMajor ? nt * s.k_tiles + kt : kt * s.n_tiles + nt;
    const uint8_t* p = f.packed.data() + tile * frag::kTileBytes + l * frag::kLaneBytes;
    std::array<std::array<std::array<Pair, 2>, 2>, 4> out{};
    for (int w = 0; w < 4; ++w) {
      uint32_t word = uint32_t(p[4 * w]) | uint32_t(p[4 * w + 1]) << 8 | uint32_t(p[4 * w + 2]) << 16 |
                      uint32_t(p[4 * w + 3]) << 24;
      if (fault == Fault::SwapNibbleHalves) word = (word << 16) | (word >> 16);
      for (int j = 0; j < 2; ++j) {
        const int jj = fault == Fault::WrongScaleRow ? 1 - j : j;
        const int64_t n = nt * 16 + 8 * jj + l / 4, k = kt * 64 + 16 * w;
        float v[4];
        frag::decode_word(word, j, lut.data(), scale(n, k), v);
        out[w][j][0] = {bf16(v[0]), bf16(v[1])};
        out[w][j][1] = {bf16(v[2]), bf16(v[3])};
      }
    }
    return out;
  }
};

Decoder make_decoder(const QuantizedWeight& q, const Fragments& f, Fault fault) {
  Decoder d{q, f, frag::shape_of(q.N, q.K), {}, fault};
  const auto& code = fourbit::codebook_4bit(q.quant_type);
  for (int i = 0; i < 16; ++i) d.lut[static_cast<size_t>(i)] = code[static_cast<size_t>(i)];
  return d;
}

// Largest |emulated - reference| / (sum |x| |w|) over the output.
double forward_error(const QuantizedWeight& q, int64_t M, Fault fault) {
  const Fragments f(q);
  const Decoder d = make_decoder(q, f, fault);
  std::mt19937 rng(11);
  std::normal_distribution<float> normal;
  const int64_t Mp = (M + 15) / 16 * 16;
  std::vector<float> X(static_cast<size_t>(Mp * q.K), 0.0f);  // rows >= M: zero, as cp.async's fill
  for (int64_t i = 0; i < M * q.K; ++i) X[static_cast<size_t>(i)] = bf16(normal(rng));
  std::vector<float> Y(static_cast<size_t>(Mp * d.s.n_pad()), 0.0f);
  for (int64_t mb = 0; mb < Mp / 16; ++mb) {
    for (int64_t nt = 0; nt < d.s.n_tiles; ++nt) {
      std::array<std::array<std::array<float, 4>, kLanes>, 4> acc{};  // [n8 block of the pair... ] 2 used
      for (int64_t kt = 0; kt < d.s.k_tiles; ++kt) {
        std::array<std::array<std::array<std::array<Pair, 2>, 2>, 4>, kLanes> w;
        for (int l = 0; l < kLanes; ++l) w[l] = d.lane(nt, kt, l);
        for (int s = 0; s < 4; ++s) {
          std::array<const float*, kLanes> rows;
          for (int l = 0; l < kLanes; ++l) {
            const mma::Coord c = mma::a_ldsm(l);
            rows[l] = &X[static_cast<size_t>((mb * 16 + c.row) * q.K + kt * 64 + s * 16 + c.col)];
          }
          const auto a = ldmatrix_x4(rows);
          for (int j = 0; j < 2; ++j) {
            std::array<std::array<Pair, 2>, kLanes> b;
            for (int l = 0; l < kLanes; ++l) b[l] = w[l][s][j];
            mma_16816(a, b, acc[j]);
          }
        }
      }
      for (int j = 0; j < 2; ++j)
        for (int l = 0; l < kLanes; ++l)
          for (int r = 0; r < 4; ++r) {
            const mma::Coord o = mma::acc(l, r);
            Y[static_cast<size_t>((mb * 16 + o.row) * d.s.n_pad() + nt * 16 + 8 * j + o.col)] = acc[j][l][r];
          }
    }
  }
  double worst = 0;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < q.N; ++n) {
      double ref = 0, mag = 1e-30;
      for (int64_t k = 0; k < q.K; ++k) {
        const double x = X[static_cast<size_t>(m * q.K + k)], wv = bf16(q.dequantized[static_cast<size_t>(n * q.K + k)]);
        ref += x * wv;
        mag += std::fabs(x * wv);
      }
      worst = std::max(worst, std::fabs(Y[static_cast<size_t>(m * d.s.n_pad() + n)] - ref) / mag);
    }
  }
  return worst;
}

// dX = dY @ deq(W): A = dY [m16 x n16] by ldmatrix, B(n, k) = W[n][k] from the forward
// fragments transposed by movmatrix: output k8 block q = 2 word + r takes b0 = trans(word's
// (j = 0, r) register), b1 = trans((j = 1, r)).
double grad_error(const QuantizedWeight& q, int64_t M, Fault fault) {
  const Fragments f(q);
  const Decoder d = make_decoder(q, f, fault);
  std::mt19937 rng(12);
  std::normal_distribution<float> normal;
  const int64_t Mp = (M + 15) / 16 * 16, Np = d.s.n_pad();
  std::vector<float> dY(static_cast<size_t>(Mp * Np), 0.0f);  // padded rows and columns: zero
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < q.N; ++n) dY[static_cast<size_t>(m * Np + n)] = bf16(normal(rng));
  std::vector<float> dX(static_cast<size_t>(Mp * q.K), 0.0f);
  for (int64_t mb = 0; mb < Mp / 16; ++mb) {
    for (int64_t kt = 0; kt < d.s.k_tiles; ++kt) {
      std::array<std::array<std::array<float, 4>, kLanes>, 8> acc{};  // 8 k8 output blocks
      for (int64_t nt = 0; nt < d.s.n_tiles; ++nt) {
        std::array<const float*, kLanes> rows;
        for (int l = 0; l < kLanes; ++l) {
          const mma::Coord c = mma::a_ldsm(l);
          rows[l] = &dY[static_cast<size_t>((mb * 16 + c.row) * Np + nt * 16 + c.col)];
        }
        const auto a = ldmatrix_x4(rows);
        std::array<std::array<std::array<std::array<Pair, 2>, 2>, 4>, kLanes> w;
        for (int l = 0; l < kLanes; ++l) w[l] = d.lane(nt, kt, l);
        for (int word = 0; word < 4; ++word) {
          for (int r = 0; r < 2; ++r) {
            std::array<Pair, kLanes> in0, in1;
            for (int l = 0; l < kLanes; ++l) {
              in0[l] = w[l][word][0][r];
              in1[l] = w[l][word][1][r];
            }
            const auto t0 = movmatrix_trans(in0), t1 = movmatrix_trans(in1);
            std::array<std::array<Pair, 2>, kLanes> b;
            for (int l = 0; l < kLanes; ++l) b[l] = {t0[l], t1[l]};
            mma_16816(a, b, acc[2 * word + r]);
          }
        }
      }
      for (int qb = 0; qb < 8; ++qb)
        for (int l = 0; l < kLanes; ++l)
          for (int r = 0; r < 4; ++r) {
            const mma::Coord o = mma::acc(l, r);
            dX[static_cast<size_t>((mb * 16 + o.row) * q.K + kt * 64 + 8 * qb + o.col)] = acc[qb][l][r];
          }
    }
  }
  double worst = 0;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < q.K; ++k) {
      double ref = 0, mag = 1e-30;
      for (int64_t n = 0; n < q.N; ++n) {
        const double g = dY[static_cast<size_t>(m * Np + n)], wv = bf16(q.dequantized[static_cast<size_t>(n * q.K + k)]);
        ref += g * wv;
        mag += std::fabs(g * wv);
      }
      worst = std::max(worst, std::fabs(dX[static_cast<size_t>(m * q.K + k)] - ref) / mag);
    }
  }
  return worst;
}

// Hopper, A from registers: Y^T = W X^T by wgmma.m64nNk16 (N = 8 tokens here), the four warps
// of a warpgroup each holding one fragment tile (16 rows of W) decoded as above. The ISA's
// tables, stated independently: A register q of warp w, lane l holds rows 16 w + l / 4 + 8 (q % 2),
// columns 2 (l % 4) + 8 (q / 2) + h; accumulator register r: row 16 w + l / 4 + 8 ((r % 4) / 2),
// column 8 (r / 4) + 2 (l % 4) + r % 2. B (X^T) comes from shared memory through a descriptor
// (no register map): emulated as the plain matrix. Returns the largest relative error.
double wgmma_error(const QuantizedWeight& q, int64_t tokens, Fault fault) {
  const Fragments f(q);
  const Decoder d = make_decoder(q, f, fault);
  std::mt19937 rng(13);
  std::normal_distribution<float> normal;
  std::vector<float> X(static_cast<size_t>(tokens * q.K));
  for (auto& x : X) x = bf16(normal(rng));
  const int64_t n_groups = (d.s.n_tiles + 3) / 4;  // warpgroups of 4 fragment tiles (64 rows)
  std::vector<double> Yt(static_cast<size_t>(n_groups * 64 * tokens), 0.0);
  for (int64_t g = 0; g < n_groups; ++g) {
    for (int64_t t0 = 0; t0 < tokens; t0 += 8) {
      std::array<std::array<std::array<float, 4>, kLanes>, 4> acc{};  // [warp][lane][r], N = 8
      for (int64_t kt = 0; kt < d.s.k_tiles; ++kt) {
        std::array<std::array<std::array<std::array<std::array<Pair, 2>, 2>, 4>, kLanes>, 4> w{};
        for (int warp = 0; warp < 4; ++warp)
          if (g * 4 + warp < d.s.n_tiles)
            for (int l = 0; l < kLanes; ++l) w[warp][l] = d.lane(g * 4 + warp, kt, l);
        for (int s = 0; s < 4; ++s) {
          double A[64][16] = {}, B[16][8] = {};
          for (int warp = 0; warp < 4; ++warp)
            for (int l = 0; l < kLanes; ++l)
              for (int qr = 0; qr < 4; ++qr) {
                const int row = 16 * warp + l / 4 + 8 * (qr % 2), col = 2 * (l % 4) + 8 * (qr / 2);
                const mma::Coord c = mma::wgmma_a_reg(warp, l, qr);
                EXPECT_TRUE(c.row == row && c.col == col);
                const Pair& v = w[warp][l][s][qr % 2][qr / 2];
                A[row][col] = v[0];
                A[row][col + 1] = v[1];
              }
          for (int k = 0; k < 16; ++k)
            for (int t = 0; t < 8; ++t)
              B[k][t] = t0 + t < tokens ? X[static_cast<size_t>((t0 + t) * q.K + kt * 64 + s * 16 + k)] : 0.0f;
          for (int warp = 0; warp < 4; ++warp)
            for (int l = 0; l < kLanes; ++l)
              for (int r = 0; r < 4; ++r) {
                const int row = 16 * warp + l / 4 + 8 * ((r % 4) / 2), col = 2 * (l % 4) + r % 2;
                double sum = 0;
                for (int k = 0; k < 16; ++k) sum += A[row][k] * B[k][col];
                acc[warp][l][r] += static_cast<float>(sum);
              }
        }
      }
      for (int warp = 0; warp < 4; ++warp)
        for (int l = 0; l < kLanes; ++l)
          for (int r = 0; r < 4; ++r) {
            const mma::Coord o = mma::wgmma_acc(warp, l, r);
            if (t0 + o.col < tokens) Yt[static_cast<size_t>((g * 64 + o.row) * tokens + t0 + o.col)] = acc[warp][l][r];
          }
    }
  }
  double worst = 0;
  for (int64_t n = 0; n < q.N; ++n) {
    for (int64_t t = 0; t < tokens; ++t) {
      double ref = 0, mag = 1e-30;
      for (int64_t k = 0; k < q.K; ++k) {
        const double x = X[static_cast<size_t>(t * q.K + k)], wv = bf16(q.dequantized[static_cast<size_t>(n * q.K + k)]);
        ref += x * wv;
        mag += std::fabs(x * wv);
      }
      worst = std::max(worst, std::fabs(Yt[static_cast<size_t>(n * tokens + t)] - ref) / mag);
    }
  }
  return worst;
}

// fp32 accumulation in a different order from the double reference: ~1e-7 relative to the
// magnitude sum; a misplaced element costs O(1).
constexpr double kTolerance = 1e-5;

TEST(FragmentLayout, WarpEmulationForwardEqualsXTimesDeqWTransposed) {
  for (const Case& c : kCases) {
    if (c.K > 1024) continue;  // keep the emulation quick
    const QuantizedWeight q(c.N, c.K, c.blocksize, c.quant_type, c.nested, 3);
    for (int64_t M : {1, 5, 16, 19}) {
      EXPECT_LT(forward_error(q, M, Fault::None), kTolerance) << "N=" << c.N << " K=" << c.K << " M=" << M;
    }
  }
}

TEST(FragmentLayout, WarpEmulationInputGradientEqualsDyTimesDeqW) {
  for (const Case& c : kCases) {
    if (c.K > 1024) continue;
    const QuantizedWeight q(c.N, c.K, c.blocksize, c.quant_type, c.nested, 4);
    for (int64_t M : {1, 7, 16}) {
      EXPECT_LT(grad_error(q, M, Fault::None), kTolerance) << "N=" << c.N << " K=" << c.K << " M=" << M;
    }
  }
}

// wgmma.m64n16k16's accumulators (8 registers per lane) and register A (4 per lane) cover
// their 64 x 16 tiles once each.
TEST(FragmentLayout, WgmmaMapsCoverTheirTilesOnce) {
  int acc_seen[64][16] = {}, a_seen[64][16] = {};
  for (int warp = 0; warp < 4; ++warp)
    for (int l = 0; l < kLanes; ++l) {
      for (int r = 0; r < 8; ++r) ++acc_seen[mma::wgmma_acc(warp, l, r).row][mma::wgmma_acc(warp, l, r).col];
      for (int q = 0; q < 4; ++q)
        for (int h = 0; h < 2; ++h) ++a_seen[mma::wgmma_a_reg(warp, l, q).row][mma::wgmma_a_reg(warp, l, q).col + h];
    }
  for (int i = 0; i < 64; ++i)
    for (int j = 0; j < 16; ++j) {
      EXPECT_EQ(acc_seen[i][j], 1);
      EXPECT_EQ(a_seen[i][j], 1);
    }
}

// The same fragments feed Hopper's wgmma as its register A operand (W as A: Y^T = W X^T).
TEST(FragmentLayout, WarpgroupEmulationWgmmaRegisterAEqualsWTimesXTransposed) {
  for (const Case& c : kCases) {
    if (c.K > 1024) continue;
    const QuantizedWeight q(c.N, c.K, c.blocksize, c.quant_type, c.nested, 6);
    for (int64_t tokens : {1, 8, 13}) {
      EXPECT_LT(wgmma_error(q, tokens, Fault::None), kTolerance) << "N=" << c.N << " K=" << c.K;
    }
  }
  const QuantizedWeight q(80, 128, 64, QuantType::NF4, true, 8);
  for (Fault fault : {Fault::SwapNibbleHalves, Fault::WrongScaleRow, Fault::TilesNMajor}) {
    EXPECT_GT(wgmma_error(q, 8, fault), 1e-2) << static_cast<int>(fault);
  }
}

TEST(FragmentLayout, WarpEmulationCatchesAWrongMap) {
  const QuantizedWeight q(32, 128, 64, QuantType::NF4, true, 5);
  for (Fault fault : {Fault::SwapNibbleHalves, Fault::WrongScaleRow, Fault::TilesNMajor}) {
    EXPECT_GT(forward_error(q, 16, fault), 1e-2) << static_cast<int>(fault);
    EXPECT_GT(grad_error(q, 16, fault), 1e-2) << static_cast<int>(fault);
  }
}

TEST(FragmentLayout, UnsupportedShapesAreRefused) {
  const QuantizedWeight q(4, 96, 32, QuantType::NF4, false, 1);  // K % 64 != 0
  EXPECT_FALSE(fourbit::fragment_layout_supported(q.view()));
  std::vector<uint8_t> out(1024);
  std::vector<float> scales(64);
  EXPECT_THROW(fourbit::repack_4bit_fragments(q.view(), out.data(), scales.data()), fourbit::Error);
}

// ---------------------------------------------------------------- launch plan

namespace plan = fourbit::plan;

TEST(FusedPlan, SmallMSplitsKToFillTheDevice) {
  const plan::FusedPlan p = plan::plan_fused(1, 4096, 4096, 132);
  EXPECT_TRUE(p.small);
  EXPECT_EQ(p.col_tiles, 32);
  EXPECT_EQ(p.row_tiles, 1);
  EXPECT_EQ(p.k_stages, 64);
  EXPECT_EQ(p.splits, 8);  // ceil(264 / 32) = 9, capped by 64 / kFusedMinStagesPerSplit = 8
  EXPECT_EQ(p.stages_per_split, 8);
  EXPECT_EQ(p.workspace_bytes, 8 * 1 * 4096 * 4);
  EXPECT_EQ(p.grid.x, 32u);
  EXPECT_EQ(p.grid_z, 8u);
}

TEST(FusedPlan, SplitsCoverKWithoutEmptySplits) {
  for (int64_t M : {1, 8, 16, 17, 64, 300, 4096}) {
    for (int64_t N : {1, 1024, 4096, 14336}) {
      for (int64_t K : {64, 640, 4096, 14336}) {
        for (int sms : {1, 108, 132}) {
          const plan::FusedPlan p = plan::plan_fused(M, N, K, sms);
          ASSERT_GE(p.splits, 1);
          ASSERT_LE(p.splits, plan::kFusedMaxSplits);
          ASSERT_GE(p.splits * p.stages_per_split, p.k_stages);
          ASSERT_LT((p.splits - 1) * p.stages_per_split, p.k_stages);  // the last split has work
          ASSERT_EQ(p.grid_z, static_cast<uint32_t>(p.splits));
          ASSERT_EQ(p.workspace_bytes, p.splits > 1 ? p.splits * M * N * 4 : 0);
          ASSERT_GE(static_cast<int64_t>(p.grid.x) * p.tile_n, N);
          ASSERT_EQ(p.small, M <= plan::kFusedSmallMaxM);
          if (p.splits > 1) ASSERT_GE(p.stages_per_split * 1, std::min<int64_t>(p.k_stages, plan::kFusedMinStagesPerSplit));
        }
      }
    }
  }
}

TEST(FusedPlan, LargeMNeedsNoSplit) {
  const plan::FusedPlan p = plan::plan_fused(4096, 14336, 4096, 132);
  EXPECT_FALSE(p.small);
  EXPECT_EQ(p.splits, 1);
  EXPECT_EQ(p.workspace_bytes, 0);
  EXPECT_EQ(p.grid.y, 64u);
}

TEST(FusedPlan, EdgeCases) {
  EXPECT_THROW(plan::plan_fused(1, 16, 96, 132), fourbit::Error);  // K % 64
  EXPECT_THROW(plan::plan_fused(1, 16, 64, 0), fourbit::Error);
  const plan::FusedPlan zero = plan::plan_fused(0, 16, 64, 132);
  EXPECT_EQ(zero.splits, 1);
  EXPECT_EQ(zero.grid.x, 1u);
  const plan::FusedPlan huge = plan::plan_fused(int64_t{1} << 22, 64, 64, 132);  // > 65535 row tiles
  EXPECT_EQ(huge.grid.y, 65535u);
  EXPECT_EQ(huge.row_tiles, (int64_t{1} << 22) / 64);
}

}  // namespace

namespace {

TEST(FusedPlan, InputGradientTilesOverKAndReducesOverN) {
  namespace plan = fourbit::plan;
  const plan::FusedPlan p = plan::plan_fused_grad_input(8, 14336, 4096, 132);
  EXPECT_TRUE(p.small);
  EXPECT_EQ(p.tile_n, plan::kFusedGradSmallTileN);
  EXPECT_EQ(p.col_tiles, 4096 / 256);
  EXPECT_EQ(p.k_stages, 14336 / 64);
  EXPECT_EQ(p.workspace_bytes, p.splits * 8 * 4096 * 4);
  EXPECT_GT(p.splits, 1);
  const plan::FusedPlan odd = plan::plan_fused_grad_input(100, 24, 128, 132);  // N: one partial stage
  EXPECT_EQ(odd.k_stages, 1);
  EXPECT_EQ(odd.splits, 1);
  EXPECT_EQ(odd.col_tiles, 1);
  EXPECT_THROW(plan::plan_fused_grad_input(1, 16, 100, 132), fourbit::Error);
}

}  // namespace
