// A 4-bit weight quantized by the core for the GoogleTest suites of the 4-bit products,
// with its fp32 dequantized values as the reference. Test-only header.
#pragma once

#include <cstdint>
#include <vector>

#include "fourbit/codebook.h"
#include "fourbit/gemm.h"
#include "fourbit/quantize.h"
#include "test_helpers.h"

namespace fourbit_test {

using fourbit::QuantType;

// A quantized weight with its scales, owning every buffer.
struct QuantizedWeight {
  int64_t N, K, blocksize;
  QuantType quant_type;
  bool nested;
  std::vector<uint8_t> packed;
  std::vector<float> absmax;
  std::vector<uint8_t> absmax_q;
  std::vector<float> nested_absmax;
  std::vector<float> nested_code;
  float offset = 0.0f;
  std::vector<float> dequantized;  // fp32, [N * K]

  QuantizedWeight(int64_t n, int64_t k, int64_t bs, QuantType q, bool nest, uint32_t seed)
      : N(n), K(k), blocksize(bs), quant_type(q), nested(nest) {
    const int64_t numel = N * K;
    const auto values = fourbit_test::normal_data(numel, seed);
    packed.resize(static_cast<size_t>((numel + 1) / 2));
    absmax.resize(static_cast<size_t>(fourbit::num_blocks(numel, bs)));
    fourbit::Quantize4bitParams qp;
    qp.input = values.data();
    qp.numel = numel;
    qp.blocksize = bs;
    qp.quant_type = q;
    qp.packed = packed.data();
    qp.absmax = absmax.data();
    fourbit::quantize_4bit(qp);
    if (nested) {
      // Double quantization as bitsandbytes does it: mean offset, 8-bit blocks of 256.
      double sum = 0;
      for (float a : absmax) sum += a;
      offset = static_cast<float>(sum / static_cast<double>(absmax.size()));
      std::vector<float> centred(absmax.size());
      for (size_t i = 0; i < absmax.size(); ++i) centred[i] = absmax[i] - offset;
      const auto code = fourbit::create_dynamic_map(true);
      nested_code.assign(code.begin(), code.end());
      absmax_q.resize(absmax.size());
      nested_absmax.resize(static_cast<size_t>(fourbit::num_blocks(absmax.size(), 256)));
      fourbit::QuantizeBlockwiseParams bp;
      bp.input = centred.data();
      bp.numel = static_cast<int64_t>(centred.size());
      bp.blocksize = 256;
      bp.code = nested_code.data();
      bp.out = absmax_q.data();
      bp.absmax = nested_absmax.data();
      fourbit::quantize_blockwise(bp);
    }
    dequantized.resize(static_cast<size_t>(numel));
    fourbit::Dequantize4bitParams dp;
    dp.packed = packed.data();
    dp.scales = scales();
    dp.numel = numel;
    dp.blocksize = bs;
    dp.quant_type = q;
    dp.out = dequantized.data();
    fourbit::dequantize_4bit(dp);
  }

  fourbit::BlockScales scales() const {
    fourbit::BlockScales s;
    if (nested) {
      s.absmax_q = absmax_q.data();
      s.nested_absmax = nested_absmax.data();
      s.nested_code = nested_code.data();
      s.offset = &offset;
      s.nested_blocksize = 256;
    } else {
      s.absmax = absmax.data();
    }
    return s;
  }

  fourbit::Weight4bit view() const {
    fourbit::Weight4bit w;
    w.packed = packed.data();
    w.scales = scales();
    w.blocksize = blocksize;
    w.quant_type = quant_type;
    w.N = N;
    w.K = K;
    return w;
  }
};

}  // namespace fourbit_test
