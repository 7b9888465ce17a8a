// CPU 8-bit blockwise quantize / dequantize with a 256-entry sorted code (the dynamic map).
//
// Used for double quantization of 4-bit absmax (blocksize 256) and, later, for 8-bit
// optimizer states. Rule (docs/format.md): absmax = max |x| ignoring NaN; each x / absmax
// maps to the nearest code value, ties to the lower index; NaN (and the 0/0 of an
// all-zero block) maps to index 0. Blocks run in parallel (OpenMP); the nearest-value
// search is a binary search over the 256 codes plus one neighbour comparison.
#include <algorithm>
#include <cmath>

#include "element_io.h"
#include "fourbit/codebook.h"
#include "fourbit/error.h"
#include "fourbit/quantize.h"

namespace fourbit {
namespace {

constexpr int64_t kParallelMinElements = 1 << 15;

template <typename T>
void quantize_blockwise_typed(const QuantizeBlockwiseParams& p) {
  const T* in = static_cast<const T*>(p.input);
  const int64_t blocks = num_blocks(p.numel, p.blocksize);
#pragma omp parallel for schedule(static) if (p.numel >= kParallelMinElements)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t start = b * p.blocksize;
    const int64_t len = std::min(p.blocksize, p.numel - start);
    float m = 0.0f;
    for (int64_t i = 0; i < len; ++i) {
      const float a = std::fabs(detail::to_float(in[start + i]));
      m = detail::max_ignore_nan(m, a);
    }
    p.absmax[b] = m;
    for (int64_t i = 0; i < len; ++i) {
      p.out[start + i] = detail::quantize_8bit(detail::to_float(in[start + i]), m, p.code);
    }
  }
}

template <typename T>
void dequantize_blockwise_typed(const DequantizeBlockwiseParams& p) {
  T* out = static_cast<T*>(p.out);
  const int64_t blocks = num_blocks(p.numel, p.blocksize);
#pragma omp parallel for schedule(static) if (p.numel >= kParallelMinElements)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t start = b * p.blocksize;
    const int64_t len = std::min(p.blocksize, p.numel - start);
    const float scale = p.absmax[b];
    for (int64_t i = 0; i < len; ++i) {
      out[start + i] = detail::from_float<T>(detail::dequant_value(p.code[p.input[start + i]], scale));
    }
  }
}

}  // namespace

void quantize_blockwise(const QuantizeBlockwiseParams& p) {
  validate(p);
  if (p.numel == 0) return;
  for (int k = 0; k + 1 < kDynamicMapSize; ++k) {
    FOURBIT_CHECK_ARG(p.code[k] <= p.code[k + 1], "quantize_blockwise: code must be sorted "
                      "ascending, but code[", k, "] = ", p.code[k], " > code[", k + 1, "] = ",
                      p.code[k + 1]);
  }
  detail::dispatch_dtype(p.dtype, [&](auto tag) { quantize_blockwise_typed<decltype(tag)>(p); });
}

void dequantize_blockwise(const DequantizeBlockwiseParams& p) {
  validate(p);
  if (p.numel == 0) return;
  detail::dispatch_dtype(p.out_dtype,
                         [&](auto tag) { dequantize_blockwise_typed<decltype(tag)>(p); });
}

}  // namespace fourbit
