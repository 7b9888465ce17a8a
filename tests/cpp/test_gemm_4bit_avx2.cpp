// GoogleTest suite for the AVX2 + FMA flavour of the CPU 4-bit kernels (src/gemm_4bit_avx2.cpp,
// src/dequantize_4bit_avx2.cpp) against the portable flavour, run side by side in one process
// through detail::KernelIsaCap (src/kernel_isa.h), so the suite tests the AVX2 kernels on any
// CPU that has AVX2, AVX-512 machines included:
// - the weight decode and the dequantize give the portable bits exactly (every blocksize,
//   NF4/FP4, nested or not, fp32/fp16/bf16, unaligned starts and ragged ends);
// - the forward and the input gradient stay within the float64-reference tolerance of
//   test_gemm_4bit.cpp, as the portable kernels do, over odd shapes (M in 1, 2, 3, 7, 16, 33;
//   N, K not multiples of the vector width, the panel or the tile) and every blocksize;
// - one-hot activations select single weights exactly (the indexing of every element);
// - the 16-row transpose of the forward's tile fill against its definition;
// - the FOURBIT_DISABLE_* switches: values, errors and the class they leave.
// The AVX2 tests skip (and say why) only where cpu_isa() is below Avx2: a CPU without AVX2 +
// FMA + F16C, or FOURBIT_DISABLE_AVX2=1.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "fourbit/codebook.h"
#include "fourbit/cpu_features.h"
#include "fourbit/detail/element_math.h"
#include "fourbit/error.h"
#include "fourbit/gemm.h"
#include "fourbit/quantize.h"
#include "gemm_4bit_kernels.h"
#include "kernel_isa.h"
#include "quantized_weight.h"
#include "test_helpers.h"

namespace {

using fourbit::CpuIsa;
using fourbit::DType;
using fourbit::QuantType;
using fourbit::detail::KernelIsaCap;
using fourbit_test::QuantizedWeight;
using fourbit_test::TypedBuffer;

#define SKIP_WITHOUT_AVX2()                                                                \
  if (fourbit::cpu_isa() < CpuIsa::Avx2)                                                   \
  GTEST_SKIP() << "this CPU's class is " << fourbit::to_string(fourbit::cpu_isa())         \
               << ": no AVX2 + FMA + F16C here, or FOURBIT_DISABLE_AVX2=1"

// Every blocksize the library takes (validate.cpp: powers of two from 32 to 4096).
const int64_t kBlocksizes[] = {32, 64, 128, 256, 512, 1024, 2048, 4096};

// A weight whose N x K holds at least two blocks of every blocksize, with odd K so blocks and
// bytes straddle rows.
QuantizedWeight weight_for(int64_t N, int64_t K, int64_t blocksize, QuantType q, bool nested,
                           uint32_t seed) {
  return QuantizedWeight(N, K, blocksize, q, nested, seed);
}

// Runs fn() with the kernels capped at `isa`, checking the cap took effect.
template <typename Fn>
void with_isa(CpuIsa isa, const Fn& fn) {
  KernelIsaCap cap(isa);
  ASSERT_EQ(fourbit::detail::kernel_isa(), isa);
  fn();
}

// The first element whose bits differ between dequantize_4bit(p) on the AVX2 kernels and on
// the portable ones (p.out is set here), or -1 when every element agrees.
int64_t first_bit_difference_from_portable(fourbit::Dequantize4bitParams p) {
  TypedBuffer vec(p.out_dtype, p.numel), ref(p.out_dtype, p.numel);
  p.out = vec.data();
  with_isa(CpuIsa::Avx2, [&] { fourbit::dequantize_4bit(p); });
  p.out = ref.data();
  with_isa(CpuIsa::Portable, [&] { fourbit::dequantize_4bit(p); });
  for (int64_t i = 0; i < p.numel; ++i) {
    if (vec.bits(i) != ref.bits(i)) return i;
  }
  return -1;
}

TEST(Avx2Kernels, DecodeSpanMatchesPortableBitForBit) {
  SKIP_WITHOUT_AVX2();
  uint32_t seed = 3;
  for (const int64_t bs : kBlocksizes) {
    for (const QuantType q : {QuantType::NF4, QuantType::FP4}) {
      for (const bool nested : {false, true}) {
        SCOPED_TRACE(::testing::Message() << "blocksize=" << bs << " nf4=" << (q == QuantType::NF4)
                                          << " nested=" << nested);
        const int64_t N = 3, K = 2 * bs + 45;
        const QuantizedWeight w = weight_for(N, K, bs, q, nested, seed++);
        const float* code = fourbit::codebook_4bit(q).data();
        const int64_t numel = N * K;
        // (start, length): aligned and not, shorter than a chunk, across blocks and rows, the end.
        const int64_t spans[][2] = {{0, numel}, {1, 31},  {5, 100},  {31, 64},   {32, 32},
                                    {bs - 3, 70}, {K, K}, {numel - 77, 77}, {64, 0}};
        for (const auto& s : spans) {
          std::vector<float> vec(static_cast<size_t>(s[1]) + 1, -1.0f), ref(vec);
          with_isa(CpuIsa::Avx2, [&] {
            fourbit::detail::decode_weight_span(w.view(), code, s[0], s[1], vec.data());
          });
          with_isa(CpuIsa::Portable, [&] {
            fourbit::detail::decode_weight_span(w.view(), code, s[0], s[1], ref.data());
          });
          ASSERT_EQ(0, std::memcmp(vec.data(), ref.data(), vec.size() * sizeof(float)))
              << "span " << s[0] << " + " << s[1];
        }
      }
    }
  }
}

TEST(Avx2Kernels, DequantizeMatchesPortableBitForBit) {
  SKIP_WITHOUT_AVX2();
  uint32_t seed = 11;
  for (const int64_t bs : kBlocksizes) {
    for (const QuantType q : {QuantType::NF4, QuantType::FP4}) {
      for (const bool nested : {false, true}) {
        // numel odd and not a multiple of the blocksize (a partial last block with a ragged
        // tail), and one shorter than a 32-element chunk.
        for (const int64_t numel : {2 * bs + 45, int64_t{7}}) {
          const QuantizedWeight w = weight_for(1, numel, bs, q, nested, seed++);
          for (const DType dtype : fourbit_test::kAllDTypes) {
            SCOPED_TRACE(::testing::Message() << "blocksize=" << bs << " nf4=" << (q == QuantType::NF4)
                                              << " nested=" << nested << " numel=" << numel
                                              << " dtype=" << fourbit::to_string(dtype));
            fourbit::Dequantize4bitParams p;
            p.packed = w.packed.data();
            p.scales = w.scales();
            p.numel = numel;
            p.blocksize = bs;
            p.quant_type = q;
            p.out_dtype = dtype;
            ASSERT_EQ(first_bit_difference_from_portable(p), -1);
          }
        }
      }
    }
  }
}

// Scales whose products with the codes land on rounding edges: bf16 and fp16 ties (both
// directions of even), values that overflow fp16, fp16 subnormals, zero, infinities and NaN.
// Every code appears in every block.
TEST(Avx2Kernels, DequantizeRoundsSpecialScalesLikePortable) {
  SKIP_WITHOUT_AVX2();
  using fourbit::detail::bits_float;
  const std::vector<uint32_t> special_bits = {
      0x3f808000u, 0x3f818000u, 0xbf808000u, 0x3f800000u, 0x477fe000u, 0x477ff000u, 0x47800000u,
      0x33800000u, 0x38800000u, 0x387fc000u, 0x00000000u, 0x80000000u, 0x7f800000u, 0xff800000u,
      0x7fc00000u, 0x7f7fffffu, 0x3f7fff80u, 0x3a8a8000u};
  std::vector<float> scales;
  for (uint32_t b : special_bits) scales.push_back(bits_float(b));
  const int64_t bs = 32, numel = bs * static_cast<int64_t>(scales.size());
  std::vector<uint8_t> packed(numel / 2);
  for (size_t i = 0; i < packed.size(); ++i) packed[i] = static_cast<uint8_t>(i * 37 + (i >> 4));
  for (const QuantType q : {QuantType::NF4, QuantType::FP4}) {
    for (const DType dtype : fourbit_test::kAllDTypes) {
      SCOPED_TRACE(::testing::Message() << "nf4=" << (q == QuantType::NF4) << " dtype=" << fourbit::to_string(dtype));
      fourbit::Dequantize4bitParams p;
      p.packed = packed.data();
      p.scales.absmax = scales.data();
      p.numel = numel;
      p.blocksize = bs;
      p.quant_type = q;
      p.out_dtype = dtype;
      const int64_t i = first_bit_difference_from_portable(p);
      ASSERT_EQ(i, -1) << "scale bits " << std::hex << special_bits[i / bs];
    }
  }
}

TEST(Avx2Kernels, Transpose16WordsMatchesItsDefinition) {
  SKIP_WITHOUT_AVX2();
  for (const int64_t words : {1, 7, 8, 9, 16, 33, 256}) {
    SCOPED_TRACE(::testing::Message() << "words=" << words);
    const int64_t stride = 263;  // words per source row, odd: rows start unaligned
    std::vector<uint32_t> rows(16 * stride);
    for (size_t i = 0; i < rows.size(); ++i) rows[i] = static_cast<uint32_t>(i * 2654435761u);
    const int64_t ld = 48;
    std::vector<uint32_t> dst(words * ld, 0xdeadbeefu);
    fourbit::detail::transpose16_words_avx2(rows.data(), stride * 4, words, dst.data(), ld);
    for (int64_t q = 0; q < words; ++q) {
      for (int64_t j = 0; j < ld; ++j) {
        const uint32_t want = j < 16 ? rows[j * stride + q] : 0xdeadbeefu;
        ASSERT_EQ(dst[q * ld + j], want) << "q=" << q << " j=" << j;
      }
    }
  }
}

// The tolerance of test_gemm_4bit.cpp's expect_close: |got - ref| <= u_out |ref| +
// 4 sqrt(R) u_fp32 sum_r |a_r b_r|: the output rounding plus an fp32 accumulation error
// growing like sqrt(R) (both flavours decode the weight to fp32, so no weight rounding term).
void expect_close(const TypedBuffer& got, const std::vector<double>& ref,
                  const std::vector<double>& abs_ref, int64_t R, DType dtype, const char* what) {
  const double u32 = std::ldexp(1.0, -24);
  int bad = 0;
  for (size_t i = 0; i < ref.size() && bad < 5; ++i) {
    const double tol = fourbit_test::unit_roundoff(dtype) * std::fabs(ref[i]) +
                       4.0 * std::sqrt(static_cast<double>(R) + 1.0) * u32 * abs_ref[i] + 1e-30;
    const double err = std::fabs(static_cast<double>(got.value(i)) - ref[i]);
    if (!(err <= tol)) {
      ADD_FAILURE() << what << ": element " << i << " got " << got.value(i) << " want " << ref[i]
                    << " (err " << err << " > tol " << tol << ")";
      ++bad;
    }
  }
}

class Avx2Grid : public ::testing::TestWithParam<std::tuple<DType, QuantType, bool>> {};

// Shapes: N = 37 (a 32-column panel + a ragged one; a 16-row transpose group + 5 rows),
// K = 261 (two reduction slices of 256, odd); N = 130, K = 47 (two column tiles of 128, a
// masked dot tail). M covers the gemv path (<= 8) and the blocked one, 6-row register tiles
// with every remainder.
TEST_P(Avx2Grid, ForwardAndGradInputMatchFloat64LikePortable) {
  SKIP_WITHOUT_AVX2();
  const auto [dtype, quant_type, nested] = GetParam();
  const int64_t shapes[][2] = {{37, 261}, {130, 47}};
  uint32_t seed = 101;
  for (const int64_t bs : kBlocksizes) {
    for (const auto& shape : shapes) {
      const int64_t N = shape[0], K = shape[1];
      if (N * K < bs) continue;  // fewer elements than one block: no full block to test
      const QuantizedWeight w = weight_for(N, K, bs, quant_type, nested, seed++);
      for (const int64_t M : {1, 2, 3, 7, 16, 33}) {
        SCOPED_TRACE(::testing::Message() << "blocksize=" << bs << " M=" << M << " N=" << N
                                          << " K=" << K);
        const TypedBuffer x = TypedBuffer::from_floats(dtype, fourbit_test::normal_data(M * K, seed++));
        const TypedBuffer bias = TypedBuffer::from_floats(dtype, fourbit_test::normal_data(N, seed++));
        const TypedBuffer dy = TypedBuffer::from_floats(dtype, fourbit_test::normal_data(M * N, seed++));
        std::vector<double> ref(M * N), abs_ref(M * N), gref(M * K, 0.0), gabs(M * K, 0.0);
        for (int64_t m = 0; m < M; ++m) {
          for (int64_t n = 0; n < N; ++n) {
            double s = bias.value(n), a = std::fabs(bias.value(n));
            for (int64_t k = 0; k < K; ++k) {
              const double t = static_cast<double>(x.value(m * K + k)) * w.dequantized[n * K + k];
              s += t;
              a += std::fabs(t);
              const double u = static_cast<double>(dy.value(m * N + n)) * w.dequantized[n * K + k];
              gref[m * K + k] += u;
              gabs[m * K + k] += std::fabs(u);
            }
            ref[m * N + n] = s;
            abs_ref[m * N + n] = a;
          }
        }
        for (const CpuIsa isa : {CpuIsa::Avx2, CpuIsa::Portable}) {
          SCOPED_TRACE(fourbit::to_string(isa));
          TypedBuffer y(dtype, M * N), dx(dtype, M * K);
          fourbit::Gemm4bitParams p;
          p.weight = w.view();
          p.x = x.data();
          p.bias = bias.data();
          p.y = y.data();
          p.M = M;
          p.dtype = dtype;
          fourbit::Gemm4bitGradInputParams g;
          g.weight = w.view();
          g.grad_output = dy.data();
          g.grad_input = dx.data();
          g.M = M;
          g.dtype = dtype;
          with_isa(isa, [&] {
            fourbit::gemm_4bit(p);
            fourbit::gemm_4bit_grad_input(g);
          });
          expect_close(y, ref, abs_ref, K, dtype, "forward");
          expect_close(dx, gref, gabs, N, dtype, "grad_input");
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    AllFormats, Avx2Grid,
    ::testing::Combine(::testing::Values(DType::Float32, DType::Float16, DType::BFloat16),
                       ::testing::Values(QuantType::NF4, QuantType::FP4), ::testing::Bool()));

// One-hot activations pick out single weights: exact products, so the outputs are the
// decoded weights rounded to the dtype, bit for bit, on the AVX2 kernels (gemv and blocked).
TEST(Avx2Kernels, OneHotRowsSelectWeightsExactly) {
  SKIP_WITHOUT_AVX2();
  KernelIsaCap cap(CpuIsa::Avx2);
  for (const DType dtype : fourbit_test::kAllDTypes) {
    for (const int64_t M : {1, 3, 7, 16, 33}) {
      SCOPED_TRACE(::testing::Message() << "dtype=" << fourbit::to_string(dtype) << " M=" << M);
      const int64_t N = 45, K = 267;
      const QuantizedWeight w(N, K, 64, QuantType::FP4, true, 77);
      fourbit_test::expect_one_hot_products_exact(w, dtype, M);
    }
  }
}

// Sets an environment variable for one scope, restoring the old value after.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    const char* old = std::getenv(name);
    had_ = old != nullptr;
    if (had_) old_ = old;
    setenv(name, value, 1);
  }
  ~ScopedEnv() {
    if (had_) {
      setenv(name_, old_.c_str(), 1);
    } else {
      unsetenv(name_);
    }
  }

 private:
  const char* name_;
  bool had_ = false;
  std::string old_;
};

TEST(CpuFeatures, DisableSwitchTakesZeroOrOneAndNamesABadValue) {
  for (const char* name : {"FOURBIT_DISABLE_AVX2", "FOURBIT_DISABLE_AMX"}) {
    SCOPED_TRACE(name);
    {
      ScopedEnv env(name, "1");
      EXPECT_TRUE(fourbit::detail::disable_switch(name));
    }
    for (const char* off : {"0", ""}) {
      ScopedEnv env(name, off);
      EXPECT_FALSE(fourbit::detail::disable_switch(name));
    }
    for (const char* bad : {"yes", "2", "true", " 1"}) {
      ScopedEnv env(name, bad);
      const std::string quoted = std::string("'") + bad + "'";
      EXPECT_TRUE(fourbit_test::throws_invalid([&] { fourbit::detail::disable_switch(name); },
                                               {name, quoted.c_str()}));
    }
  }
}

// The class this process runs follows the switches it started with (the sanitizer legs of
// scripts/run_tests.sh set them): FOURBIT_DISABLE_AVX2=1 leaves the portable kernels,
// FOURBIT_DISABLE_AVX512=1 the AVX2 ones on any CPU with AVX2 + FMA + F16C.
TEST(CpuFeatures, ClassFollowsTheDisableSwitches) {
  const CpuIsa isa = fourbit::cpu_isa();
  const bool avx2_cpu = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                        __builtin_cpu_supports("f16c");
  if (fourbit::detail::disable_switch("FOURBIT_DISABLE_AVX2") || !avx2_cpu) {
    EXPECT_EQ(isa, CpuIsa::Portable);
  } else if (std::getenv("FOURBIT_DISABLE_AVX512") != nullptr) {
    EXPECT_EQ(isa, CpuIsa::Avx2);
  } else {
    EXPECT_GE(isa, CpuIsa::Avx2);
  }
  EXPECT_EQ(fourbit::detail::kernel_isa(), isa);  // no cap outside a test's scope
}

}  // namespace
