// Codebook tables and the dynamic-map generator (see include/fourbit/codebook.h).
#include "fourbit/codebook.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "fourbit/error.h"

namespace fourbit {
namespace {

std::array<float, kCodebook4bitSize> make_nf4() {
  // Quantiles of N(0, 1) normalised to [-1, 1] (QLoRA, Dettmers et al. 2023), as fp64
  // literals rounded once to fp32, exactly as torch.tensor(list_of_floats) does.
  static constexpr double kValues[kCodebook4bitSize] = {
      -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
      -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
      0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
      0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0};
  std::array<float, kCodebook4bitSize> out{};
  for (int i = 0; i < kCodebook4bitSize; ++i) out[i] = static_cast<float>(kValues[i]);
  return out;
}

std::array<float, kCodebook4bitSize> make_fp4() {
  // 1 sign bit, 2 exponent bits, 1 mantissa bit, listed by bit pattern, then divided by
  // the largest magnitude (12) in fp32. Code 8 (sign bit, zero magnitude) is +0.0, the
  // bytes bitsandbytes stores in quant_map, not -0.0.
  static constexpr float kValues[kCodebook4bitSize] = {
      0.0f,  0.0625f,  8.0f,  12.0f,  4.0f,  6.0f,  2.0f,  3.0f,
      0.0f,  -0.0625f, -8.0f, -12.0f, -4.0f, -6.0f, -2.0f, -3.0f};
  std::array<float, kCodebook4bitSize> out{};
  for (int i = 0; i < kCodebook4bitSize; ++i) out[i] = kValues[i] / 12.0f;
  return out;
}

Quantizer4bit make_quantizer(const std::array<float, kCodebook4bitSize>& code) {
  Quantizer4bit q{};
  std::array<int, kCodebook4bitSize> order{};
  std::iota(order.begin(), order.end(), 0);
  // Stable sort: FP4's two zeros (codes 0 and 8) keep code order, as torch.argsort does.
  std::stable_sort(order.begin(), order.end(),
                   [&](int a, int b) { return code[a] < code[b]; });
  for (int k = 0; k < kCodebook4bitSize; ++k) q.sorted_order[k] = static_cast<uint8_t>(order[k]);
  for (int k = 0; k + 1 < kCodebook4bitSize; ++k) {
    q.midpoints[k] = (code[order[k]] + code[order[k + 1]]) / 2.0f;
  }
  return q;
}

// torch.linspace(start, end, steps, dtype=float32) as x86 builds of torch compute it: the
// first half counts up from `start`, the second half down from `end`, with
// step = (end - start) / (steps - 1), each element one fused multiply-add (torch's
// AVX2/AVX-512 kernels are compiled with FMA contraction).
std::vector<float> linspace_like_torch(float start, float end, int steps) {
  std::vector<float> out(static_cast<size_t>(steps));
  if (steps == 1) {
    out[0] = start;
    return out;
  }
  const float step = (end - start) / static_cast<float>(steps - 1);
  const int halfway = steps / 2;
  for (int i = 0; i < steps; ++i) {
    out[i] = i < halfway ? std::fma(step, static_cast<float>(i), start)
                         : std::fma(-step, static_cast<float>(steps - i - 1), end);
  }
  return out;
}

}  // namespace

const std::array<float, kCodebook4bitSize>& codebook_4bit(QuantType quant_type) {
  static const auto nf4 = make_nf4();
  static const auto fp4 = make_fp4();
  return quant_type == QuantType::NF4 ? nf4 : fp4;
}

const Quantizer4bit& quantizer_4bit(QuantType quant_type) {
  static const Quantizer4bit nf4 = make_quantizer(codebook_4bit(QuantType::NF4));
  static const Quantizer4bit fp4 = make_quantizer(codebook_4bit(QuantType::FP4));
  return quant_type == QuantType::NF4 ? nf4 : fp4;
}

std::array<float, kDynamicMapSize> create_dynamic_map(bool is_signed, int max_exponent_bits,
                                                      int total_bits) {
  FOURBIT_CHECK_ARG(total_bits >= 2 && total_bits <= 8,
                    "create_dynamic_map: total_bits must be in [2, 8], got ", total_bits);
  FOURBIT_CHECK_ARG(max_exponent_bits >= 1 && max_exponent_bits <= total_bits - 1,
                    "create_dynamic_map: max_exponent_bits must be in [1, total_bits - 1 = ",
                    total_bits - 1, "], got ", max_exponent_bits);
  // Every value is an fp32 product mean * float(10^e), as bitsandbytes' torch code computes
  // it (a float32 tensor times a Python float), then held exactly in fp64 for sorting.
  std::vector<double> data;
  const int non_sign_bits = total_bits - 1;
  const int additional_items = (1 << (non_sign_bits - max_exponent_bits)) - 1;
  auto append_means = [&](int fraction_items, int exponent) {
    const float scale = static_cast<float>(std::pow(10.0, exponent));
    const std::vector<float> b = linspace_like_torch(0.1f, 1.0f, fraction_items);
    for (size_t k = 0; k + 1 < b.size(); ++k) {
      const float mean = (b[k] + b[k + 1]) / 2.0f;
      data.push_back(static_cast<double>(mean * scale));
      if (is_signed) data.push_back(static_cast<double>(mean * -scale));
    }
  };
  int i = 0;
  for (; i < max_exponent_bits; ++i) {
    const int fraction_items = is_signed ? (1 << (i + non_sign_bits - max_exponent_bits)) + 1
                                         : (1 << (i + non_sign_bits - max_exponent_bits + 1)) + 1;
    append_means(fraction_items, -(max_exponent_bits - 1) + i);
  }
  if (additional_items > 0) {
    // bitsandbytes reuses the last loop exponent here.
    append_means(additional_items + 1, -(max_exponent_bits - 1) + (i - 1));
  }
  data.push_back(0.0);
  data.push_back(1.0);
  FOURBIT_CHECK_ARG(data.size() == (size_t{1} << total_bits),
                    "create_dynamic_map: (signed=", (is_signed ? "True" : "False"), ", max_exponent_bits=",
                    max_exponent_bits, ", total_bits=", total_bits, ") gives ", data.size(),
                    " values instead of 2^total_bits = ", (1 << total_bits),
                    "; choose max_exponent_bits to fit total_bits");
  data.resize(kDynamicMapSize, 0.0);
  std::sort(data.begin(), data.end());
  std::array<float, kDynamicMapSize> out{};
  for (int k = 0; k < kDynamicMapSize; ++k) out[k] = static_cast<float>(data[k]);
  return out;
}

bool is_valid_blocksize(int64_t blocksize) {
  return blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0;
}

QuantType parse_quant_type(const std::string& name, const char* arg_name) {
  if (name == "nf4") return QuantType::NF4;
  if (name == "fp4") return QuantType::FP4;
  throw Error(Error::Kind::InvalidArgument,
              detail::concat(arg_name, " must be 'nf4' or 'fp4', got '", name, "'"));
}

}  // namespace fourbit
