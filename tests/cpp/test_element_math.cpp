// The shared element math (include/fourbit/detail/element_math.h), checked against
// reference-free properties: every 16-bit value round-trips, every midpoint between two
// neighbours rounds to the even one, every NaN stores the canonical bytes, the shift index
// equals the division, and the searches equal a brute-force scan.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "fourbit/codebook.h"
#include "fourbit/detail/element_math.h"

namespace {

using fourbit::detail::bf16_to_float;
using fourbit::detail::bits_float;
using fourbit::detail::float_bits;
using fourbit::detail::float_to_bf16;
using fourbit::detail::float_to_half;
using fourbit::detail::half_to_float;

bool half_is_nan(uint16_t h) { return (h & 0x7c00u) == 0x7c00u && (h & 0x3ffu) != 0; }
bool bf16_is_nan(uint16_t h) { return (h & 0x7f80u) == 0x7f80u && (h & 0x7fu) != 0; }

TEST(ElementMath, EveryHalfRoundTrips) {
  for (uint32_t h = 0; h < 0x10000u; ++h) {
    const uint16_t bits = static_cast<uint16_t>(h);
    if (half_is_nan(bits)) continue;
    ASSERT_EQ(float_to_half(half_to_float(bits)), bits) << std::hex << h;
  }
}

TEST(ElementMath, EveryBf16RoundTrips) {
  for (uint32_t h = 0; h < 0x10000u; ++h) {
    const uint16_t bits = static_cast<uint16_t>(h);
    if (bf16_is_nan(bits)) continue;
    ASSERT_EQ(float_to_bf16(bf16_to_float(bits)), bits) << std::hex << h;
  }
}

// Between two neighbouring finite halves of the same sign (subnormals included), the exact
// midpoint goes to the one with the even mantissa, and one fp32 ulp off it to the nearer.
TEST(ElementMath, HalfMidpointsTieToEvenSubnormalsIncluded) {
  for (uint32_t sign : {0u, 0x8000u}) {
    for (uint32_t h = 0; h < 0x7bffu; ++h) {
      const uint16_t lo = static_cast<uint16_t>(sign | h), hi = static_cast<uint16_t>(sign | (h + 1));
      const float a = half_to_float(lo), b = half_to_float(hi);
      const float mid = static_cast<float>((static_cast<double>(a) + b) / 2);  // exact in fp32
      ASSERT_EQ(static_cast<double>(mid), (static_cast<double>(a) + b) / 2);
      const uint16_t even = (h & 1u) ? hi : lo;
      ASSERT_EQ(float_to_half(mid), even) << std::hex << h;
      const float toward_a = std::nextafter(mid, a), toward_b = std::nextafter(mid, b);
      ASSERT_EQ(float_to_half(toward_a), lo) << std::hex << h;
      ASSERT_EQ(float_to_half(toward_b), hi) << std::hex << h;
    }
  }
}

TEST(ElementMath, Bf16MidpointsTieToEven) {
  for (uint32_t sign : {0u, 0x8000u}) {
    for (uint32_t h = 0; h < 0x7f7fu; ++h) {
      const uint16_t lo = static_cast<uint16_t>(sign | h), hi = static_cast<uint16_t>(sign | (h + 1));
      const uint32_t mid_bits = (static_cast<uint32_t>(lo) << 16) | 0x8000u;  // exact midpoint
      const float mid = bits_float(mid_bits);
      ASSERT_EQ(float_to_bf16(mid), (h & 1u) ? hi : lo) << std::hex << h;
      ASSERT_EQ(float_to_bf16(bits_float(mid_bits - 1)), lo) << std::hex << h;
      ASSERT_EQ(float_to_bf16(bits_float(mid_bits + 1)), hi) << std::hex << h;
    }
  }
}

TEST(ElementMath, OverflowRoundsToInfinity) {
  EXPECT_EQ(float_to_half(65504.0f), 0x7bffu);
  EXPECT_EQ(float_to_half(65519.99f), 0x7bffu);
  EXPECT_EQ(float_to_half(65520.0f), 0x7c00u);  // the midpoint to 2^16 ties to even: inf
  EXPECT_EQ(float_to_half(-1e30f), 0xfc00u);
  EXPECT_EQ(float_to_half(INFINITY), 0x7c00u);
  EXPECT_EQ(float_to_bf16(std::numeric_limits<float>::max()), 0x7f80u);
  EXPECT_EQ(float_to_bf16(-INFINITY), 0xff80u);
  EXPECT_EQ(float_to_half(-0.0f), 0x8000u);
  EXPECT_EQ(float_to_bf16(-0.0f), 0x8000u);
  EXPECT_EQ(float_to_half(bits_float(0x33000000u)), 0x0000u);  // 2^-25: tie to even (zero)
  EXPECT_EQ(float_to_half(bits_float(0x33000001u)), 0x0001u);  // just above: smallest subnormal
}

// Every NaN payload and sign stores the canonical bytes: bf16 0x7FC0 (sign dropped, as
// torch's CPU kernels do), fp16 sign | 0x7E00.
TEST(ElementMath, EveryNaNStoresTheCanonicalBytes) {
  std::mt19937 rng(7);
  std::vector<uint32_t> payloads = {1u, 0x400000u, 0x7fffffu, 0x200000u, 0x1000u};
  for (int i = 0; i < 2000; ++i) payloads.push_back(1u + rng() % 0x7fffffu);
  for (uint32_t payload : payloads) {
    for (uint32_t sign : {0u, 0x80000000u}) {
      const float nan = bits_float(sign | 0x7f800000u | payload);
      ASSERT_TRUE(std::isnan(nan));
      ASSERT_EQ(float_to_bf16(nan), fourbit::detail::kBf16CanonicalNaN) << std::hex << payload;
      ASSERT_EQ(float_to_half(nan), (sign >> 16) | fourbit::detail::kHalfCanonicalNaN)
          << std::hex << payload;
    }
  }
  EXPECT_EQ(fourbit::detail::kBf16CanonicalNaN, 0x7fc0u);
  EXPECT_EQ(fourbit::detail::kHalfCanonicalNaN, 0x7e00u);
}

TEST(ElementMath, ShiftIndexEqualsDivisionForEveryPowerOfTwo) {
  std::mt19937_64 rng(11);
  for (int k = 0; k < 62; ++k) {
    const int64_t blocksize = int64_t{1} << k;
    ASSERT_EQ(fourbit::detail::log2_pow2(blocksize), k);
    std::vector<int64_t> samples = {0, 1, blocksize - 1, blocksize, blocksize + 1, 3 * blocksize - 1,
                                    (int64_t{1} << 31) - 1, int64_t{1} << 31, (int64_t{1} << 40) + 7,
                                    std::numeric_limits<int64_t>::max()};
    for (int i = 0; i < 200; ++i) samples.push_back(static_cast<int64_t>(rng() >> 1));
    for (int64_t e : samples) {
      if (e < 0) continue;
      ASSERT_EQ(e >> fourbit::detail::log2_pow2(blocksize), e / blocksize) << e << " / " << blocksize;
    }
  }
}

TEST(ElementMath, NibbleOfTakesTheHighNibbleForEvenElements) {
  EXPECT_EQ(fourbit::detail::nibble_of(0xa5u, 0), 0xa);
  EXPECT_EQ(fourbit::detail::nibble_of(0xa5u, 1), 0x5);
  EXPECT_EQ(fourbit::detail::nibble_of(0x0fu, int64_t{1} << 40), 0x0);
  EXPECT_EQ(fourbit::detail::nibble_of(0x0fu, (int64_t{1} << 40) + 1), 0xf);
}

// The nested scale of block b uses nested_absmax[b / nested_blocksize], two roundings.
TEST(ElementMath, NestedBlockScaleFindsItsNestedBlockByShift) {
  const auto code = fourbit::create_dynamic_map(true);
  for (int64_t nested_blocksize : {1, 2, 256, 4096}) {
    const int64_t blocks = 3 * nested_blocksize + 5;
    std::vector<uint8_t> q(blocks);
    std::vector<float> nested_absmax((blocks + nested_blocksize - 1) / nested_blocksize);
    for (int64_t b = 0; b < blocks; ++b) q[b] = static_cast<uint8_t>((b * 37) % 256);
    for (size_t i = 0; i < nested_absmax.size(); ++i) nested_absmax[i] = 0.25f + 0.5f * i;
    const float offset = 0.0123f;
    fourbit::BlockScales s;
    s.absmax_q = q.data();
    s.nested_code = code.data();
    s.nested_absmax = nested_absmax.data();
    s.offset = &offset;
    s.nested_blocksize = nested_blocksize;
    for (int64_t b = 0; b < blocks; ++b) {
      const float product = code[q[b]] * nested_absmax[b / nested_blocksize];
      ASSERT_EQ(float_bits(fourbit::detail::block_scale(s, b)), float_bits(product + offset)) << b;
    }
  }
}

// bucket_4bit: the number of midpoints strictly below x; NaN at the top.
TEST(ElementMath, Bucket4bitTiesGoToTheLowerCode) {
  const auto& q = fourbit::quantizer_4bit(fourbit::QuantType::NF4);
  const float* mid = q.midpoints.data();
  for (int k = 0; k < 15; ++k) {
    ASSERT_EQ(fourbit::detail::bucket_4bit(mid[k], mid), k) << k;
    ASSERT_EQ(fourbit::detail::bucket_4bit(std::nextafter(mid[k], 2.0f), mid), k + 1) << k;
  }
  EXPECT_EQ(fourbit::detail::bucket_4bit(-INFINITY, mid), 0);
  EXPECT_EQ(fourbit::detail::bucket_4bit(INFINITY, mid), 15);
  EXPECT_EQ(fourbit::detail::bucket_4bit(NAN, mid), 15);
  // A kernel-parameter array works as well as a pointer.
  float as_array[15];
  for (int k = 0; k < 15; ++k) as_array[k] = mid[k];
  EXPECT_EQ(fourbit::detail::bucket_4bit(0.0f, as_array), fourbit::detail::bucket_4bit(0.0f, mid));
}

// Brute force: the lowest index among the entries at the smallest fp32 distance.
int nearest_brute_force(float x, const float* code) {
  if (std::isnan(x)) return 0;
  int best = 0;
  float best_dist = std::fabs(x - code[0]);
  for (int k = 1; k < 256; ++k) {
    const float d = std::fabs(x - code[k]);
    if (d < best_dist) {
      best = k;
      best_dist = d;
    }
  }
  return best;
}

TEST(ElementMath, NearestCode8bitEqualsBruteForce) {
  // The signed and unsigned dynamic maps, and a short map padded with duplicated zeros.
  const std::vector<std::array<float, 256>> maps = {fourbit::create_dynamic_map(true),
                                                    fourbit::create_dynamic_map(false),
                                                    fourbit::create_dynamic_map(true, 3, 5)};
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> uniform(-1.1f, 1.1f);
  for (const auto& map : maps) {
    const float* code = map.data();
    // x = value / absmax is finite (|x| <= 1, or NaN for 0/0 and inf/inf): no infinities.
    std::vector<float> xs = {0.0f, -0.0f, 1.0f, -1.0f, 3.0f, -3.0f, 1e-30f, -1e-30f, 1e-44f};
    for (int k = 0; k < 256; ++k) {
      xs.push_back(code[k]);
      xs.push_back(std::nextafter(code[k], 2.0f));
      xs.push_back(std::nextafter(code[k], -2.0f));
      if (k + 1 < 256) {
        const float mid = (code[k] + code[k + 1]) / 2;  // ties between neighbours
        xs.push_back(mid);
        xs.push_back(std::nextafter(mid, 2.0f));
        xs.push_back(std::nextafter(mid, -2.0f));
      }
    }
    for (int i = 0; i < 20000; ++i) xs.push_back(uniform(rng));
    for (float x : xs) {
      ASSERT_EQ(fourbit::detail::nearest_code_8bit(x, code), nearest_brute_force(x, code)) << x;
    }
    EXPECT_EQ(fourbit::detail::nearest_code_8bit(NAN, code), 0);
    // An all-zero block: 0 / 0 is NaN and maps to index 0.
    EXPECT_EQ(fourbit::detail::quantize_8bit(0.0f, 0.0f, code), 0);
  }
}

TEST(ElementMath, AbsmaxReductionsIgnoreOrPropagateNaN) {
  EXPECT_EQ(fourbit::detail::max_ignore_nan(1.0f, NAN), 1.0f);
  EXPECT_EQ(fourbit::detail::max_ignore_nan(1.0f, 2.0f), 2.0f);
  EXPECT_TRUE(std::isnan(fourbit::detail::max_propagate_nan(1.0f, NAN)));
  EXPECT_TRUE(std::isnan(fourbit::detail::max_propagate_nan(NAN, 1.0f)));
  EXPECT_EQ(fourbit::detail::max_propagate_nan(1.0f, 0.5f), 1.0f);
}

// The AdamW element update against the formulas of optim.h evaluated in double: the fp32
// result is within a few ulps (the exact bytes are pinned by test_optim's references).
TEST(ElementMath, AdamWUpdateFollowsTheDocumentedFormula) {
  fourbit::AdamWHyperParams h;
  h.lr = 1e-2;
  h.weight_decay = 0.1;
  for (int64_t step : {1, 10}) {
    const auto c = fourbit::detail::adamw_coefficients(h, step);
    const auto lerp = fourbit::detail::adamw_lerp(c);
    for (bool bits8 : {false, true}) {
      float p = 0.75f, m = 0.01f, v = 0.002f;
      const float g = -0.3f;
      const double md = h.beta1 * 0.01 + (1 - h.beta1) * g;
      const double vd = h.beta2 * 0.002 + (1 - h.beta2) * double(g) * g;
      const double bc1 = 1 - std::pow(h.beta1, double(step)), bc2 = 1 - std::pow(h.beta2, double(step));
      const double pd = 0.75 * (1 - h.lr * h.weight_decay) - h.lr / bc1 * md / (std::sqrt(vd / bc2) + h.eps);
      fourbit::detail::adamw_update(p, g, m, v, c, lerp, bits8);
      EXPECT_NEAR(m, md, 4e-7 * std::fabs(md)) << bits8;
      EXPECT_NEAR(v, vd, 4e-7 * std::fabs(vd)) << bits8;
      EXPECT_NEAR(p, pd, 4e-7 * std::fabs(pd)) << bits8;
    }
  }
}

}  // namespace
