// GoogleTest suite for the CPU LoRA op (include/fourbit/lora.h): forward (Y, XA) and
// backward (dX, dX_l, dA, dB) against a float64 reference built from the fp32-dequantized
// weight, over shapes that hit the gemv and blocked paths and their tile remainders (M = 1,
// odd K, K not a multiple of the blocksize, N = 1, r = 1, r above one column tile), every
// dtype, both codebooks, plain and nested scales, with and without a separate X_l; empty
// dimensions; and every argument error.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "fourbit/lora.h"
#include "quantized_weight.h"
#include "test_helpers.h"

namespace {

using fourbit::DType;
using fourbit::QuantType;
using fourbit_test::QuantizedWeight;
using fourbit_test::TypedBuffer;

using fourbit_test::unit_roundoff;

// A reference value with the sum of the absolute values of its terms (the scale of the
// fp32 accumulation error).
struct Ref {
  std::vector<double> value, abs;
  explicit Ref(int64_t n) : value(n, 0.0), abs(n, 0.0) {}
  void add(int64_t i, double term) {
    value[i] += term;
    abs[i] += std::fabs(term);
  }
};

// |got - ref| <= u_out |ref| + (u_w + 4 sqrt(R + 1) u_fp32) sum |terms|: the output
// rounding, the weight rounded to bf16 before the multiply (bf16 inputs: the AVX512_BF16
// path) and an fp32 accumulation error growing like sqrt(R) for a reduction of depth R
// (the bound of test_gemm_4bit.cpp; docs/kernels.md).
void expect_close(const TypedBuffer& got, const Ref& ref, int64_t R, DType dtype,
                  const char* what) {
  const double u32 = std::ldexp(1.0, -24);
  const double u_w = dtype == DType::BFloat16 ? unit_roundoff(dtype) : 0.0;
  int bad = 0;
  for (size_t i = 0; i < ref.value.size() && bad < 5; ++i) {
    const double tol = unit_roundoff(dtype) * std::fabs(ref.value[i]) +
                       (u_w + 4.0 * std::sqrt(static_cast<double>(R) + 1.0) * u32) * ref.abs[i] +
                       1e-30;
    const double err = std::fabs(static_cast<double>(got.value(i)) - ref.value[i]);
    if (!(err <= tol)) {
      ADD_FAILURE() << what << ": element " << i << " got " << got.value(i) << " want "
                    << ref.value[i] << " (err " << err << " > tol " << tol << ")";
      ++bad;
    }
  }
}

struct Case {
  int64_t M, N, K, r, blocksize;
};

// gemv (M <= 8; bf16 with AVX512_BF16: M <= 4) and blocked; column tiles of 128 with
// remainders (N, K, and r = 130 spanning two tiles of the XA product); reduction tiles of
// 256 with remainders; odd K; K not a multiple of the blocksize; N = 1; r = 1; more rows
// than one row chunk.
const Case kCases[] = {
    {1, 64, 64, 4, 64},    {3, 37, 96, 1, 32},    {8, 1, 65, 3, 64},    {9, 33, 33, 8, 32},
    {17, 200, 130, 16, 64}, {5, 7, 1001, 2, 64},  {40, 130, 300, 130, 128},
    {300, 20, 41, 5, 32},   {12, 3, 4096, 16, 4096},
};

struct Inputs {
  TypedBuffer x, x_lora, a, b, bias, dy;
};

class LoraGrid : public ::testing::TestWithParam<std::tuple<DType, QuantType, bool>> {};

TEST_P(LoraGrid, ForwardAndBackwardMatchFloat64Reference) {
  const auto [dtype, quant_type, nested] = GetParam();
  uint32_t seed = 11;
  for (const Case& c : kCases) {
    for (bool separate : {false, true}) {
      SCOPED_TRACE(::testing::Message() << "M=" << c.M << " N=" << c.N << " K=" << c.K << " r="
                                        << c.r << " blocksize=" << c.blocksize
                                        << " separate_x_lora=" << separate);
      const int64_t M = c.M, N = c.N, K = c.K, r = c.r;
      const double s = 0.75;
      const QuantizedWeight w(N, K, c.blocksize, quant_type, nested, seed++);
      auto data = [&](int64_t n) {
        return TypedBuffer::from_floats(dtype, fourbit_test::normal_data(n, seed++));
      };
      const TypedBuffer x = data(M * K), x_sep = data(M * K), a = data(r * K), b = data(N * r),
                        bias = data(N), dy = data(M * N);
      const TypedBuffer& xl = separate ? x_sep : x;

      // Forward.
      TypedBuffer y(dtype, M * N), xa(dtype, M * r);
      fourbit::Lora4bitForwardParams p;
      p.weight = w.view();
      p.x = x.data();
      p.x_lora = separate ? x_sep.data() : nullptr;
      p.lora_a = a.data();
      p.lora_b = b.data();
      p.bias = bias.data();
      p.scaling = s;
      p.y = y.data();
      p.xa = xa.data();
      p.M = M;
      p.r = r;
      p.dtype = dtype;
      fourbit::lora_4bit_forward(p);

      Ref xa_ref(M * r), y_ref(M * N);
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t q = 0; q < r; ++q) {
          for (int64_t k = 0; k < K; ++k) {
            xa_ref.add(m * r + q, double(xl.value(m * K + k)) * a.value(q * K + k));
          }
        }
        for (int64_t n = 0; n < N; ++n) {
          y_ref.add(m * N + n, bias.value(n));
          for (int64_t k = 0; k < K; ++k) {
            y_ref.add(m * N + n, double(x.value(m * K + k)) * w.dequantized[n * K + k]);
          }
          for (int64_t q = 0; q < r; ++q) {
            // The adapter term, its magnitude counted through |XA| (its own fp32 error).
            const double term = s * xa_ref.value[m * r + q] * b.value(n * r + q);
            y_ref.value[m * N + n] += term;
            y_ref.abs[m * N + n] += s * xa_ref.abs[m * r + q] * std::fabs(b.value(n * r + q));
          }
        }
      }
      expect_close(xa, xa_ref, K, dtype, "xa");
      expect_close(y, y_ref, K + r, dtype, "y");

      // Backward, from the XA the forward returned.
      TypedBuffer dx(dtype, M * K), dxl(dtype, M * K), da(dtype, r * K), db(dtype, N * r);
      fourbit::Lora4bitBackwardParams g;
      g.weight = w.view();
      g.grad_output = dy.data();
      g.x_lora = xl.data();
      g.xa = xa.data();
      g.lora_a = a.data();
      g.lora_b = b.data();
      g.scaling = s;
      g.separate_lora_input = separate;
      g.grad_input = dx.data();
      g.grad_input_lora = separate ? dxl.data() : nullptr;
      g.grad_a = da.data();
      g.grad_b = db.data();
      g.M = M;
      g.r = r;
      g.dtype = dtype;
      fourbit::lora_4bit_backward(g);

      Ref g_ref(M * r), dx_ref(M * K), dxl_ref(M * K), da_ref(r * K), db_ref(N * r);
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t q = 0; q < r; ++q) {
          for (int64_t n = 0; n < N; ++n) {
            g_ref.add(m * r + q, s * dy.value(m * N + n) * b.value(n * r + q));
          }
        }
        for (int64_t k = 0; k < K; ++k) {
          for (int64_t n = 0; n < N; ++n) {
            dx_ref.add(m * K + k, double(dy.value(m * N + n)) * w.dequantized[n * K + k]);
          }
          Ref& adapter = separate ? dxl_ref : dx_ref;
          for (int64_t q = 0; q < r; ++q) {
            adapter.value[m * K + k] += g_ref.value[m * r + q] * a.value(q * K + k);
            adapter.abs[m * K + k] += g_ref.abs[m * r + q] * std::fabs(a.value(q * K + k));
          }
        }
      }
      for (int64_t q = 0; q < r; ++q) {
        for (int64_t k = 0; k < K; ++k) {
          for (int64_t m = 0; m < M; ++m) {
            da_ref.value[q * K + k] += g_ref.value[m * r + q] * xl.value(m * K + k);
            da_ref.abs[q * K + k] += g_ref.abs[m * r + q] * std::fabs(xl.value(m * K + k));
          }
        }
      }
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t q = 0; q < r; ++q) {
          for (int64_t m = 0; m < M; ++m) {
            db_ref.add(n * r + q, s * dy.value(m * N + n) * xa.value(m * r + q));
          }
        }
      }
      expect_close(dx, dx_ref, N + r, dtype, "grad_input");
      if (separate) expect_close(dxl, dxl_ref, N + r, dtype, "grad_input_lora");
      expect_close(da, da_ref, M + N, dtype, "grad_a");
      expect_close(db, db_ref, M, dtype, "grad_b");
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    AllFormats, LoraGrid,
    ::testing::Combine(::testing::Values(DType::Float32, DType::Float16, DType::BFloat16),
                       ::testing::Values(QuantType::NF4, QuantType::FP4), ::testing::Bool()));

// The backward writes only the gradients asked for: null outputs are skipped and the
// others still match the full call.
TEST(Lora4bit, BackwardComputesOnlyRequestedGradients) {
  const int64_t M = 20, N = 24, K = 40, r = 4;
  const QuantizedWeight w(N, K, 64, QuantType::NF4, true, 5);
  const auto make = [](int64_t n, uint32_t seed) { return fourbit_test::normal_data(n, seed); };
  const auto x = make(M * K, 1), a = make(r * K, 2), b = make(N * r, 3), dy = make(M * N, 4),
             xa = make(M * r, 6);
  fourbit::Lora4bitBackwardParams g;
  g.weight = w.view();
  g.grad_output = dy.data();
  g.x_lora = x.data();
  g.xa = xa.data();
  g.lora_a = a.data();
  g.lora_b = b.data();
  g.scaling = 2.0;
  g.M = M;
  g.r = r;
  g.dtype = DType::Float32;
  std::vector<float> da_full(r * K), db_full(N * r), dx_full(M * K);
  g.grad_input = dx_full.data();
  g.grad_a = da_full.data();
  g.grad_b = db_full.data();
  fourbit::lora_4bit_backward(g);

  std::vector<float> db_only(N * r, -1.0f);
  g.grad_input = nullptr;
  g.grad_a = nullptr;
  g.x_lora = nullptr;  // not needed without grad_a
  g.grad_b = db_only.data();
  fourbit::lora_4bit_backward(g);
  EXPECT_EQ(db_only, db_full);

  std::vector<float> da_only(r * K, -1.0f);
  g.grad_b = nullptr;
  g.xa = nullptr;  // not needed without grad_b
  g.x_lora = x.data();
  g.grad_a = da_only.data();
  fourbit::lora_4bit_backward(g);
  EXPECT_EQ(da_only, da_full);
}

// M = 0: nothing to write forward, zero dA and dB backward. K = 0: Y = bias, XA = 0.
// N = 0: XA is still computed.
TEST(Lora4bit, EmptyDimensions) {
  const int64_t r = 2;
  {
    const QuantizedWeight w(3, 0, 64, QuantType::FP4, false, 1);
    std::vector<float> bias = {1.5f, -2.0f, 0.25f}, b(3 * r, 1.0f);
    std::vector<float> y(2 * 3, 123.0f), xa(2 * r, 123.0f);
    fourbit::Lora4bitForwardParams p;
    p.weight = w.view();
    p.lora_b = b.data();
    p.bias = bias.data();
    p.y = y.data();
    p.xa = xa.data();
    p.M = 2;
    p.r = r;
    p.dtype = DType::Float32;
    fourbit::lora_4bit_forward(p);
    EXPECT_EQ(y, (std::vector<float>{1.5f, -2.0f, 0.25f, 1.5f, -2.0f, 0.25f}));
    EXPECT_EQ(xa, std::vector<float>(2 * r, 0.0f));
  }
  {
    const QuantizedWeight w(0, 5, 64, QuantType::NF4, false, 1);
    const auto x = fourbit_test::normal_data(2 * 5, 3), a = fourbit_test::normal_data(r * 5, 4);
    std::vector<float> xa(2 * r, 123.0f);
    fourbit::Lora4bitForwardParams p;
    p.weight = w.view();
    p.x = x.data();
    p.lora_a = a.data();
    p.xa = xa.data();
    p.M = 2;
    p.r = r;
    p.dtype = DType::Float32;
    fourbit::lora_4bit_forward(p);
    for (int64_t m = 0; m < 2; ++m) {
      for (int64_t q = 0; q < r; ++q) {
        double want = 0;
        for (int64_t k = 0; k < 5; ++k) want += double(x[m * 5 + k]) * a[q * 5 + k];
        EXPECT_NEAR(xa[m * r + q], want, 1e-5);
      }
    }
  }
  {
    const QuantizedWeight w(4, 6, 64, QuantType::NF4, false, 1);
    std::vector<float> a(r * 6, 1.0f), b(4 * r, 1.0f), da(r * 6, 9.0f), db(4 * r, 9.0f);
    fourbit::Lora4bitBackwardParams g;
    g.weight = w.view();
    g.lora_a = a.data();
    g.lora_b = b.data();
    g.grad_a = da.data();
    g.grad_b = db.data();
    g.M = 0;
    g.r = r;
    g.dtype = DType::Float32;
    fourbit::lora_4bit_backward(g);
    EXPECT_EQ(da, std::vector<float>(r * 6, 0.0f));
    EXPECT_EQ(db, std::vector<float>(4 * r, 0.0f));
  }
  {
    // N = 0 (no dY at all): dA = 0, and no dX requested is not an error.
    const QuantizedWeight w(0, 6, 64, QuantType::NF4, false, 1);
    const auto x = fourbit_test::normal_data(3 * 6, 5);
    std::vector<float> a(r * 6, 1.0f), da(r * 6, 9.0f), xa(3 * r, 1.0f);
    fourbit::Lora4bitBackwardParams g;
    g.weight = w.view();
    g.x_lora = x.data();
    g.xa = xa.data();
    g.lora_a = a.data();
    g.grad_a = da.data();
    g.M = 3;
    g.r = r;
    g.dtype = DType::Float32;
    fourbit::lora_4bit_backward(g);
    EXPECT_EQ(da, std::vector<float>(r * 6, 0.0f));
  }
}

TEST(Lora4bit, RejectsBadArguments) {
  using fourbit_test::throws_invalid;
  const int64_t M = 2, N = 8, K = 64, r = 4;
  const QuantizedWeight w(N, K, 64, QuantType::NF4, false, 3);
  std::vector<float> x(M * K), y(M * N), a(r * K), b(N * r), xa(M * r), dx(M * K);
  auto forward = [&] {
    fourbit::Lora4bitForwardParams p;
    p.weight = w.view();
    p.x = x.data();
    p.lora_a = a.data();
    p.lora_b = b.data();
    p.y = y.data();
    p.xa = xa.data();
    p.M = M;
    p.r = r;
    p.dtype = DType::Float32;
    return p;
  };
  auto run = [](const fourbit::Lora4bitForwardParams& p) {
    return [p] { fourbit::lora_4bit_forward(p); };
  };
  auto p = forward();
  p.r = 0;
  EXPECT_TRUE(throws_invalid(run(p), {"lora_4bit_forward", "r (the adapter rank)", "got 0"}));
  p.r = fourbit::kLoraMaxRank + 1;
  EXPECT_TRUE(throws_invalid(run(p), {"r (the adapter rank)", "1025"}));
  p = forward();
  p.lora_a = nullptr;
  EXPECT_TRUE(throws_invalid(run(p), {"lora_4bit_forward", "lora_a", "null"}));
  p = forward();
  p.lora_b = nullptr;
  EXPECT_TRUE(throws_invalid(run(p), {"lora_b", "null"}));
  p = forward();
  p.xa = nullptr;
  EXPECT_TRUE(throws_invalid(run(p), {"xa", "null"}));
  p = forward();
  p.weight.blocksize = 48;
  EXPECT_TRUE(throws_invalid(run(p), {"lora_4bit_forward", "blocksize", "48"}));
  p = forward();
  p.M = -1;
  EXPECT_TRUE(throws_invalid(run(p), {"lora_4bit_forward", "M", "-1"}));
  p = forward();
  p.x = nullptr;
  EXPECT_TRUE(throws_invalid(run(p), {"x", "null"}));

  auto backward = [&] {
    fourbit::Lora4bitBackwardParams g;
    g.weight = w.view();
    g.grad_output = y.data();
    g.x_lora = x.data();
    g.xa = xa.data();
    g.lora_a = a.data();
    g.lora_b = b.data();
    g.grad_input = dx.data();
    g.M = M;
    g.r = r;
    g.dtype = DType::Float32;
    return g;
  };
  auto run_b = [](const fourbit::Lora4bitBackwardParams& g) {
    return [g] { fourbit::lora_4bit_backward(g); };
  };
  auto g = backward();
  g.grad_input_lora = dx.data();
  EXPECT_TRUE(throws_invalid(run_b(g), {"lora_4bit_backward", "grad_input_lora",
                                        "separate_lora_input is false"}));
  g = backward();
  g.r = -2;
  EXPECT_TRUE(throws_invalid(run_b(g), {"lora_4bit_backward", "r (the adapter rank)", "-2"}));
  g = backward();
  g.grad_a = a.data();
  g.x_lora = nullptr;
  EXPECT_TRUE(throws_invalid(run_b(g), {"x_lora (needed for grad_a)", "null"}));
  g = backward();
  g.grad_b = b.data();
  g.xa = nullptr;
  EXPECT_TRUE(throws_invalid(run_b(g), {"xa (needed for grad_b)", "null"}));
  g = backward();
  g.grad_output = nullptr;
  EXPECT_TRUE(throws_invalid(run_b(g), {"lora_4bit_backward", "grad_output", "null"}));
  g = backward();
  g.lora_a = nullptr;
  EXPECT_TRUE(throws_invalid(run_b(g), {"lora_a", "null"}));
  g = backward();
  g.lora_b = nullptr;
  EXPECT_TRUE(throws_invalid(run_b(g), {"lora_b", "null"}));
}

TEST(Lora4bit, CudaEntryPointsThrowWithoutCuda) {
  if (fourbit::built_with_cuda()) GTEST_SKIP() << "libfourbit was built with CUDA";
  fourbit::Lora4bitForwardParams p;
  EXPECT_TRUE(fourbit_test::throws_error([&] { fourbit::lora_4bit_forward_cuda(p, nullptr); },
                                         fourbit::Error::Kind::Runtime, {"without CUDA"}));
  fourbit::Lora4bitBackwardParams g;
  EXPECT_TRUE(fourbit_test::throws_error([&] { fourbit::lora_4bit_backward_cuda(g, nullptr); },
                                         fourbit::Error::Kind::Runtime, {"without CUDA"}));
}

}  // namespace
