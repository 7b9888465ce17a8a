// Argument validation under hostile sizes and aliasing: every derived element or byte count
// is overflow-checked (no signed overflow that could let a null pointer pass its check), and
// no output may overlap an input. Each case names the argument in its InvalidArgument Error.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "fourbit/error.h"
#include "fourbit/gemm.h"
#include "fourbit/lora.h"
#include "fourbit/quantize.h"
#include "quantized_weight.h"
#include "test_helpers.h"

namespace {

using fourbit::DType;
using fourbit::QuantType;
using fourbit_test::far_pointer;
using fourbit_test::QuantizedWeight;
using fourbit_test::throws_invalid;

constexpr int64_t kHuge = int64_t{1} << 62;

TEST(CheckedMul, NamesTheProductAndFactors) {
  EXPECT_EQ(fourbit::checked_mul(int64_t{1} << 31, int64_t{1} << 31, "op", "a * b"), int64_t{1} << 62);
  EXPECT_TRUE(throws_invalid([] { fourbit::checked_mul(kHuge, 4, "op", "a * b"); },
                             {"op: a * b overflows int64", "4611686018427387904 * 4"}));
}

TEST(Validate, NumelWhoseBytesOverflowIsRejected) {
  fourbit::Quantize4bitParams q;
  q.input = far_pointer<float>(1);
  q.packed = far_pointer<uint8_t>(2);
  q.absmax = far_pointer<float>(3);
  q.numel = INT64_MAX;
  EXPECT_TRUE(throws_invalid([&] { fourbit::validate(q); }, {"quantize_4bit", "numel * 4", "overflows"}));
  fourbit::Dequantize4bitParams d;
  d.packed = far_pointer<uint8_t>(1);
  d.scales.absmax = far_pointer<float>(2);
  d.out = far_pointer<float>(3);
  d.numel = kHuge;
  EXPECT_TRUE(throws_invalid([&] { fourbit::validate(d); }, {"dequantize_4bit", "overflows"}));
  EXPECT_EQ(fourbit::num_blocks(INT64_MAX, 64), INT64_MAX / 64 + 1);  // no wrap near the top
}

// M * K used to wrap to 0 (signed overflow), letting a null x pass its pointer check.
TEST(Validate, GemmActivationSizesAreOverflowChecked) {
  const QuantizedWeight w(8, 64, 64, QuantType::NF4, false, 3);
  fourbit::Gemm4bitParams p;
  p.weight = w.view();
  p.x = nullptr;
  p.y = far_pointer<float>(1);
  p.M = (int64_t{1} << 62) / 16;  // M * 64 = 2^64: wraps to 0 without the check
  p.dtype = DType::Float32;
  EXPECT_TRUE(throws_invalid([&] { fourbit::gemm_4bit(p); }, {"gemm_4bit", "M * K", "overflows"}));
  fourbit::Gemm4bitGradInputParams g;
  g.weight = w.view();
  g.grad_output = far_pointer<float>(1);
  g.grad_input = nullptr;
  g.M = p.M;
  EXPECT_TRUE(throws_invalid([&] { fourbit::gemm_4bit_grad_input(g); }, {"gemm_4bit_grad_input", "overflows"}));
  // M * N * K (the kernels' work counter) must fit too, even when each matrix does.
  const QuantizedWeight big(64, 64, 64, QuantType::NF4, false, 3);
  fourbit::Gemm4bitParams q;
  q.weight = big.view();
  q.weight.N = int64_t{1} << 30;
  q.weight.K = int64_t{1} << 30;
  q.x = far_pointer<float>(1);
  q.y = far_pointer<float>(2);
  q.M = int64_t{1} << 20;
  EXPECT_TRUE(throws_invalid([&] { fourbit::validate(q); }, {"overflows"}));
}

TEST(Validate, LoraAdapterSizesAreOverflowChecked) {
  const QuantizedWeight w(8, 64, 64, QuantType::NF4, false, 3);
  fourbit::Lora4bitForwardParams p;
  p.weight = w.view();
  p.x = far_pointer<float>(1);
  p.y = far_pointer<float>(2);
  p.lora_a = far_pointer<float>(3);
  p.lora_b = far_pointer<float>(4);
  p.xa = nullptr;
  p.M = kHuge / 8;  // M * N fits, M * r (r = 1024) does not
  p.r = 1024;
  p.dtype = DType::Float32;
  EXPECT_TRUE(throws_invalid([&] { fourbit::validate(p); }, {"lora_4bit_forward", "overflows"}));
}

// An output that overlaps an input is an argument error, not wrong values.
TEST(Validate, OutputsMustNotAliasInputs) {
  std::vector<float> in = fourbit_test::normal_data(256, 1);
  std::vector<uint8_t> packed(128);
  std::vector<float> absmax(4);
  fourbit::Quantize4bitParams q;
  q.input = in.data();
  q.numel = 256;
  q.packed = packed.data();
  q.absmax = absmax.data();
  fourbit::quantize_4bit(q);
  auto bad = q;
  bad.packed = reinterpret_cast<uint8_t*>(in.data()) + 100;
  EXPECT_TRUE(throws_invalid([&] { fourbit::quantize_4bit(bad); }, {"quantize_4bit", "packed", "overlaps", "input"}));

  // dequantize into a buffer that holds the packed codes: out overlaps packed.
  std::vector<float> buf(256);
  std::memcpy(buf.data(), packed.data(), packed.size());
  fourbit::Dequantize4bitParams d;
  d.packed = reinterpret_cast<const uint8_t*>(buf.data());
  d.scales.absmax = absmax.data();
  d.numel = 256;
  d.out = buf.data();
  EXPECT_TRUE(throws_invalid([&] { fourbit::dequantize_4bit(d); }, {"dequantize_4bit", "out", "overlaps", "packed"}));
  d.packed = packed.data();
  d.out = absmax.data() - 1;  // out's first float is before absmax; the rest covers it
  d.numel = 2;
  EXPECT_TRUE(throws_invalid([&] { fourbit::dequantize_4bit(d); }, {"out", "overlaps", "absmax"}));

  const QuantizedWeight w(8, 64, 64, QuantType::NF4, false, 3);
  std::vector<float> x(2 * 64);
  fourbit::Gemm4bitParams g;
  g.weight = w.view();
  g.x = x.data();
  g.y = x.data() + 64;
  g.M = 2;
  g.dtype = DType::Float32;
  EXPECT_TRUE(throws_invalid([&] { fourbit::gemm_4bit(g); }, {"gemm_4bit", "y", "overlaps", "x"}));
}

}  // namespace
