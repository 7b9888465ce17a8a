// GoogleTest suite for the CPU 4-bit matmul (include/fourbit/gemm.h): the forward and the
// input gradient against a float64 product with the fp32-dequantized weight, over shapes
// that hit every path (gemv, blocked tiles and their remainders, odd K, blocks straddling
// rows), every dtype, both codebooks, plain and nested scales; exact one-hot products; the
// AVX-512 bf16 epilogue against the scalar rounding; and the argument errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "dequantize_4bit_avx512.h"
#include "fourbit/detail/element_math.h"
#include "fourbit/codebook.h"
#include "fourbit/gemm.h"
#include "fourbit/quantize.h"
#include "gemm_4bit_kernels.h"
#include "quantized_weight.h"
#include "test_helpers.h"

namespace {

using fourbit::DType;
using fourbit::QuantType;
using fourbit_test::TypedBuffer;

using fourbit_test::QuantizedWeight;

using fourbit_test::unit_roundoff;

// |got - ref| <= u_out |ref| + (u_w + 4 sqrt(R) u_fp32) sum_r |a_r b_r| + tiny: the output
// rounding, the weight rounded to bf16 before the multiply (u_w, bf16 activations only: the
// AVX512_BF16 path) and an fp32 accumulation error that grows like sqrt(R) for blocked
// sums (docs/kernels.md).
void expect_close(const TypedBuffer& got, const std::vector<double>& ref,
                  const std::vector<double>& abs_ref, int64_t R, DType dtype, const char* what) {
  const double u32 = std::ldexp(1.0, -24);
  int bad = 0;
  for (size_t i = 0; i < ref.size() && bad < 5; ++i) {
    const double u_w = dtype == DType::BFloat16 ? unit_roundoff(dtype) : 0.0;
    const double tol = unit_roundoff(dtype) * std::fabs(ref[i]) +
                       (u_w + 4.0 * std::sqrt(static_cast<double>(R) + 1.0) * u32) * abs_ref[i] +
                       1e-30;
    const double err = std::fabs(static_cast<double>(got.value(i)) - ref[i]);
    if (!(err <= tol)) {
      ADD_FAILURE() << what << ": element " << i << " got " << got.value(i) << " want " << ref[i]
                    << " (err " << err << " > tol " << tol << ")";
      ++bad;
    }
  }
}

struct Case {
  int64_t M, N, K, blocksize;
};

// Shapes: gemv (M <= 8; bf16 with AVX512_BF16: M <= 4) and blocked; column tiles of 128
// with remainders; reduction tiles of 256 with remainders; odd K; K not a multiple of the
// blocksize (blocks straddle rows); N = 1.
const Case kCases[] = {
    {1, 64, 64, 64},   {3, 37, 96, 32},    {4, 130, 300, 64},  {5, 129, 257, 128},
    {8, 1, 64, 64},    {9, 33, 33, 32},    {17, 200, 130, 64}, {1, 7, 1001, 64},
    {6, 5, 7, 32},     {300, 70, 520, 256}, {2, 3, 4096, 4096}, {40, 256, 512, 64},
    {600, 20, 41, 32},  // more rows than one task's row chunk (256 fp32, 512 bf16)
};

class GemmGrid : public ::testing::TestWithParam<std::tuple<DType, QuantType, bool>> {};

TEST_P(GemmGrid, ForwardAndGradInputMatchFloat64Reference) {
  const auto [dtype, quant_type, nested] = GetParam();
  uint32_t seed = 7;
  for (const Case& c : kCases) {
    SCOPED_TRACE(::testing::Message() << "M=" << c.M << " N=" << c.N << " K=" << c.K
                                      << " blocksize=" << c.blocksize);
    const QuantizedWeight w(c.N, c.K, c.blocksize, quant_type, nested, seed++);
    const auto x_values = fourbit_test::normal_data(c.M * c.K, seed++);
    const auto bias_values = fourbit_test::normal_data(c.N, seed++);
    const TypedBuffer x = TypedBuffer::from_floats(dtype, x_values);
    const TypedBuffer bias = TypedBuffer::from_floats(dtype, bias_values);

    // Forward: Y = X W^T + bias.
    TypedBuffer y(dtype, c.M * c.N);
    fourbit::Gemm4bitParams p;
    p.weight = w.view();
    p.x = x.data();
    p.bias = bias.data();
    p.y = y.data();
    p.M = c.M;
    p.dtype = dtype;
    fourbit::gemm_4bit(p);
    std::vector<double> ref(c.M * c.N), abs_ref(c.M * c.N);
    for (int64_t m = 0; m < c.M; ++m) {
      for (int64_t n = 0; n < c.N; ++n) {
        double s = bias.value(n), a = std::fabs(bias.value(n));
        for (int64_t k = 0; k < c.K; ++k) {
          const double t = static_cast<double>(x.value(m * c.K + k)) * w.dequantized[n * c.K + k];
          s += t;
          a += std::fabs(t);
        }
        ref[m * c.N + n] = s;
        abs_ref[m * c.N + n] = a;
      }
    }
    expect_close(y, ref, abs_ref, c.K, dtype, "forward");

    // Input gradient: dX = dY W.
    const TypedBuffer dy = TypedBuffer::from_floats(dtype, fourbit_test::normal_data(c.M * c.N, seed++));
    TypedBuffer dx(dtype, c.M * c.K);
    fourbit::Gemm4bitGradInputParams g;
    g.weight = w.view();
    g.grad_output = dy.data();
    g.grad_input = dx.data();
    g.M = c.M;
    g.dtype = dtype;
    fourbit::gemm_4bit_grad_input(g);
    std::vector<double> gref(c.M * c.K), gabs(c.M * c.K);
    for (int64_t m = 0; m < c.M; ++m) {
      for (int64_t k = 0; k < c.K; ++k) {
        double s = 0, a = 0;
        for (int64_t n = 0; n < c.N; ++n) {
          const double t = static_cast<double>(dy.value(m * c.N + n)) * w.dequantized[n * c.K + k];
          s += t;
          a += std::fabs(t);
        }
        gref[m * c.K + k] = s;
        gabs[m * c.K + k] = a;
      }
    }
    expect_close(dx, gref, gabs, c.N, dtype, "grad_input");
  }
}

INSTANTIATE_TEST_SUITE_P(
    AllFormats, GemmGrid,
    ::testing::Combine(::testing::Values(DType::Float32, DType::Float16, DType::BFloat16),
                       ::testing::Values(QuantType::NF4, QuantType::FP4), ::testing::Bool()));

// One-hot activations pick out single weights: the products are exact, so fp32 outputs
// equal the fp32-decoded weight and bf16 outputs its bf16 rounding, bit for bit. This pins
// down the indexing of every element (any mix-up is a wrong value, not noise).
TEST(Gemm4bit, OneHotRowsSelectWeightsExactly) {
  for (DType dtype : {DType::Float32, DType::BFloat16}) {
    for (int64_t M : {1, 4, 5, 37}) {
      SCOPED_TRACE(::testing::Message() << "dtype=" << fourbit::to_string(dtype) << " M=" << M);
      const int64_t N = 45, K = 67;  // odd K: blocks and bytes straddle rows
      const QuantizedWeight w(N, K, 32, QuantType::NF4, true, 99);
      fourbit_test::expect_one_hot_products_exact(w, dtype, M);
    }
  }
}

// The AVX-512 bf16 epilogue gives the scalar epilogue's bits: float_to_bf16(acc + bias),
// with + 0.0f without a bias (so -0.0 becomes +0.0), ties to even, NaN -> 0x7fc0,
// overflow to infinity, subnormals; with and without a bias.
TEST(Gemm4bit, Bf16EpilogueRoundsLikeTheScalarStore) {
  if (!fourbit::detail::cpu_has_avx512bw()) GTEST_SKIP() << "the AVX-512 epilogue needs AVX-512 BW";
  using fourbit::detail::bits_float;
  using fourbit::detail::float_to_bf16;
  const std::vector<uint32_t> specials = {
      0x3f808000u, 0x3f818000u, 0xbf808000u, 0x3f80ffffu, 0x80000000u, 0x00000000u,
      0x7f800000u, 0xff800000u, 0x7fa00001u, 0xffc12345u, 0x7f7fffffu, 0x00012345u,
      0x807fffffu, 0x3f7fff80u, 0x477fff80u, 0xc2a58000u};
  std::vector<float> acc;
  std::vector<uint16_t> bias;
  for (int i = 0; i < 53; ++i) {  // three 16-wide steps and a scalar tail of 5
    acc.push_back(bits_float(specials[i % specials.size()] + (i / 16) * 0x10000u * (i % 3 == 0)));
    bias.push_back(static_cast<uint16_t>(i % 4 == 0 ? 0x0000 : i % 4 == 1 ? 0x8000 : 0x3f80 + i));
  }
  for (const bool with_bias : {false, true}) {
    SCOPED_TRACE(with_bias ? "bias" : "no bias");
    std::vector<uint16_t> out(acc.size(), 0xdead);
    const int64_t done = fourbit::detail::store_row_bf16_avx512(
        acc.data(), with_bias ? bias.data() : nullptr, static_cast<int64_t>(acc.size()), out.data());
    ASSERT_EQ(done, 48);
    for (int64_t j = 0; j < done; ++j) {
      const float b = with_bias ? fourbit::detail::bf16_to_float(bias[j]) : 0.0f;
      ASSERT_EQ(out[j], float_to_bf16(acc[j] + b)) << "j=" << j << " acc bits " << std::hex
                                                   << fourbit::detail::float_bits(acc[j]);
    }
    EXPECT_EQ(out[done], 0xdead);  // the tail is the caller's
  }
}

// M = 0 writes nothing; K = 0 gives the bias (forward) and N = 0 gives zeros (gradient).
TEST(Gemm4bit, EmptyDimensions) {
  const QuantizedWeight w(3, 0, 64, QuantType::FP4, false, 1);
  std::vector<float> bias = {1.5f, -2.0f, 0.25f};
  std::vector<float> y(2 * 3, 123.0f);
  fourbit::Gemm4bitParams p;
  p.weight = w.view();
  p.bias = bias.data();
  p.y = y.data();
  p.M = 2;
  p.dtype = DType::Float32;
  fourbit::gemm_4bit(p);
  EXPECT_EQ(y, (std::vector<float>{1.5f, -2.0f, 0.25f, 1.5f, -2.0f, 0.25f}));

  const QuantizedWeight w0(0, 5, 64, QuantType::FP4, false, 1);
  std::vector<float> dx(2 * 5, 123.0f);
  fourbit::Gemm4bitGradInputParams g;
  g.weight = w0.view();
  g.grad_input = dx.data();
  g.M = 2;
  g.dtype = DType::Float32;
  fourbit::gemm_4bit_grad_input(g);
  EXPECT_EQ(dx, std::vector<float>(10, 0.0f));

  p.M = 0;
  p.y = nullptr;
  EXPECT_NO_THROW(fourbit::gemm_4bit(p));
}

TEST(Gemm4bit, RejectsBadArguments) {
  using fourbit_test::throws_invalid;
  const QuantizedWeight w(8, 64, 64, QuantType::NF4, false, 3);
  std::vector<float> x(2 * 64), y(2 * 8);
  auto make = [&] {
    fourbit::Gemm4bitParams p;
    p.weight = w.view();
    p.x = x.data();
    p.y = y.data();
    p.M = 2;
    p.dtype = DType::Float32;
    return p;
  };
  auto p = make();
  p.M = -1;
  EXPECT_TRUE(throws_invalid([&] { fourbit::gemm_4bit(p); }, {"gemm_4bit", "M", "-1"}));
  p = make();
  p.weight.K = -3;
  EXPECT_TRUE(throws_invalid([&] { fourbit::gemm_4bit(p); }, {"K", "-3"}));
  p = make();
  p.weight.blocksize = 48;
  EXPECT_TRUE(throws_invalid([&] { fourbit::gemm_4bit(p); }, {"blocksize", "48"}));
  p = make();
  p.x = nullptr;
  EXPECT_TRUE(throws_invalid([&] { fourbit::gemm_4bit(p); }, {"x", "null"}));
  p = make();
  p.weight.scales.absmax = nullptr;
  EXPECT_TRUE(throws_invalid([&] { fourbit::gemm_4bit(p); }, {"absmax", "null"}));
  p = make();
  p.weight.N = int64_t{1} << 40;
  p.weight.K = int64_t{1} << 40;
  EXPECT_TRUE(throws_invalid([&] { fourbit::gemm_4bit(p); }, {"overflows"}));
  fourbit::Gemm4bitGradInputParams g;
  g.weight = w.view();
  g.grad_output = nullptr;
  g.grad_input = x.data();
  g.M = 2;
  EXPECT_TRUE(throws_invalid([&] { fourbit::gemm_4bit_grad_input(g); },
                             {"gemm_4bit_grad_input", "grad_output", "null"}));
}

TEST(Gemm4bit, CudaEntryPointsThrowWithoutCuda) {
  if (fourbit::built_with_cuda()) GTEST_SKIP() << "libfourbit was built with CUDA";
  fourbit::Gemm4bitParams p;
  EXPECT_TRUE(fourbit_test::throws_error([&] { fourbit::gemm_4bit_cuda(p, nullptr); },
                                         fourbit::Error::Kind::Runtime, {"without CUDA"}));
}

}  // namespace
