// Known-answer tests for the codebooks: the NF4 / FP4 tables, the 4-bit quantizer
// (midpoints and sorted order), bitsandbytes' dynamic map, blocksize and quant-type parsing.
#include "fourbit/codebook.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "fourbit/error.h"
#include "test_helpers.h"

namespace {

using fourbit::QuantType;
using fourbit_test::throws_invalid;

// NF4 holds the QLoRA quantiles, each the fp64 literal of bitsandbytes rounded once to fp32.
TEST(Codebook, Nf4TableIsExact) {
  const double expected[16] = {
      -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
      -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
      0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
      0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0};
  const auto& nf4 = fourbit::codebook_4bit(QuantType::NF4);
  ASSERT_EQ(nf4.size(), 16u);
  for (int i = 0; i < 16; ++i) EXPECT_EQ(nf4[i], static_cast<float>(expected[i])) << "index " << i;
  EXPECT_EQ(nf4[0], -1.0f);
  EXPECT_EQ(nf4[1], static_cast<float>(-0.6961928009986877));
  EXPECT_EQ(nf4[7], 0.0f);
  EXPECT_FALSE(std::signbit(nf4[7]));
  EXPECT_EQ(nf4[15], 1.0f);
  EXPECT_TRUE(std::is_sorted(nf4.begin(), nf4.end()));
  EXPECT_EQ(std::adjacent_find(nf4.begin(), nf4.end()), nf4.end()) << "NF4 values are distinct";
}

// FP4 is in bit-pattern order (bit 3 = sign, 2 exponent bits, 1 mantissa bit) divided by 12.
TEST(Codebook, Fp4TableIsInCodeOrder) {
  const float magnitudes[8] = {0.0f, 0.0625f, 8.0f, 12.0f, 4.0f, 6.0f, 2.0f, 3.0f};
  const auto& fp4 = fourbit::codebook_4bit(QuantType::FP4);
  for (int i = 0; i < 8; ++i) {
    EXPECT_EQ(fp4[i], magnitudes[i] / 12.0f) << "index " << i;
    EXPECT_EQ(fp4[i + 8], -magnitudes[i] / 12.0f) << "index " << i + 8;
    EXPECT_FALSE(std::signbit(fp4[i])) << "index " << i;
    if (i > 0) EXPECT_TRUE(std::signbit(fp4[i + 8])) << "index " << i + 8;
  }
  EXPECT_EQ(fp4[3], 1.0f);
  EXPECT_EQ(fp4[11], -1.0f);
  EXPECT_EQ(fp4[1], 0.0625f / 12.0f);
  EXPECT_EQ(fp4[8], 0.0f);
  // Code 8 is +0.0, as in bitsandbytes' quant_map bytes (a -0.0 would change them).
  EXPECT_FALSE(std::signbit(fp4[8])) << "code 8 is +0.0";
}

// Midpoints sit halfway (in fp32) between neighbours of the sorted codebook and increase
// strictly, so bucketing by "number of midpoints below x" is well defined.
TEST(Codebook, QuantizerMidpointsAreFp32Halfways) {
  for (QuantType qt : {QuantType::NF4, QuantType::FP4}) {
    SCOPED_TRACE(fourbit::to_string(qt));
    const auto& code = fourbit::codebook_4bit(qt);
    const auto& q = fourbit::quantizer_4bit(qt);
    // sorted_order is a permutation listing the codes by ascending value.
    std::array<bool, 16> seen{};
    for (int k = 0; k < 16; ++k) {
      ASSERT_LT(q.sorted_order[k], 16);
      EXPECT_FALSE(seen[q.sorted_order[k]]) << "code " << int(q.sorted_order[k]) << " repeated";
      seen[q.sorted_order[k]] = true;
      if (k > 0) {
        EXPECT_LE(code[q.sorted_order[k - 1]], code[q.sorted_order[k]]);
      }
    }
    for (int k = 0; k < 15; ++k) {
      const float lo = code[q.sorted_order[k]];
      const float hi = code[q.sorted_order[k + 1]];
      EXPECT_EQ(q.midpoints[k], (lo + hi) / 2.0f) << "midpoint " << k;
      if (k > 0) {
        EXPECT_LT(q.midpoints[k - 1], q.midpoints[k]) << "midpoint " << k;
      }
    }
  }
}

// NF4 is already sorted, so its order is the identity.
TEST(Codebook, Nf4SortedOrderIsIdentity) {
  const auto& q = fourbit::quantizer_4bit(QuantType::NF4);
  for (int k = 0; k < 16; ++k) EXPECT_EQ(q.sorted_order[k], k);
}

// FP4's order matches torch.argsort (stable): +0 (code 0) before -0 (code 8).
TEST(Codebook, Fp4SortedOrder) {
  const std::array<uint8_t, 16> expected = {11, 10, 13, 12, 15, 14, 9, 0,
                                            8,  1,  6,  7,  4,  5,  2, 3};
  EXPECT_EQ(fourbit::quantizer_4bit(QuantType::FP4).sorted_order, expected);
}

// The default signed map: 127 negatives, one zero, 127 positives and 1.0, symmetric.
TEST(DynamicMap, SignedDefault) {
  const auto map = fourbit::create_dynamic_map(true);
  ASSERT_EQ(map.size(), 256u);
  EXPECT_TRUE(std::is_sorted(map.begin(), map.end()));
  EXPECT_EQ(std::count(map.begin(), map.end(), 0.0f), 1);
  EXPECT_EQ(map[255], 1.0f);
  EXPECT_NEAR(map[0], -0.99297f, 1e-5f);
  EXPECT_EQ(map[127], 0.0f);
  for (int k = 0; k < 127; ++k) EXPECT_EQ(map[k], -map[254 - k]) << "index " << k;
  // Defaults are signed, 7 exponent bits, 8 bits.
  EXPECT_EQ(fourbit::create_dynamic_map(), map);
  EXPECT_EQ(fourbit::create_dynamic_map(true, 7, 8), map);
}

// The unsigned map spans [0, 1].
TEST(DynamicMap, Unsigned) {
  const auto map = fourbit::create_dynamic_map(false);
  EXPECT_TRUE(std::is_sorted(map.begin(), map.end()));
  EXPECT_EQ(map[0], 0.0f);
  EXPECT_EQ(map[255], 1.0f);
  EXPECT_EQ(std::count(map.begin(), map.end(), 0.0f), 1);
}

// A map with fewer than 256 values is padded with zeros (then sorted in).
TEST(DynamicMap, ShortMapIsZeroPadded) {
  // 4 bits, signed: 2 * (1 + 2 + 4) means, plus 0 and 1 = 16 values; 240 padding zeros.
  const auto map = fourbit::create_dynamic_map(true, 3, 4);
  EXPECT_TRUE(std::is_sorted(map.begin(), map.end()));
  EXPECT_EQ(std::count(map.begin(), map.end(), 0.0f), 241);
  EXPECT_EQ(map[255], 1.0f);
  EXPECT_LT(map[0], 0.0f);
}

// Out-of-range arguments throw InvalidArgument naming the argument and the value.
TEST(DynamicMap, RejectsBadArguments) {
  EXPECT_TRUE(throws_invalid([] { fourbit::create_dynamic_map(true, 0, 8); },
                             {"max_exponent_bits", "got 0"}));
  EXPECT_TRUE(throws_invalid([] { fourbit::create_dynamic_map(true, 8, 8); },
                             {"max_exponent_bits", "got 8"}));
  EXPECT_TRUE(throws_invalid([] { fourbit::create_dynamic_map(true, 7, 9); },
                             {"total_bits", "got 9"}));
  EXPECT_TRUE(throws_invalid([] { fourbit::create_dynamic_map(false, 1, 1); },
                             {"total_bits", "got 1"}));
}

// Supported blocksizes are exactly the powers of two from 32 to 4096.
TEST(Blocksize, ValidSet) {
  for (int64_t bs = 32; bs <= 4096; bs *= 2) EXPECT_TRUE(fourbit::is_valid_blocksize(bs)) << bs;
  for (int64_t bs : {int64_t{0}, int64_t{1}, int64_t{16}, int64_t{48}, int64_t{96},
                     int64_t{4095}, int64_t{8192}, int64_t{-64}, int64_t{1} << 40}) {
    EXPECT_FALSE(fourbit::is_valid_blocksize(bs)) << bs;
  }
}

// "nf4" / "fp4" parse; anything else throws naming the argument and the bad string.
TEST(QuantTypeParse, AcceptsKnownRejectsOthers) {
  EXPECT_EQ(fourbit::parse_quant_type("nf4"), QuantType::NF4);
  EXPECT_EQ(fourbit::parse_quant_type("fp4"), QuantType::FP4);
  EXPECT_TRUE(throws_invalid([] { fourbit::parse_quant_type("nf5"); }, {"quant_type", "nf5"}));
  EXPECT_TRUE(throws_invalid([] { fourbit::parse_quant_type("NF4", "qtype"); }, {"qtype", "NF4"}));
}

}  // namespace
