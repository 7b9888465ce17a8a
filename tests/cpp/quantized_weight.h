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

// One-hot activations pick out single weights: row m of x is 1 at column (13 m) % K and row m
// of dy is 1 at column (7 m) % N, so gemm_4bit and gemm_4bit_grad_input must return decoded
// weights rounded to `dtype`, bit for bit (any indexing mix-up is a wrong value, not noise).
inline void expect_one_hot_products_exact(const QuantizedWeight& w, fourbit::DType dtype, int64_t M) {
  const int64_t N = w.N, K = w.K;
  std::vector<float> x(M * K, 0.0f), dy(M * N, 0.0f);
  for (int64_t m = 0; m < M; ++m) {
    x[m * K + (m * 13) % K] = 1.0f;
    dy[m * N + (m * 7) % N] = 1.0f;
  }
  const TypedBuffer xb = TypedBuffer::from_floats(dtype, x);
  const TypedBuffer dyb = TypedBuffer::from_floats(dtype, dy);
  TypedBuffer y(dtype, M * N), dx(dtype, M * K);
  fourbit::Gemm4bitParams p;
  p.weight = w.view();
  p.x = xb.data();
  p.y = y.data();
  p.M = M;
  p.dtype = dtype;
  fourbit::gemm_4bit(p);
  fourbit::Gemm4bitGradInputParams g;
  g.weight = w.view();
  g.grad_output = dyb.data();
  g.grad_input = dx.data();
  g.M = M;
  g.dtype = dtype;
  fourbit::gemm_4bit_grad_input(g);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      const float want = round_to(dtype, w.dequantized[n * K + (m * 13) % K]);
      ASSERT_EQ(y.value(m * N + n), want) << "m=" << m << " n=" << n;
    }
    for (int64_t k = 0; k < K; ++k) {
      const float want = round_to(dtype, w.dequantized[((m * 7) % N) * K + k]);
      ASSERT_EQ(dx.value(m * K + k), want) << "m=" << m << " k=" << k;
    }
  }
}

}  // namespace fourbit_test
