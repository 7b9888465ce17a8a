// quantize_blockwise / dequantize_blockwise (8-bit, 256-entry code) on the CPU against a
// scalar reference written here from the documented rule (include/fourbit/quantize.h),
// plus round trips, ties, NaN and zero blocks, and argument validation.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "fourbit/codebook.h"
#include "fourbit/error.h"
#include "fourbit/quantize.h"
#include "test_helpers.h"

namespace {

using fourbit::DType;
using fourbit_test::kAllDTypes;
using fourbit_test::throws_invalid;
using fourbit_test::TypedBuffer;

using Code = std::array<float, fourbit::kDynamicMapSize>;

struct Quantized {
  std::vector<uint8_t> out;
  std::vector<float> absmax;
};

// Index of the code value nearest to s by a full scan; ties (and duplicates) go to the lower
// index because only a strictly smaller distance replaces the best; NaN maps to 0.
uint8_t reference_index(float s, const Code& code) {
  if (std::isnan(s)) return 0;
  int best = 0;
  float best_dist = std::fabs(s - code[0]);
  for (int k = 1; k < fourbit::kDynamicMapSize; ++k) {
    const float dist = std::fabs(s - code[k]);
    if (dist < best_dist) {
      best = k;
      best_dist = dist;
    }
  }
  return static_cast<uint8_t>(best);
}

// Scalar reference: absmax = max |x| ignoring NaN, index = nearest code to x / absmax (fp32).
Quantized reference_quantize(const std::vector<float>& x, int64_t blocksize, const Code& code) {
  const int64_t n = static_cast<int64_t>(x.size());
  Quantized q;
  q.out.resize(x.size());
  q.absmax.resize(static_cast<size_t>((n + blocksize - 1) / blocksize));
  for (size_t b = 0; b < q.absmax.size(); ++b) {
    const int64_t start = static_cast<int64_t>(b) * blocksize;
    const int64_t end = std::min(start + blocksize, n);
    float absmax = 0.0f;
    for (int64_t i = start; i < end; ++i) {
      if (!std::isnan(x[i])) absmax = std::max(absmax, std::fabs(x[i]));
    }
    q.absmax[b] = absmax;
    for (int64_t i = start; i < end; ++i) q.out[i] = reference_index(x[i] / absmax, code);
  }
  return q;
}

Quantized run_quantize(const TypedBuffer& in, int64_t numel, int64_t blocksize, const Code& code) {
  Quantized q;
  q.out.assign(static_cast<size_t>(numel), 0xAB);
  q.absmax.assign(static_cast<size_t>(fourbit::num_blocks(numel, blocksize)), -7.0f);
  fourbit::QuantizeBlockwiseParams p;
  p.input = in.data();
  p.dtype = in.dtype();
  p.numel = numel;
  p.blocksize = blocksize;
  p.code = code.data();
  p.out = q.out.data();
  p.absmax = q.absmax.data();
  fourbit::quantize_blockwise(p);
  return q;
}

TypedBuffer run_dequantize(const Quantized& q, int64_t numel, int64_t blocksize, const Code& code,
                           DType out_dtype) {
  TypedBuffer out(out_dtype, numel);
  fourbit::DequantizeBlockwiseParams p;
  p.input = q.out.data();
  p.code = code.data();
  p.absmax = q.absmax.data();
  p.numel = numel;
  p.blocksize = blocksize;
  p.out = out.data();
  p.out_dtype = out_dtype;
  fourbit::dequantize_blockwise(p);
  return out;
}

std::vector<float> values_seen(const TypedBuffer& buf, int64_t numel) {
  std::vector<float> v(static_cast<size_t>(numel));
  for (int64_t i = 0; i < numel; ++i) v[i] = buf.value(static_cast<size_t>(i));
  return v;
}

// quantize_blockwise matches the reference byte for byte (indices and absmax) for every
// dtype, blocksize and size, with the signed and the unsigned dynamic map.
TEST(QuantizeBlockwise, MatchesReferenceBitExact) {
  const std::vector<float> data = fourbit_test::test_data(10000);
  for (bool is_signed : {true, false}) {
    const Code code = fourbit::create_dynamic_map(is_signed);
    for (DType dtype : kAllDTypes) {
      for (int64_t blocksize : {32, 256, 4096}) {
        for (int64_t numel : {0, 1, 255, 256, 257, 10000}) {
          SCOPED_TRACE(testing::Message()
                       << (is_signed ? "signed " : "unsigned ") << fourbit::to_string(dtype)
                       << " blocksize=" << blocksize << " numel=" << numel);
          const std::vector<float> x(data.begin(), data.begin() + numel);
          const TypedBuffer in = TypedBuffer::from_floats(dtype, x);
          const Quantized got = run_quantize(in, numel, blocksize, code);
          const Quantized want = reference_quantize(values_seen(in, numel), blocksize, code);
          ASSERT_EQ(got.absmax, want.absmax);
          ASSERT_EQ(got.out, want.out);
        }
      }
    }
  }
}

// Large enough for the multi-threaded path; still identical to the reference.
TEST(QuantizeBlockwise, ParallelPathMatchesReference) {
  const int64_t numel = 70001, blocksize = 256;
  const Code code = fourbit::create_dynamic_map(true);
  const std::vector<float> x = fourbit_test::test_data(numel, 5);
  for (DType dtype : {DType::Float32, DType::BFloat16}) {
    SCOPED_TRACE(fourbit::to_string(dtype));
    const TypedBuffer in = TypedBuffer::from_floats(dtype, x);
    const Quantized got = run_quantize(in, numel, blocksize, code);
    const Quantized want = reference_quantize(values_seen(in, numel), blocksize, code);
    ASSERT_EQ(got.absmax, want.absmax);
    ASSERT_EQ(got.out, want.out);
  }
}

// dequantize_blockwise is exactly code[index] * absmax in fp32, rounded once to the dtype.
TEST(DequantizeBlockwise, RoundTripIsCodeTimesAbsmax) {
  const Code code = fourbit::create_dynamic_map(true);
  const std::vector<float> data = fourbit_test::test_data(70001, 11);
  for (DType dtype : kAllDTypes) {
    for (int64_t blocksize : {32, 256, 4096}) {
      for (int64_t numel : {1, 257, 10000, 70001}) {
        SCOPED_TRACE(testing::Message() << fourbit::to_string(dtype) << " blocksize=" << blocksize
                                        << " numel=" << numel);
        const std::vector<float> x(data.begin(), data.begin() + numel);
        const Quantized q =
            run_quantize(TypedBuffer::from_floats(dtype, x), numel, blocksize, code);
        const TypedBuffer y = run_dequantize(q, numel, blocksize, code, dtype);
        for (int64_t i = 0; i < numel; ++i) {
          const float want = code[q.out[i]] * q.absmax[i / blocksize];
          ASSERT_EQ(y.bits(i), fourbit_test::bits_as(dtype, want)) << "element " << i;
        }
      }
    }
  }
}

// 8-bit round-trip error stays within absmax times half the widest gap of the signed map.
TEST(DequantizeBlockwise, RoundTripErrorIsBounded) {
  const int64_t numel = 10000, blocksize = 256;
  const Code code = fourbit::create_dynamic_map(true);
  float widest = 0.0f;
  for (int k = 0; k + 1 < fourbit::kDynamicMapSize; ++k) {
    widest = std::max(widest, code[k + 1] - code[k]);
  }
  const std::vector<float> x = fourbit_test::normal_data(numel);
  const Quantized q =
      run_quantize(TypedBuffer::from_floats(DType::Float32, x), numel, blocksize, code);
  const TypedBuffer y = run_dequantize(q, numel, blocksize, code, DType::Float32);
  for (int64_t i = 0; i < numel; ++i) {
    ASSERT_LE(std::fabs(x[i] - y.value(i)), q.absmax[i / blocksize] * (widest / 2.0f + 1e-6f))
        << "element " << i;
  }
}

// An all-zero block has absmax 0; its 0 / 0 = NaN values take index 0 and decode to zero.
TEST(QuantizeBlockwise, AllZeroBlock) {
  const int64_t blocksize = 32, numel = 3 * blocksize;
  std::vector<float> x(numel, 0.0f);
  for (int64_t i = 2 * blocksize; i < numel; ++i) x[i] = 0.5f;  // one non-zero block
  const Code code = fourbit::create_dynamic_map(true);
  const Quantized q =
      run_quantize(TypedBuffer::from_floats(DType::Float32, x), numel, blocksize, code);
  EXPECT_EQ(q.absmax, (std::vector<float>{0.0f, 0.0f, 0.5f}));
  for (int64_t i = 0; i < 2 * blocksize; ++i) EXPECT_EQ(q.out[i], 0) << i;
  for (int64_t i = 2 * blocksize; i < numel; ++i) EXPECT_EQ(q.out[i], 255) << i;  // 1.0
  const TypedBuffer y = run_dequantize(q, numel, blocksize, code, DType::Float32);
  for (int64_t i = 0; i < numel; ++i) EXPECT_EQ(y.value(i), x[i]) << i;
}

// NaN is ignored by absmax (unlike quantize_4bit) and itself maps to index 0; the other
// values of its block quantize as if the NaN were absent.
TEST(QuantizeBlockwise, NanIsIgnoredByAbsmax) {
  const int64_t blocksize = 64, numel = 2 * blocksize;
  const Code code = fourbit::create_dynamic_map(true);
  std::vector<float> x = fourbit_test::normal_data(numel);
  for (DType dtype : kAllDTypes) {
    SCOPED_TRACE(fourbit::to_string(dtype));
    std::vector<float> with_nan = x;
    with_nan[10] = std::numeric_limits<float>::quiet_NaN();
    const TypedBuffer in = TypedBuffer::from_floats(dtype, with_nan);
    const Quantized q = run_quantize(in, numel, blocksize, code);
    std::vector<float> without = values_seen(in, numel);
    without[10] = 0.0f;
    const Quantized clean = reference_quantize(without, blocksize, code);
    EXPECT_EQ(q.absmax, clean.absmax);
    EXPECT_EQ(q.out[10], 0);
    for (int64_t i = 0; i < numel; ++i) {
      if (i != 10) {
        EXPECT_EQ(q.out[i], clean.out[i]) << i;
      }
    }
    EXPECT_EQ(q.out, reference_quantize(values_seen(in, numel), blocksize, code).out);
  }
}

// A value exactly halfway (in fp32) between two code values takes the lower index. The
// block holds a 1.0, so absmax is 1 and the scaled value is the input itself.
TEST(QuantizeBlockwise, TiesTakeLowerIndex) {
  const Code code = fourbit::create_dynamic_map(true);
  std::vector<float> x = {1.0f};
  std::vector<int> lower;
  for (int k = 0; k + 1 < fourbit::kDynamicMapSize; ++k) {
    const float m = (code[k] + code[k + 1]) / 2.0f;
    if (code[k] < m && m < code[k + 1] && m - code[k] == code[k + 1] - m) {
      x.push_back(m);
      lower.push_back(k);
    }
  }
  ASSERT_GT(lower.size(), 100u) << "too few exact fp32 halfway points to test";
  const int64_t numel = static_cast<int64_t>(x.size());
  const Quantized q = run_quantize(TypedBuffer::from_floats(DType::Float32, x), numel, 4096, code);
  ASSERT_EQ(q.absmax[0], 1.0f);
  for (size_t j = 0; j < lower.size(); ++j) {
    EXPECT_EQ(q.out[j + 1], lower[j])
        << "halfway between code " << lower[j] << " and " << lower[j] + 1 << ": " << x[j + 1];
  }
}

// An unsorted code would break the nearest-value search, so it is rejected.
TEST(QuantizeBlockwise, RejectsUnsortedCode) {
  Code code = fourbit::create_dynamic_map(true);
  std::swap(code[10], code[11]);
  const std::vector<float> in(64, 1.0f);
  std::vector<uint8_t> out(64);
  std::vector<float> absmax(1);
  fourbit::QuantizeBlockwiseParams p;
  p.input = in.data();
  p.numel = 64;
  p.blocksize = 64;
  p.code = code.data();
  p.out = out.data();
  p.absmax = absmax.data();
  EXPECT_TRUE(
      throws_invalid([&] { fourbit::quantize_blockwise(p); }, {"code", "sorted", "code[10]"}));
}

// Bad arguments throw InvalidArgument naming the argument and its value.
TEST(QuantizeBlockwise, RejectsBadArguments) {
  const Code code = fourbit::create_dynamic_map(true);
  const std::vector<float> in(128, 1.0f);
  std::vector<uint8_t> out(128);
  std::vector<float> absmax(4);
  fourbit::QuantizeBlockwiseParams base;
  base.input = in.data();
  base.numel = 128;
  base.blocksize = 64;
  base.code = code.data();
  base.out = out.data();
  base.absmax = absmax.data();
  EXPECT_NO_THROW(fourbit::quantize_blockwise(base));
  for (int64_t bs : {48, 16, 8192}) {
    auto p = base;
    p.blocksize = bs;
    EXPECT_TRUE(
        throws_invalid([&] { fourbit::quantize_blockwise(p); }, {"blocksize", std::to_string(bs)}));
  }
  auto p = base;
  p.numel = -1;
  EXPECT_TRUE(throws_invalid([&] { fourbit::quantize_blockwise(p); }, {"numel", "-1"}));
  p = base;
  p.input = nullptr;
  EXPECT_TRUE(throws_invalid([&] { fourbit::quantize_blockwise(p); }, {"input", "128"}));
  p = base;
  p.code = nullptr;
  EXPECT_TRUE(throws_invalid([&] { fourbit::quantize_blockwise(p); }, {"code", "128"}));
  p = base;
  p.dtype = static_cast<DType>(7);
  EXPECT_TRUE(throws_invalid([&] { fourbit::quantize_blockwise(p); }, {"dtype", "7"}));
}

// dequantize_blockwise checks its arguments the same way.
TEST(DequantizeBlockwise, RejectsBadArguments) {
  const Code code = fourbit::create_dynamic_map(true);
  const std::vector<uint8_t> in(128, 0);
  const std::vector<float> absmax(2, 1.0f);
  std::vector<float> out(128);
  fourbit::DequantizeBlockwiseParams base;
  base.input = in.data();
  base.code = code.data();
  base.absmax = absmax.data();
  base.numel = 128;
  base.blocksize = 64;
  base.out = out.data();
  EXPECT_NO_THROW(fourbit::dequantize_blockwise(base));
  for (int64_t bs : {48, 16, 8192}) {
    auto p = base;
    p.blocksize = bs;
    EXPECT_TRUE(throws_invalid([&] { fourbit::dequantize_blockwise(p); },
                               {"blocksize", std::to_string(bs)}));
  }
  auto p = base;
  p.numel = -1;
  EXPECT_TRUE(throws_invalid([&] { fourbit::dequantize_blockwise(p); }, {"numel", "-1"}));
  p = base;
  p.absmax = nullptr;
  EXPECT_TRUE(throws_invalid([&] { fourbit::dequantize_blockwise(p); }, {"absmax", "128"}));
  p = base;
  p.out_dtype = static_cast<DType>(7);
  EXPECT_TRUE(throws_invalid([&] { fourbit::dequantize_blockwise(p); }, {"out_dtype", "7"}));
}

// Sizes are int64: validation accepts a 3e9-element tensor (the kernel is not run).
TEST(QuantizeBlockwise, Int64Sizes) {
  const int64_t big = 3'000'000'000;
  EXPECT_EQ(fourbit::num_blocks(big, 256), 11'718'750);
  using fourbit_test::far_pointer;
  fourbit::QuantizeBlockwiseParams q;
  q.input = far_pointer<float>(1);
  q.numel = big;
  q.code = far_pointer<float>(2);
  q.out = far_pointer<uint8_t>(3);
  q.absmax = far_pointer<float>(4);
  EXPECT_NO_THROW(fourbit::validate(q));
  fourbit::DequantizeBlockwiseParams d;
  d.input = far_pointer<uint8_t>(1);
  d.code = far_pointer<float>(2);
  d.absmax = far_pointer<float>(3);
  d.numel = big;
  d.out = far_pointer<float>(4);
  EXPECT_NO_THROW(fourbit::validate(d));
}

// In a CPU-only build the CUDA entry points fail loudly with a Runtime error.
TEST(QuantizeBlockwise, CudaEntryPointsThrowWithoutCuda) {
  if (fourbit::built_with_cuda()) GTEST_SKIP() << "libfourbit was built with CUDA";
  const auto runtime = fourbit::Error::Kind::Runtime;
  EXPECT_TRUE(fourbit_test::throws_error(
      [] { fourbit::quantize_blockwise_cuda(fourbit::QuantizeBlockwiseParams{}, nullptr); },
      runtime, {"quantize_blockwise_cuda", "without CUDA"}));
  EXPECT_TRUE(fourbit_test::throws_error(
      [] { fourbit::dequantize_blockwise_cuda(fourbit::DequantizeBlockwiseParams{}, nullptr); },
      runtime, {"dequantize_blockwise_cuda", "without CUDA"}));
}

}  // namespace
