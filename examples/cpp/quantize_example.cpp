// Quantizes a weight matrix to NF4 with double-quantized scales, dequantizes it back, and
// multiplies activations with it straight from the 4-bit bytes, using only the C++ API of
// an installed fourbit (find_package(fourbit)).
#include <fourbit/codebook.h>
#include <fourbit/error.h>
#include <fourbit/gemm.h>
#include <fourbit/quantize.h>

#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

int main() {
  const int64_t rows = 256, cols = 1000, numel = rows * cols, blocksize = 64;
  std::vector<float> weight(numel);
  std::mt19937 rng(0);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  for (float& w : weight) w = normal(rng);

  // 1. 4-bit codes + one fp32 absmax per block of 64.
  const int64_t blocks = fourbit::num_blocks(numel, blocksize);
  std::vector<uint8_t> packed((numel + 1) / 2);
  std::vector<float> absmax(blocks);
  fourbit::Quantize4bitParams q;
  q.input = weight.data();
  q.dtype = fourbit::DType::Float32;
  q.numel = numel;
  q.blocksize = blocksize;
  q.quant_type = fourbit::QuantType::NF4;
  q.packed = packed.data();
  q.absmax = absmax.data();
  fourbit::quantize_4bit(q);

  // 2. Double quantization: absmax - mean, as 8-bit codes in blocks of 256.
  const float offset = static_cast<float>(
      std::accumulate(absmax.begin(), absmax.end(), 0.0) / static_cast<double>(blocks));
  std::vector<float> centered(blocks);
  for (int64_t b = 0; b < blocks; ++b) centered[b] = absmax[b] - offset;
  const auto dynamic_map = fourbit::create_dynamic_map();
  const int64_t nested_blocksize = 256;
  std::vector<uint8_t> absmax_q(blocks);
  std::vector<float> nested_absmax(fourbit::num_blocks(blocks, nested_blocksize));
  fourbit::QuantizeBlockwiseParams nq;
  nq.input = centered.data();
  nq.numel = blocks;
  nq.blocksize = nested_blocksize;
  nq.code = dynamic_map.data();
  nq.out = absmax_q.data();
  nq.absmax = nested_absmax.data();
  fourbit::quantize_blockwise(nq);

  // 3. Dequantize in one pass, decoding the nested scales on the fly.
  std::vector<float> restored(numel);
  fourbit::Dequantize4bitParams d;
  d.packed = packed.data();
  d.scales.absmax_q = absmax_q.data();
  d.scales.nested_code = dynamic_map.data();
  d.scales.nested_absmax = nested_absmax.data();
  d.scales.offset = &offset;
  d.scales.nested_blocksize = nested_blocksize;
  d.numel = numel;
  d.blocksize = blocksize;
  d.quant_type = fourbit::QuantType::NF4;
  d.out = restored.data();
  d.out_dtype = fourbit::DType::Float32;
  fourbit::dequantize_4bit(d);

  double err2 = 0, ref2 = 0;
  for (int64_t i = 0; i < numel; ++i) {
    err2 += double(restored[i] - weight[i]) * (restored[i] - weight[i]);
    ref2 += double(weight[i]) * weight[i];
  }
  const double rel = std::sqrt(err2 / ref2);
  const double bytes_4bit = packed.size() + absmax_q.size() + 4.0 * nested_absmax.size() + 4;
  std::printf("NF4 %lldx%lld: relative error %.4f, %.2f bits per weight\n", (long long)rows,
              (long long)cols, rel, 8.0 * bytes_4bit / numel);

  // 4. Y = X @ W^T from the packed weight (never dequantized in full), against the
  //    product with the dequantized weight.
  const int64_t M = 3;
  std::vector<float> x(M * cols), y(M * rows);
  for (float& v : x) v = normal(rng) * 50.0f;
  fourbit::Gemm4bitParams g;
  g.weight.packed = packed.data();
  g.weight.scales = d.scales;
  g.weight.blocksize = blocksize;
  g.weight.quant_type = fourbit::QuantType::NF4;
  g.weight.N = rows;
  g.weight.K = cols;
  g.x = x.data();
  g.y = y.data();
  g.M = M;
  g.dtype = fourbit::DType::Float32;
  fourbit::gemm_4bit(g);
  double max_diff = 0;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < rows; ++n) {
      double ref = 0;
      for (int64_t k = 0; k < cols; ++k) ref += double(x[m * cols + k]) * restored[n * cols + k];
      max_diff = std::fmax(max_diff, std::fabs(ref - y[m * rows + n]));
    }
  }
  std::printf("gemm_4bit %lldx%lld @ %lldx%lld^T: max |diff| vs dequantized product %.2e\n",
              (long long)M, (long long)cols, (long long)rows, (long long)cols, max_diff);

  // 5. Bad arguments are exceptions that name the argument and the value.
  try {
    q.blocksize = 48;
    fourbit::quantize_4bit(q);
    std::printf("error: blocksize 48 was accepted\n");
    return 1;
  } catch (const fourbit::Error& e) {
    std::printf("rejected as expected: %s\n", e.what());
  }
  return rel < 0.12 && max_diff < 1e-3 ? 0 : 1;
}
