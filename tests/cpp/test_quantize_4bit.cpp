// quantize_4bit / dequantize_4bit on the CPU against a scalar reference written here from
// the documented rule (include/fourbit/codebook.h, quantize.h), plus round trips, nested
// (double-quantized) scales, edge values and argument validation.
#include <gtest/gtest.h>

#include <algorithm>
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
using fourbit::QuantType;
using fourbit_test::kAllDTypes;
using fourbit_test::throws_invalid;
using fourbit_test::TypedBuffer;

constexpr QuantType kQuantTypes[] = {QuantType::NF4, QuantType::FP4};

struct Quantized {
  std::vector<uint8_t> packed;
  std::vector<float> absmax;
};

// The code of a scaled value: its position among the sorted codebook values is the number
// of midpoints strictly below it (NaN: the top position), mapped back through sorted_order.
uint8_t reference_code(float scaled, QuantType qt) {
  const auto& q = fourbit::quantizer_4bit(qt);
  if (std::isnan(scaled)) return q.sorted_order[15];
  int below = 0;
  for (float m : q.midpoints) below += m < scaled ? 1 : 0;
  return q.sorted_order[below];
}

// Scalar reference of quantize_4bit on the values as the kernel reads them (`x`).
Quantized reference_quantize(const std::vector<float>& x, int64_t blocksize, QuantType qt) {
  const int64_t n = static_cast<int64_t>(x.size());
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  std::vector<uint8_t> codes(x.size());
  Quantized out;
  out.absmax.resize(static_cast<size_t>(blocks));
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t start = b * blocksize;
    const int64_t end = std::min(start + blocksize, n);
    float absmax = 0.0f;
    bool has_nan = false;
    for (int64_t i = start; i < end; ++i) {
      if (std::isnan(x[i])) {
        has_nan = true;
      } else {
        absmax = std::max(absmax, std::fabs(x[i]));
      }
    }
    if (has_nan) absmax = std::numeric_limits<float>::quiet_NaN();
    const float clamped = std::isnan(absmax) ? absmax : std::max(absmax, 1e-38f);
    const bool full = end - start == blocksize;
    out.absmax[b] = full ? absmax : clamped;
    for (int64_t i = start; i < end; ++i) {
      const float scaled = full ? x[i] * (1.0f / clamped) : x[i] / clamped;
      codes[i] = reference_code(scaled, qt);
    }
  }
  out.packed.resize(x.size() / 2 + x.size() % 2);
  for (size_t j = 0; j < out.packed.size(); ++j) {
    const uint8_t hi = codes[2 * j];
    const uint8_t lo = 2 * j + 1 < x.size() ? codes[2 * j + 1] : reference_code(0.0f, qt);
    out.packed[j] = static_cast<uint8_t>(hi << 4 | lo);
  }
  return out;
}

// The 4-bit code of element i of a packed buffer.
int code_at(const std::vector<uint8_t>& packed, int64_t i) {
  const uint8_t byte = packed[static_cast<size_t>(i / 2)];
  return i % 2 == 0 ? byte >> 4 : byte & 0x0f;
}

std::vector<float> values_seen(const TypedBuffer& buf, int64_t numel) {
  std::vector<float> v(static_cast<size_t>(numel));
  for (int64_t i = 0; i < numel; ++i) v[i] = buf.value(static_cast<size_t>(i));
  return v;
}

Quantized run_quantize(const TypedBuffer& in, int64_t numel, int64_t blocksize, QuantType qt) {
  Quantized out;
  out.packed.assign(static_cast<size_t>((numel + 1) / 2), 0xAB);
  out.absmax.assign(static_cast<size_t>(fourbit::num_blocks(numel, blocksize)), -7.0f);
  fourbit::Quantize4bitParams p;
  p.input = in.data();
  p.dtype = in.dtype();
  p.numel = numel;
  p.blocksize = blocksize;
  p.quant_type = qt;
  p.packed = out.packed.data();
  p.absmax = out.absmax.data();
  fourbit::quantize_4bit(p);
  return out;
}

TypedBuffer run_dequantize(const Quantized& q, int64_t numel, int64_t blocksize, QuantType qt,
                           DType out_dtype) {
  TypedBuffer out(out_dtype, numel);
  fourbit::Dequantize4bitParams p;
  p.packed = q.packed.data();
  p.scales.absmax = q.absmax.data();
  p.numel = numel;
  p.blocksize = blocksize;
  p.quant_type = qt;
  p.out = out.data();
  p.out_dtype = out_dtype;
  fourbit::dequantize_4bit(p);
  return out;
}

// Bitwise float equality that also treats two NaNs as equal.
bool same_float(float a, float b) {
  return (std::isnan(a) && std::isnan(b)) ||
         fourbit::detail::float_bits(a) == fourbit::detail::float_bits(b);
}

// quantize_4bit matches the reference byte for byte (codes and absmax) across formats,
// dtypes, blocksizes and sizes: empty, odd, partial tail blocks and the parallel path.
TEST(Quantize4bit, MatchesReferenceBitExact) {
  const std::vector<float> data = fourbit_test::test_data(100003);
  for (QuantType qt : kQuantTypes) {
    for (DType dtype : kAllDTypes) {
      for (int64_t blocksize : {32, 64, 128, 4096}) {
        for (int64_t numel : {0, 1, 2, 3, 31, 33, 63, 64, 65, 1000, 4097, 100003}) {
          SCOPED_TRACE(testing::Message()
                       << fourbit::to_string(qt) << " " << fourbit::to_string(dtype)
                       << " blocksize=" << blocksize << " numel=" << numel);
          const std::vector<float> x(data.begin(), data.begin() + numel);
          const TypedBuffer in = TypedBuffer::from_floats(dtype, x);
          const Quantized got = run_quantize(in, numel, blocksize, qt);
          const Quantized want = reference_quantize(values_seen(in, numel), blocksize, qt);
          ASSERT_EQ(got.absmax.size(), want.absmax.size());
          for (size_t b = 0; b < want.absmax.size(); ++b) {
            ASSERT_TRUE(same_float(got.absmax[b], want.absmax[b]))
                << "absmax[" << b << "]: got " << got.absmax[b] << ", want " << want.absmax[b];
          }
          ASSERT_EQ(got.packed, want.packed);
        }
      }
    }
  }
}

// dequantize_4bit(quantize_4bit(x)) is exactly codebook[code] * absmax, computed in fp32 and
// rounded once to the output dtype.
TEST(Dequantize4bit, RoundTripIsCodebookTimesAbsmax) {
  const std::vector<float> data = fourbit_test::test_data(100003, 7);
  for (QuantType qt : kQuantTypes) {
    const auto& code = fourbit::codebook_4bit(qt);
    for (DType dtype : kAllDTypes) {
      for (int64_t blocksize : {32, 64, 4096}) {
        for (int64_t numel : {1, 3, 64, 65, 4097, 100003}) {
          SCOPED_TRACE(testing::Message()
                       << fourbit::to_string(qt) << " " << fourbit::to_string(dtype)
                       << " blocksize=" << blocksize << " numel=" << numel);
          const std::vector<float> x(data.begin(), data.begin() + numel);
          const Quantized q =
              run_quantize(TypedBuffer::from_floats(dtype, x), numel, blocksize, qt);
          const TypedBuffer out = run_dequantize(q, numel, blocksize, qt, dtype);
          for (int64_t i = 0; i < numel; ++i) {
            const float want = code[code_at(q.packed, i)] * q.absmax[i / blocksize];
            ASSERT_EQ(out.bits(i), fourbit_test::bits_as(dtype, want)) << "element " << i;
          }
        }
      }
    }
  }
}

// Dequantizing to a different dtype than the input rounds the same fp32 product once.
TEST(Dequantize4bit, OutputDtypeIndependentOfInputDtype) {
  const int64_t numel = 1001, blocksize = 64;
  const std::vector<float> x = fourbit_test::normal_data(numel);
  const Quantized q =
      run_quantize(TypedBuffer::from_floats(DType::Float32, x), numel, blocksize, QuantType::NF4);
  const auto& code = fourbit::codebook_4bit(QuantType::NF4);
  for (DType out_dtype : kAllDTypes) {
    const TypedBuffer out = run_dequantize(q, numel, blocksize, QuantType::NF4, out_dtype);
    for (int64_t i = 0; i < numel; ++i) {
      const float want = code[code_at(q.packed, i)] * q.absmax[i / blocksize];
      ASSERT_EQ(out.bits(i), fourbit_test::bits_as(out_dtype, want)) << "element " << i;
    }
  }
}

// Largest distance from a value in [-1, 1] to its nearest codebook entry: half the widest gap.
float half_widest_gap(QuantType qt) {
  const auto& q = fourbit::quantizer_4bit(qt);
  const auto& code = fourbit::codebook_4bit(qt);
  float gap = 0.0f;
  for (int k = 0; k < 15; ++k) {
    gap = std::max(gap, code[q.sorted_order[k + 1]] - code[q.sorted_order[k]]);
  }
  return gap / 2.0f;
}

// Round-trip error is bounded by the codebook's geometry: per element by absmax times half the
// widest codebook gap. On normal data NF4's relative RMS error is below 0.12 and below FP4's
// (NF4's levels are normal quantiles, so it is the better code for such data).
TEST(Dequantize4bit, RoundTripErrorIsBounded) {
  const int64_t numel = 100003, blocksize = 64;
  const std::vector<float> x = fourbit_test::normal_data(numel);
  double rel_rms[2] = {0.0, 0.0};
  for (QuantType qt : kQuantTypes) {
    SCOPED_TRACE(fourbit::to_string(qt));
    const Quantized q =
        run_quantize(TypedBuffer::from_floats(DType::Float32, x), numel, blocksize, qt);
    const TypedBuffer y = run_dequantize(q, numel, blocksize, qt, DType::Float32);
    const float bound = half_widest_gap(qt);
    double err2 = 0.0, ref2 = 0.0;
    for (int64_t i = 0; i < numel; ++i) {
      const float err = std::fabs(x[i] - y.value(i));
      ASSERT_LE(err, q.absmax[i / blocksize] * (bound + 1e-6f)) << "element " << i;
      err2 += double(err) * err;
      ref2 += double(x[i]) * x[i];
    }
    rel_rms[static_cast<int>(qt)] = std::sqrt(err2 / ref2);
  }
  const double nf4 = rel_rms[static_cast<int>(QuantType::NF4)];
  const double fp4 = rel_rms[static_cast<int>(QuantType::FP4)];
  EXPECT_LT(nf4, 0.12);
  EXPECT_LT(nf4, fp4);
  RecordProperty("rel_rms_nf4", std::to_string(nf4));
  RecordProperty("rel_rms_fp4", std::to_string(fp4));
}

// Nested scales: absmax double-quantized with quantize_blockwise (blocksize 256, signed
// dynamic map, offset = mean absmax) decode, in one pass, to exactly the two-step fp32 value
// code4[c] * (nested_code[q] * nested_absmax[b / 256] + offset).
TEST(Dequantize4bit, NestedScalesMatchTwoStepDecode) {
  const int64_t blocksize = 64;
  const int64_t numel = blocksize * 600 + 17;  // 601 blocks: three nested blocks, last partial
  const std::vector<float> x = fourbit_test::test_data(numel, 99);
  const auto nested_code = fourbit::create_dynamic_map(true);
  for (QuantType qt : kQuantTypes) {
    for (DType dtype : kAllDTypes) {
      SCOPED_TRACE(testing::Message()
                   << fourbit::to_string(qt) << " " << fourbit::to_string(dtype));
      const Quantized q = run_quantize(TypedBuffer::from_floats(dtype, x), numel, blocksize, qt);
      const int64_t blocks = static_cast<int64_t>(q.absmax.size());
      double sum = 0.0;
      for (float a : q.absmax) sum += a;
      const float offset = static_cast<float>(sum / blocks);
      std::vector<float> centred(q.absmax.size());
      for (size_t b = 0; b < centred.size(); ++b) centred[b] = q.absmax[b] - offset;

      std::vector<uint8_t> absmax_q(centred.size());
      std::vector<float> nested_absmax(static_cast<size_t>(fourbit::num_blocks(blocks, 256)));
      fourbit::QuantizeBlockwiseParams bw;
      bw.input = centred.data();
      bw.dtype = DType::Float32;
      bw.numel = blocks;
      bw.blocksize = 256;
      bw.code = nested_code.data();
      bw.out = absmax_q.data();
      bw.absmax = nested_absmax.data();
      fourbit::quantize_blockwise(bw);

      TypedBuffer out(dtype, numel);
      fourbit::Dequantize4bitParams p;
      p.packed = q.packed.data();
      p.scales.absmax_q = absmax_q.data();
      p.scales.nested_code = nested_code.data();
      p.scales.nested_absmax = nested_absmax.data();
      p.scales.offset = &offset;
      p.scales.nested_blocksize = 256;
      p.numel = numel;
      p.blocksize = blocksize;
      p.quant_type = qt;
      p.out = out.data();
      p.out_dtype = dtype;
      fourbit::dequantize_4bit(p);

      const auto& code4 = fourbit::codebook_4bit(qt);
      for (int64_t i = 0; i < numel; ++i) {
        const int64_t b = i / blocksize;
        const float scale =
            fourbit_test::mul_f32(nested_code[absmax_q[b]], nested_absmax[b / 256]) + offset;
        const float want = code4[code_at(q.packed, i)] * scale;
        ASSERT_EQ(out.bits(i), fourbit_test::bits_as(dtype, want)) << "element " << i;
      }
    }
  }
}

// All-zero blocks: full blocks store absmax 0, a partial tail block stores the clamp 1e-38
// (a last block that is full stores 0); every element takes the code of 0 and decodes to 0.
TEST(Quantize4bit, AllZeroBlocks) {
  const int64_t blocksize = 64;
  for (int64_t numel : {2 * blocksize + 11, 2 * blocksize}) {
    const std::vector<float> x(numel, 0.0f);
    const std::vector<float> want_absmax =
        numel % blocksize ? std::vector<float>{0.0f, 0.0f, 1e-38f} : std::vector<float>{0.0f, 0.0f};
    for (QuantType qt : kQuantTypes) {
      SCOPED_TRACE(testing::Message() << fourbit::to_string(qt) << " numel=" << numel);
      const Quantized q =
          run_quantize(TypedBuffer::from_floats(DType::Float32, x), numel, blocksize, qt);
      EXPECT_EQ(q.absmax, want_absmax);
      const int zero_code = reference_code(0.0f, qt);
      EXPECT_EQ(fourbit::codebook_4bit(qt)[zero_code], 0.0f);
      // Includes the padding nibble when numel is odd.
      for (int64_t i = 0; i < 2 * static_cast<int64_t>(q.packed.size()); ++i) {
        EXPECT_EQ(code_at(q.packed, i), zero_code) << i;
      }
      const TypedBuffer y = run_dequantize(q, numel, blocksize, qt, DType::Float32);
      for (int64_t i = 0; i < numel; ++i) EXPECT_EQ(y.value(i), 0.0f) << "element " << i;
    }
  }
}

// One huge outlier sets its block's absmax and decodes exactly; the rest of that block
// decodes to zero, and the neighbouring block keeps its own scale.
TEST(Quantize4bit, OutlierDominatesOnlyItsBlock) {
  const int64_t blocksize = 64, numel = 2 * blocksize;
  std::vector<float> x = fourbit_test::normal_data(numel);
  for (float& v : x) v *= 0.01f;
  x[5] = 1e30f;
  float second_max = 0.0f;
  for (int64_t i = blocksize; i < numel; ++i) second_max = std::max(second_max, std::fabs(x[i]));
  for (QuantType qt : kQuantTypes) {
    SCOPED_TRACE(fourbit::to_string(qt));
    const Quantized q =
        run_quantize(TypedBuffer::from_floats(DType::Float32, x), numel, blocksize, qt);
    EXPECT_EQ(q.absmax[0], 1e30f);
    EXPECT_EQ(q.absmax[1], second_max);
    const TypedBuffer y = run_dequantize(q, numel, blocksize, qt, DType::Float32);
    EXPECT_EQ(y.value(5), 1e30f);
    for (int64_t i = 0; i < blocksize; ++i) {
      if (i != 5) {
        EXPECT_EQ(y.value(i), 0.0f) << "element " << i;
      }
    }
    EXPECT_EQ(q.packed, reference_quantize(x, blocksize, qt).packed);
  }
}

// Full blocks scale by x * (1 / absmax), the partial tail block by x / absmax. The two differ
// by an ulp now and then; this finds inputs where that ulp crosses a midpoint (so the two
// rules give different codes) and checks each block kind uses its own rule.
TEST(Quantize4bit, FullBlocksMultiplyTailBlockDivides) {
  for (QuantType qt : kQuantTypes) {
    SCOPED_TRACE(fourbit::to_string(qt));
    const auto& qz = fourbit::quantizer_4bit(qt);
    // Block layout: absmax a first, then the discriminating inputs, padded with zeros.
    const int64_t blocksize = 64;
    std::vector<float> block;
    std::vector<int> want_full, want_tail;
    for (float a : {3.0f, 7.0f, 10.0f, 0.3f, 1.1f, 5.5f, 9.7f, 13.0f}) {
      for (float m : qz.midpoints) {
        float x = m * a;
        for (int step = 0; step < 8; ++step, x = std::nextafter(x, 2.0f * a)) {
          const uint8_t by_mul = reference_code(x * (1.0f / a), qt);
          const uint8_t by_div = reference_code(x / a, qt);
          if (by_mul == by_div || static_cast<int64_t>(block.size()) + 2 > blocksize) continue;
          block.push_back(a);
          block.push_back(x);
          want_full.push_back(by_mul);
          want_tail.push_back(by_div);
        }
      }
      if (!block.empty()) break;  // one absmax per block
    }
    ASSERT_FALSE(want_full.empty()) << "found no input where the two scalings disagree";
    std::vector<float> x = block;
    x.resize(blocksize, 0.0f);
    x.insert(x.end(), block.begin(), block.end());  // the same values as a partial tail block
    const int64_t numel = static_cast<int64_t>(x.size());
    const Quantized q =
        run_quantize(TypedBuffer::from_floats(DType::Float32, x), numel, blocksize, qt);
    for (size_t j = 0; j < want_full.size(); ++j) {
      EXPECT_EQ(code_at(q.packed, 2 * j + 1), want_full[j])
          << "full block, x = " << block[2 * j + 1];
      EXPECT_EQ(code_at(q.packed, blocksize + 2 * j + 1), want_tail[j])
          << "tail block, x = " << block[2 * j + 1];
    }
  }
}

// A scaled value exactly on a midpoint takes the LOWER of the two codes; one ulp above takes
// the upper one. A +-1.0 in the block makes absmax exactly 1, so the scaled value is x itself;
// checked in a full block (x * (1 / 1)) and in a partial tail block (x / 1).
TEST(Quantize4bit, MidpointTiesTakeLowerCode) {
  for (QuantType qt : kQuantTypes) {
    SCOPED_TRACE(fourbit::to_string(qt));
    const auto& qz = fourbit::quantizer_4bit(qt);
    for (bool above : {false, true}) {
      // Each block: 1.0, the 15 midpoints (or their next float up), -1.0.
      std::vector<float> block = {1.0f};
      for (float m : qz.midpoints) block.push_back(above ? std::nextafter(m, 2.0f) : m);
      block.push_back(-1.0f);
      const int64_t blocksize = 32;
      std::vector<float> x = block;
      x.resize(blocksize, 0.0f);
      x.insert(x.end(), block.begin(), block.end());  // the tail block: 17 elements
      const int64_t numel = static_cast<int64_t>(x.size());
      const Quantized q =
          run_quantize(TypedBuffer::from_floats(DType::Float32, x), numel, blocksize, qt);
      ASSERT_EQ(q.absmax, (std::vector<float>{1.0f, 1.0f}));
      for (int64_t start : {int64_t{0}, blocksize}) {
        EXPECT_EQ(code_at(q.packed, start), qz.sorted_order[15]);
        for (int k = 0; k < 15; ++k) {
          EXPECT_EQ(code_at(q.packed, start + 1 + k), qz.sorted_order[above ? k + 1 : k])
              << "midpoint " << k << (above ? " + 1ulp" : "") << " in block at " << start;
        }
        EXPECT_EQ(code_at(q.packed, start + 16), qz.sorted_order[0]);
      }
    }
  }
}

// NaN in a block makes that block's absmax NaN and every code in it the top sorted code
// (sorted_order[15], as torch.bucketize puts NaN last); it decodes to NaN. Other blocks are
// unaffected, and the padding nibble of an odd tail is still the code of 0.
TEST(Quantize4bit, NanPoisonsOnlyItsBlock) {
  const int64_t blocksize = 64, numel = 2 * blocksize + 5;
  std::vector<float> x = fourbit_test::normal_data(numel);
  x[70] = std::numeric_limits<float>::quiet_NaN();         // full block 1
  x[numel - 2] = std::numeric_limits<float>::quiet_NaN();  // tail block 2
  for (QuantType qt : kQuantTypes) {
    const int nan_code = fourbit::quantizer_4bit(qt).sorted_order[15];
    for (DType dtype : kAllDTypes) {
      SCOPED_TRACE(testing::Message()
                   << fourbit::to_string(qt) << " " << fourbit::to_string(dtype));
      const TypedBuffer in = TypedBuffer::from_floats(dtype, x);
      const Quantized q = run_quantize(in, numel, blocksize, qt);
      EXPECT_FALSE(std::isnan(q.absmax[0]));
      EXPECT_TRUE(std::isnan(q.absmax[1]));
      EXPECT_TRUE(std::isnan(q.absmax[2]));
      for (int64_t i = blocksize; i < numel; ++i) EXPECT_EQ(code_at(q.packed, i), nan_code) << i;
      EXPECT_EQ(code_at(q.packed, numel), reference_code(0.0f, qt)) << "padding nibble";
      EXPECT_EQ(q.packed, reference_quantize(values_seen(in, numel), blocksize, qt).packed);
      const TypedBuffer y = run_dequantize(q, numel, blocksize, qt, dtype);
      for (int64_t i = blocksize; i < numel; ++i) EXPECT_TRUE(std::isnan(y.value(i))) << i;
      for (int64_t i = 0; i < blocksize; ++i) EXPECT_FALSE(std::isnan(y.value(i))) << i;
    }
  }
}

// Inf is not representable: a block holding +-Inf gets absmax Inf, the finite values scale
// to 0 (and decode to 0 * Inf = NaN), and +-Inf itself scales to Inf * (1/Inf) = NaN, so
// takes the NaN code sorted_order[15] (the +1.0 entry) and decodes to +Inf, losing the sign.
TEST(Quantize4bit, InfPoisonsItsBlock) {
  const int64_t blocksize = 32, numel = 3 * blocksize + 8;
  std::vector<float> x = fourbit_test::normal_data(numel);
  const float inf = std::numeric_limits<float>::infinity();
  x[3] = inf;                   // full block 0
  x[blocksize + 4] = -inf;      // full block 1
  x[3 * blocksize + 1] = -inf;  // tail block 3
  for (QuantType qt : kQuantTypes) {
    SCOPED_TRACE(fourbit::to_string(qt));
    const auto& qz = fourbit::quantizer_4bit(qt);
    const Quantized q =
        run_quantize(TypedBuffer::from_floats(DType::Float32, x), numel, blocksize, qt);
    EXPECT_EQ(q.absmax[0], inf);
    EXPECT_EQ(q.absmax[1], inf);
    EXPECT_EQ(q.absmax[3], inf);
    EXPECT_EQ(q.packed, reference_quantize(x, blocksize, qt).packed);
    for (int64_t i : {int64_t{3}, blocksize + 4, 3 * blocksize + 1}) {
      EXPECT_EQ(code_at(q.packed, i), qz.sorted_order[15]) << i;
    }
    const TypedBuffer y = run_dequantize(q, numel, blocksize, qt, DType::Float32);
    for (int64_t i = 0; i < numel; ++i) {
      const int64_t b = i / blocksize;
      if (i == 3 || i == blocksize + 4 || i == 3 * blocksize + 1) {
        EXPECT_EQ(y.value(i), inf) << i;
      } else if (b != 2) {
        EXPECT_TRUE(std::isnan(y.value(i))) << i;
      } else {
        EXPECT_TRUE(std::isfinite(y.value(i))) << i;
      }
    }
  }
}

// Sizes are int64: block counts past 2^31 are computed without overflow, and validation
// accepts a 3e9-element tensor (the kernel is not run: that would need ~12 GB).
TEST(Quantize4bit, Int64Sizes) {
  const int64_t big = 3'000'000'000;
  EXPECT_EQ(fourbit::num_blocks(big, 64), 46'875'000);
  EXPECT_EQ(fourbit::num_blocks(big + 1, 64), 46'875'001);
  EXPECT_EQ(fourbit::num_blocks(int64_t{1} << 40, 32), int64_t{1} << 35);
  EXPECT_EQ(fourbit::num_blocks((int64_t{1} << 40) + 1, 4096), (int64_t{1} << 28) + 1);

  using fourbit_test::far_pointer;
  fourbit::Quantize4bitParams q;
  q.input = far_pointer<float>(1);
  q.numel = big;
  q.packed = far_pointer<uint8_t>(2);
  q.absmax = far_pointer<float>(3);
  EXPECT_NO_THROW(fourbit::validate(q));
  fourbit::Dequantize4bitParams d;
  d.packed = far_pointer<uint8_t>(1);
  d.scales.absmax = far_pointer<float>(2);
  d.numel = big;
  d.out = far_pointer<float>(3);
  EXPECT_NO_THROW(fourbit::validate(d));
}

fourbit::Quantize4bitParams valid_quantize_params(const std::vector<float>& in,
                                                  std::vector<uint8_t>& packed,
                                                  std::vector<float>& absmax) {
  fourbit::Quantize4bitParams p;
  p.input = in.data();
  p.numel = static_cast<int64_t>(in.size());
  p.blocksize = 64;
  p.packed = packed.data();
  p.absmax = absmax.data();
  return p;
}

// Bad arguments throw InvalidArgument naming the argument and its value, before any work.
TEST(Quantize4bit, RejectsBadArguments) {
  const std::vector<float> in(128, 1.0f);
  std::vector<uint8_t> packed(64);
  std::vector<float> absmax(4);
  const auto base = valid_quantize_params(in, packed, absmax);
  EXPECT_NO_THROW(fourbit::quantize_4bit(base));
  for (int64_t bs : {48, 16, 8192}) {
    auto p = base;
    p.blocksize = bs;
    EXPECT_TRUE(
        throws_invalid([&] { fourbit::quantize_4bit(p); }, {"blocksize", std::to_string(bs)}));
  }
  auto p = base;
  p.numel = -1;
  EXPECT_TRUE(throws_invalid([&] { fourbit::quantize_4bit(p); }, {"numel", "-1"}));
  p = base;
  p.input = nullptr;
  EXPECT_TRUE(throws_invalid([&] { fourbit::quantize_4bit(p); }, {"input", "128"}));
  p = base;
  p.absmax = nullptr;
  EXPECT_TRUE(throws_invalid([&] { fourbit::quantize_4bit(p); }, {"absmax", "128"}));
  p = base;
  p.dtype = static_cast<DType>(7);
  EXPECT_TRUE(throws_invalid([&] { fourbit::quantize_4bit(p); }, {"dtype", "7"}));
  p = base;
  p.quant_type = static_cast<QuantType>(5);
  EXPECT_TRUE(throws_invalid([&] { fourbit::quantize_4bit(p); }, {"quant_type", "5"}));
  // numel 0 needs no buffers at all.
  EXPECT_NO_THROW(fourbit::quantize_4bit(fourbit::Quantize4bitParams{}));
}

// dequantize_4bit checks its arguments the same way, including the scales.
TEST(Dequantize4bit, RejectsBadArguments) {
  std::vector<uint8_t> packed(64);
  std::vector<float> absmax(2, 1.0f), out(128);
  fourbit::Dequantize4bitParams base;
  base.packed = packed.data();
  base.scales.absmax = absmax.data();
  base.numel = 128;
  base.out = out.data();
  EXPECT_NO_THROW(fourbit::dequantize_4bit(base));
  for (int64_t bs : {48, 16, 8192}) {
    auto p = base;
    p.blocksize = bs;
    EXPECT_TRUE(
        throws_invalid([&] { fourbit::dequantize_4bit(p); }, {"blocksize", std::to_string(bs)}));
  }
  auto p = base;
  p.numel = -1;
  EXPECT_TRUE(throws_invalid([&] { fourbit::dequantize_4bit(p); }, {"numel", "-1"}));
  p = base;
  p.packed = nullptr;
  EXPECT_TRUE(throws_invalid([&] { fourbit::dequantize_4bit(p); }, {"packed", "128"}));
  p = base;
  p.scales.absmax = nullptr;
  EXPECT_TRUE(throws_invalid([&] { fourbit::dequantize_4bit(p); }, {"absmax", "128"}));
  p = base;
  p.out_dtype = static_cast<DType>(7);
  EXPECT_TRUE(throws_invalid([&] { fourbit::dequantize_4bit(p); }, {"out_dtype", "7"}));
  // Nested scales: both forms at once, or missing nested pieces, are rejected.
  const uint8_t absmax_q[2] = {0, 0};
  p = base;
  p.scales.absmax_q = absmax_q;
  EXPECT_TRUE(throws_invalid([&] { fourbit::dequantize_4bit(p); }, {"absmax_q", "not both"}));
  p.scales.absmax = nullptr;
  EXPECT_TRUE(throws_invalid([&] { fourbit::dequantize_4bit(p); }, {"nested_code", "128"}));
}

// The fp16 / bf16 conversions of src/float16.h feed every 16-bit kernel path and the test
// inputs above, so pin them to known bit patterns: round to nearest even, overflow to Inf,
// fp16 subnormals, NaN.
TEST(Float16Conversions, KnownBitPatterns) {
  using fourbit::detail::bits_float;
  using fourbit::detail::float_to_bf16;
  using fourbit::detail::float_to_half;
  using fourbit::detail::half_to_float;
  EXPECT_EQ(float_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(float_to_bf16(bits_float(0x3f808000u)), 0x3f80);  // tie, to even (down)
  EXPECT_EQ(float_to_bf16(bits_float(0x3f818000u)), 0x3f82);  // tie, to even (up)
  EXPECT_EQ(float_to_bf16(bits_float(0x3f808001u)), 0x3f81);  // above the tie
  EXPECT_EQ(float_to_bf16(-2.0f), 0xc000);
  EXPECT_EQ(float_to_bf16(std::numeric_limits<float>::quiet_NaN()), 0x7fc0);
  EXPECT_EQ(float_to_half(1.0f), 0x3c00);
  EXPECT_EQ(float_to_half(-2.0f), 0xc000);
  EXPECT_EQ(float_to_half(65504.0f), 0x7bff);             // largest finite half
  EXPECT_EQ(float_to_half(65520.0f), 0x7c00);             // rounds up to Inf
  EXPECT_EQ(float_to_half(1.0f + 0x1p-11f), 0x3c00);      // tie, to even (down)
  EXPECT_EQ(float_to_half(1.0f + 3 * 0x1p-11f), 0x3c02);  // tie, to even (up)
  EXPECT_EQ(float_to_half(0x1p-24f), 0x0001);             // smallest subnormal
  EXPECT_EQ(float_to_half(0x1p-25f), 0x0000);             // tie, to even (zero)
  EXPECT_EQ(float_to_half(3 * 0x1p-25f), 0x0002);         // tie, to even (up)
  EXPECT_EQ(float_to_half(0x1p-14f), 0x0400);             // smallest normal
  EXPECT_EQ(float_to_half(std::numeric_limits<float>::quiet_NaN()) & 0x7e00, 0x7e00);
  EXPECT_EQ(half_to_float(0x0001), 0x1p-24f);
  EXPECT_EQ(half_to_float(0x7bff), 65504.0f);
  EXPECT_EQ(half_to_float(0xfc00), -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(half_to_float(0x7e00)));
  // Every finite half survives half -> float -> half.
  for (uint32_t h = 0; h < 0x10000; ++h) {
    if ((h & 0x7c00) == 0x7c00) continue;
    ASSERT_EQ(float_to_half(half_to_float(static_cast<uint16_t>(h))), h) << std::hex << h;
  }
}

// In a CPU-only build the CUDA entry points fail loudly with a Runtime error.
TEST(Quantize4bit, CudaEntryPointsThrowWithoutCuda) {
  if (fourbit::built_with_cuda()) GTEST_SKIP() << "libfourbit was built with CUDA";
  const auto runtime = fourbit::Error::Kind::Runtime;
  EXPECT_TRUE(fourbit_test::throws_error(
      [] { fourbit::quantize_4bit_cuda(fourbit::Quantize4bitParams{}, nullptr); }, runtime,
      {"quantize_4bit_cuda", "without CUDA"}));
  EXPECT_TRUE(fourbit_test::throws_error(
      [] { fourbit::dequantize_4bit_cuda(fourbit::Dequantize4bitParams{}, nullptr); }, runtime,
      {"dequantize_4bit_cuda", "without CUDA"}));
}

}  // namespace
