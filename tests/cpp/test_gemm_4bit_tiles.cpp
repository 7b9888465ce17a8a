// GoogleTest suite for the AMX tile path of the CPU 4-bit matmul (src/gemm_4bit_tiles.*,
// src/gemm_4bit_amx.cpp), run on any CPU:
//
// - the scalar model of TDPBF16PS against its definition, bit for bit on exact inputs
//   (which pins the VNNI pair layout of A, B and C), and its denormals-are-zero rule;
// - the portable VNNI fills equal the AVX-512 fills byte for byte (where AVX512_BF16 is);
// - the whole tile path (drivers + tile micro-kernel on the scalar model + portable fills)
//   gives X @ deq(W)^T and dY @ deq(W) within the bf16 bound, over shapes with partial row
//   blocks, partial reduction steps and odd K, and exactly on one-hot rows;
// - the AMX kernel itself, only where cpu_isa() is Amx (skipped, and said so, elsewhere);
//   without AMX asking for it is a clear error.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "dequantize_4bit_avx512.h"
#include "fourbit/codebook.h"
#include "fourbit/cpu_features.h"
#include "fourbit/detail/element_math.h"
#include "fourbit/error.h"
#include "gemm_4bit_driver.h"
#include "gemm_4bit_tiles.h"
#include "quantized_weight.h"
#include "test_helpers.h"

namespace {

using fourbit::DType;
using fourbit::QuantType;
using fourbit::detail::bf16_to_float;
using fourbit::detail::EmulatedTiles;
using fourbit::detail::kTileBytes;
using fourbit::detail::kTileRows;
using fourbit_test::QuantizedWeight;
using fourbit_test::TypedBuffer;

uint16_t bf16_bits(float v) { return fourbit::detail::float_to_bf16(v); }

// Small integers times small integers, summed over 32 terms: every partial sum is exact
// in fp32, so the model must equal the definition bit for bit, whatever the order.
TEST(TileModel, Tdpbf16psFollowsItsDefinitionOnVnniPairs) {
  std::mt19937 rng(5);
  std::uniform_int_distribution<int> small(-8, 8);
  float a[kTileRows][32], b[kTileRows][32], c0[kTileRows][16];
  EmulatedTiles t;
  for (int r = 0; r < kTileRows; ++r) {
    for (int i = 0; i < 32; ++i) {
      a[r][i] = static_cast<float>(small(rng));
      b[r][i] = static_cast<float>(small(rng));
      const uint16_t ab = bf16_bits(a[r][i]), bb = bf16_bits(b[r][i]);
      std::memcpy(t.reg[4][r] + 2 * i, &ab, 2);
      std::memcpy(t.reg[6][r] + 2 * i, &bb, 2);
    }
    for (int n = 0; n < 16; ++n) {
      c0[r][n] = static_cast<float>(small(rng));
      std::memcpy(t.reg[0][r] + 4 * n, &c0[r][n], 4);
    }
  }
  t.dp<0, 4, 6>();
  for (int m = 0; m < kTileRows; ++m) {
    for (int n = 0; n < 16; ++n) {
      // A row m holds pairs (k, 2k / 2k+1); B row k holds column n's pair at words n.
      double want = c0[m][n];
      for (int k = 0; k < 16; ++k) {
        want += static_cast<double>(a[m][2 * k]) * b[k][2 * n];
        want += static_cast<double>(a[m][2 * k + 1]) * b[k][2 * n + 1];
      }
      float got;
      std::memcpy(&got, t.reg[0][m] + 4 * n, 4);
      ASSERT_EQ(got, static_cast<float>(want)) << "m=" << m << " n=" << n;
    }
  }
}

TEST(TileModel, Tdpbf16psReadsDenormalInputsAsZero) {
  EmulatedTiles t;
  t.zero<0>();
  t.zero<4>();
  t.zero<6>();
  const uint16_t denormal = 0x0040, one = bf16_bits(1.0f), two = bf16_bits(2.0f);
  std::memcpy(t.reg[4][0], &denormal, 2);  // A[0] pair 0, low: a denormal
  std::memcpy(t.reg[6][0], &one, 2);
  std::memcpy(t.reg[4][0] + 2, &two, 2);  // A[0] pair 0, high: 2
  std::memcpy(t.reg[6][0] + 2, &two, 2);
  t.dp<0, 4, 6>();
  float got;
  std::memcpy(&got, t.reg[0][0], 4);
  EXPECT_EQ(got, 4.0f);
}

// The fills' coverage: aligned and unaligned reduction starts, odd lengths, partial
// column panels, K not a multiple of 32 (the AVX-512 fills' scalar fallbacks).
TEST(TileFills, PortableFillsEqualTheAvx512FillsByteForByte) {
  if (!fourbit::detail::cpu_has_avx512bf16()) GTEST_SKIP() << "the AVX-512 fills need AVX512_BF16";
  using namespace fourbit::detail;
  for (const auto& [N, K] : std::vector<std::pair<int64_t, int64_t>>{{64, 512}, {45, 67}, {40, 96}}) {
    const QuantizedWeight w(N, K, 32, QuantType::NF4, true, 17);
    const auto view = w.view();
    const float* code = fourbit::codebook_4bit(QuantType::NF4).data();
    struct Span { int64_t r0, rlen, c0, clen; };
    const int64_t rmax = std::min<int64_t>(K, 256), cmax = std::min<int64_t>(N, 32);
    for (const Span s : {Span{0, rmax, 0, cmax}, Span{0, rmax - 1, 1, cmax - 1},
                         Span{K > 64 ? 32 : 0, std::min<int64_t>(rmax, K - (K > 64 ? 32 : 0)), 0, 16},
                         Span{1, 5, 3, 7}}) {
      SCOPED_TRACE(::testing::Message() << "N=" << N << " K=" << K << " r0=" << s.r0
                                        << " rlen=" << s.rlen << " c0=" << s.c0 << " clen=" << s.clen);
      const int64_t ld = 32, pairs = (s.rlen + 1) / 2;
      // Forward: B[k][n] = W[n][k] (r over K, c over N).
      std::vector<uint32_t> got(pairs * ld, 7u), want(pairs * ld, 9u);
      fill_forward_vnni_portable(view, code, s.r0, s.rlen, s.c0, s.clen, got.data(), ld);
      fill_forward_bf16(view, code, s.r0, s.rlen, s.c0, s.clen, want.data(), ld);
      ASSERT_EQ(got, want) << "forward";
      // Input gradient: B[n][k] = W[n][k] (r over N, c over K).
      const int64_t grlen = std::min<int64_t>(s.rlen, N - s.c0), gclen = std::min<int64_t>(s.clen, K - s.r0);
      const int64_t gpairs = (grlen + 1) / 2;
      std::vector<uint32_t> ggot(gpairs * ld, 7u), gwant(gpairs * ld, 9u);
      fill_grad_input_vnni_portable(view, code, s.c0, grlen, s.r0, gclen, ggot.data(), ld);
      fill_grad_input_bf16(view, code, s.c0, grlen, s.r0, gclen, gwant.data(), ld);
      ASSERT_EQ(ggot, gwant) << "grad_input";
    }
  }
}

// A portable spot check of the forward fill's layout: word (p, j) holds the bf16 weights
// W[c0 + j][r0 + 2p] (low half) and W[c0 + j][r0 + 2p + 1] (high half).
TEST(TileFills, ForwardFillPutsWeightPairsInVnniWords) {
  const int64_t N = 20, K = 70;
  const QuantizedWeight w(N, K, 64, QuantType::FP4, false, 3);
  const float* code = fourbit::codebook_4bit(QuantType::FP4).data();
  const int64_t r0 = 2, rlen = 33, c0 = 1, clen = 19, ld = 32, pairs = 17;
  std::vector<uint32_t> tile(pairs * ld, 0xdeadbeefu);
  fourbit::detail::fill_forward_vnni_portable(w.view(), code, r0, rlen, c0, clen, tile.data(), ld);
  for (int64_t p = 0; p < pairs; ++p) {
    for (int64_t j = 0; j < ld; ++j) {
      const uint32_t word = tile[p * ld + j];
      const float lo = j < clen ? w.dequantized[(c0 + j) * K + r0 + 2 * p] : 0.0f;
      const float hi = j < clen && 2 * p + 1 < rlen ? w.dequantized[(c0 + j) * K + r0 + 2 * p + 1] : 0.0f;
      ASSERT_EQ(word & 0xffffu, bf16_bits(lo)) << "p=" << p << " j=" << j;
      ASSERT_EQ(word >> 16, bf16_bits(hi)) << "p=" << p << " j=" << j;
    }
  }
}

struct Case {
  int64_t M, N, K, blocksize;
};

// Partial row blocks (M % 32), several reduction tiles and partial tile steps (K % 32,
// odd K), column tiles with remainders, more rows than a task's chunk (512).
const Case kCases[] = {{1, 33, 64, 64},   {5, 70, 100, 32},  {32, 64, 256, 64}, {33, 130, 300, 64},
                       {47, 17, 513, 128}, {64, 40, 67, 32}, {600, 20, 96, 32}};

void run_tile_grid(bool emulated) {
  uint32_t seed = 11;
  for (const Case& c : kCases) {
    for (const bool nested : {false, true}) {
      SCOPED_TRACE(::testing::Message() << "M=" << c.M << " N=" << c.N << " K=" << c.K
                                        << " nested=" << nested);
      const QuantizedWeight w(c.N, c.K, c.blocksize, QuantType::NF4, nested, seed++);
      const TypedBuffer x = TypedBuffer::from_floats(DType::BFloat16, fourbit_test::normal_data(c.M * c.K, seed++));
      const TypedBuffer bias = TypedBuffer::from_floats(DType::BFloat16, fourbit_test::normal_data(c.N, seed++));
      const TypedBuffer dy = TypedBuffer::from_floats(DType::BFloat16, fourbit_test::normal_data(c.M * c.N, seed++));
      TypedBuffer y(DType::BFloat16, c.M * c.N), dx(DType::BFloat16, c.M * c.K);
      fourbit::Gemm4bitParams p;
      p.weight = w.view();
      p.x = x.data();
      p.bias = bias.data();
      p.y = y.data();
      p.M = c.M;
      p.dtype = DType::BFloat16;
      fourbit::detail::gemm_4bit_bf16_tiles(p, emulated);
      fourbit::Gemm4bitGradInputParams g;
      g.weight = w.view();
      g.grad_output = dy.data();
      g.grad_input = dx.data();
      g.M = c.M;
      g.dtype = DType::BFloat16;
      fourbit::detail::gemm_4bit_grad_input_bf16_tiles(g, emulated);
      // Reference in float64 on the bf16-rounded weight (what the tiles multiply); bound:
      // the output rounding plus an fp32 accumulation error growing like sqrt(R).
      const double u_bf16 = std::ldexp(1.0, -8), u32 = std::ldexp(1.0, -24);
      auto wq = [&](int64_t n, int64_t k) {
        return static_cast<double>(bf16_to_float(bf16_bits(w.dequantized[n * c.K + k])));
      };
      int bad = 0;
      for (int64_t m = 0; m < c.M && bad < 5; ++m) {
        for (int64_t n = 0; n < c.N && bad < 5; ++n) {
          double s = bias.value(n), a = std::fabs(bias.value(n));
          for (int64_t k = 0; k < c.K; ++k) {
            const double t = x.value(m * c.K + k) * wq(n, k);
            s += t;
            a += std::fabs(t);
          }
          const double tol = u_bf16 * std::fabs(s) + 4.0 * std::sqrt(c.K + 1.0) * u32 * a + 1e-30;
          if (!(std::fabs(y.value(m * c.N + n) - s) <= tol)) {
            ADD_FAILURE() << "forward m=" << m << " n=" << n << " got " << y.value(m * c.N + n) << " want " << s;
            ++bad;
          }
        }
        for (int64_t k = 0; k < c.K && bad < 5; ++k) {
          double s = 0, a = 0;
          for (int64_t n = 0; n < c.N; ++n) {
            const double t = dy.value(m * c.N + n) * wq(n, k);
            s += t;
            a += std::fabs(t);
          }
          const double tol = u_bf16 * std::fabs(s) + 4.0 * std::sqrt(c.N + 1.0) * u32 * a + 1e-30;
          if (!(std::fabs(dx.value(m * c.K + k) - s) <= tol)) {
            ADD_FAILURE() << "grad_input m=" << m << " k=" << k << " got " << dx.value(m * c.K + k) << " want " << s;
            ++bad;
          }
        }
      }
    }
  }
}

TEST(TilePath, EmulatedTilesGiveTheProducts) { run_tile_grid(true); }

// One-hot rows select single weights: exact products, so every output equals the bf16
// weight bit for bit; any mix-up of rows, pairs, halves or tiles is a wrong value.
TEST(TilePath, EmulatedTilesSelectWeightsExactlyOnOneHotRows) {
  const int64_t M = 37, N = 45, K = 67;
  const QuantizedWeight w(N, K, 32, QuantType::NF4, true, 99);
  std::vector<float> x(M * K, 0.0f), dy(M * N, 0.0f);
  for (int64_t m = 0; m < M; ++m) {
    x[m * K + (m * 13) % K] = 1.0f;
    dy[m * N + (m * 7) % N] = 1.0f;
  }
  const TypedBuffer xb = TypedBuffer::from_floats(DType::BFloat16, x);
  const TypedBuffer dyb = TypedBuffer::from_floats(DType::BFloat16, dy);
  TypedBuffer y(DType::BFloat16, M * N), dx(DType::BFloat16, M * K);
  fourbit::Gemm4bitParams p;
  p.weight = w.view();
  p.x = xb.data();
  p.y = y.data();
  p.M = M;
  p.dtype = DType::BFloat16;
  fourbit::detail::gemm_4bit_bf16_tiles(p, true);
  fourbit::Gemm4bitGradInputParams g;
  g.weight = w.view();
  g.grad_output = dyb.data();
  g.grad_input = dx.data();
  g.M = M;
  g.dtype = DType::BFloat16;
  fourbit::detail::gemm_4bit_grad_input_bf16_tiles(g, true);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      ASSERT_EQ(y.bits(m * N + n), bf16_bits(w.dequantized[n * K + (m * 13) % K])) << "m=" << m << " n=" << n;
    }
    for (int64_t k = 0; k < K; ++k) {
      ASSERT_EQ(dx.bits(m * K + k), bf16_bits(w.dequantized[((m * 7) % N) * K + k])) << "m=" << m << " k=" << k;
    }
  }
}

TEST(TilePath, AmxKernelOnAmxCpus) {
  if (fourbit::cpu_isa() != fourbit::CpuIsa::Amx) {
    GTEST_SKIP() << "this CPU's class is " << fourbit::to_string(fourbit::cpu_isa())
                 << ": the AMX kernel is not run here";
  }
  run_tile_grid(false);
}

TEST(TilePath, AskingForAmxWithoutAmxIsAnError) {
  if (fourbit::cpu_isa() == fourbit::CpuIsa::Amx) GTEST_SKIP() << "this CPU has AMX";
  const QuantizedWeight w(16, 64, 64, QuantType::NF4, false, 1);
  const TypedBuffer x = TypedBuffer::from_floats(DType::BFloat16, fourbit_test::normal_data(64, 2));
  TypedBuffer y(DType::BFloat16, 16);
  fourbit::Gemm4bitParams p;
  p.weight = w.view();
  p.x = x.data();
  p.y = y.data();
  p.M = 1;
  p.dtype = DType::BFloat16;
  try {
    fourbit::detail::gemm_4bit_bf16_tiles(p, false);
    FAIL() << "no error";
  } catch (const fourbit::Error& e) {
    EXPECT_NE(std::string(e.what()).find("AMX"), std::string::npos) << e.what();
  }
}

TEST(CpuIsa, NamesTheClassAndAgreesWithTheKernelsChecks) {
  const fourbit::CpuIsa isa = fourbit::cpu_isa();
  EXPECT_EQ(isa >= fourbit::CpuIsa::Avx512, fourbit::detail::cpu_has_avx512bw());
  EXPECT_EQ(isa >= fourbit::CpuIsa::Avx512Bf16, fourbit::detail::cpu_has_avx512bf16());
  if (isa == fourbit::CpuIsa::Amx) EXPECT_TRUE(fourbit::cpu_has_amx_hardware());
  EXPECT_NE(std::string(fourbit::to_string(isa)), "unknown");
  EXPECT_FALSE(fourbit::cpu_model_name().empty());
}

}  // namespace
