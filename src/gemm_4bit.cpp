// CPU 4-bit matmul: Y = X @ deq(W)^T (+ bias) and dX = dY @ deq(W), W never dequantized
// in full.
//
// Both products are C[M, cols] = A[M, R] @ B[R, cols] with B a view of the weight:
// forward B[k][n] = W[n][k] (R = K, cols = N), input gradient B[n][k] = W[n][k]
// (R = N, cols = K). The blocked drivers that tile them over threads, and the gemv path
// for small M, live in gemm_4bit_driver.h (shared with the LoRA-fused products of
// lora_4bit.cpp); this file holds the weight decode, the portable micro-kernels and the
// entry points. Accumulation is fp32 throughout; bias is added in fp32 and the result
// rounded once to the output dtype.
//
// The inner kernels come in three flavours picked per call from kernel_isa(): portable
// scalar loops, AVX2 + FMA (src/gemm_4bit_avx2.cpp) and AVX-512 (src/gemm_4bit_avx512.cpp).
//
// bf16 activations on CPUs with AVX512_BF16 take a twin of both paths built on bf16 dot
// products: the weight is decoded to bf16 (exactly dequantize_4bit's bf16 values, as
// bitsandbytes and torch would multiply them) and products accumulate in fp32. Other
// dtypes, and bf16 elsewhere, use the fp32 paths with the weight in fp32.
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "dequantize_4bit_avx512.h"
#include "element_io.h"
#include "fourbit/codebook.h"
#include "fourbit/detail/element_math.h"
#include "fourbit/gemm.h"
#include "gemm_4bit_driver.h"
#include "gemm_4bit_kernels.h"
#include "kernel_isa.h"

namespace fourbit {
namespace detail {

namespace {

// A vector decoder of whole 32-element chunks (g % 32 == 0, len % 32 == 0).
template <typename Out>
using DecodeAlignedFn = void (*)(const Weight4bit&, const float*, int64_t, int64_t, Out*);

// Decodes [g, g + len) of the weight into `out`: scalar up to the first 32-element
// boundary and for the ragged end, `decode_aligned` (AVX2 or AVX-512; null: none on this
// CPU) for whole 32-element chunks. `convert` turns the fp32 weight code * scale into the
// output element.
template <typename Out, typename Convert>
void decode_span(const Weight4bit& w, const float* code, int64_t g, int64_t len, Out* out,
                 const Convert& convert, DecodeAlignedFn<Out> decode_aligned) {
  int64_t i = 0;
  auto scalar_until = [&](int64_t end) {
    int64_t current_block = -1;
    float scale = 0.0f;
    for (; i < end; ++i) {
      const int64_t e = g + i;
      const int64_t block = e >> log2_pow2(w.blocksize);
      if (block != current_block) {
        scale = block_scale(w.scales, block);
        current_block = block;
      }
      const uint8_t byte = w.packed[e >> 1];
      out[i] = convert(dequant_value(code[nibble_of(byte, e)], scale));
    }
  };
  if (decode_aligned != nullptr) {
    scalar_until(std::min(len, (32 - g % 32) % 32));
    const int64_t body = (len - i) / 32 * 32;
    if (body > 0) {
      decode_aligned(w, code, g + i, body, out + i);
      i += body;
    }
  }
  scalar_until(len);
}

}  // namespace

void decode_weight_span(const Weight4bit& w, const float* code, int64_t g, int64_t len,
                        float* out) {
  const CpuIsa isa = kernel_isa();
  const DecodeAlignedFn<float> aligned = isa >= CpuIsa::Avx512 ? decode_aligned_avx512
                                         : isa == CpuIsa::Avx2 ? decode_aligned_avx2
                                                               : nullptr;
  decode_span(w, code, g, len, out, [](float v) { return v; }, aligned);
}

void decode_weight_span_bf16(const Weight4bit& w, const float* code, int64_t g, int64_t len,
                             uint16_t* out) {
  // bf16 decode runs on the AVX512_BF16 paths and in the tile tests: no AVX2 flavour.
  const DecodeAlignedFn<uint16_t> aligned =
      kernel_isa() >= CpuIsa::Avx512 ? decode_aligned_bf16_avx512 : nullptr;
  decode_span(w, code, g, len, out, float_to_bf16, aligned);
}

void micro_kernel(int rows, int64_t R, const float* A, int64_t lda, const float* B, int64_t ldb,
                  float* C, int64_t ldc) {
  const CpuIsa isa = kernel_isa();
  if (isa >= CpuIsa::Avx512) {
    micro_kernel_avx512(rows, R, A, lda, B, ldb, C, ldc);
    return;
  }
  if (isa == CpuIsa::Avx2) {
    micro_kernel_avx2(rows, R, A, lda, B, ldb, C, ldc);
    return;
  }
  for (int i = 0; i < rows; ++i) {
    float* c = C + i * ldc;
    for (int64_t r = 0; r < R; ++r) {
      const float a = A[i * lda + r];
      const float* b = B + r * ldb;
      for (int j = 0; j < kMicroCols; ++j) c[j] += a * b[j];
    }
  }
}

void dot_rows(int rows, int64_t len, const float* x, int64_t ldx, const float* w, float* acc) {
  const CpuIsa isa = kernel_isa();
  if (isa >= CpuIsa::Avx512) {
    dot_rows_avx512(rows, len, x, ldx, w, acc);
    return;
  }
  if (isa == CpuIsa::Avx2) {
    dot_rows_avx2(rows, len, x, ldx, w, acc);
    return;
  }
  for (int m = 0; m < rows; ++m) {
    float sum = 0.0f;
    for (int64_t i = 0; i < len; ++i) sum += x[m * ldx + i] * w[i];
    acc[m] += sum;
  }
}

}  // namespace detail

namespace {

template <typename T>
void gemm_forward(const Gemm4bitParams& p) {
  const Weight4bit& w = p.weight;
  const float* code = codebook_4bit(w.quant_type).data();
  const T* x = static_cast<const T*>(p.x);
  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);
  if (p.M <= detail::gemv_max_rows<T>()) {
    detail::gemv_forward(w, code, x, p.M, y, [&](int64_t, int64_t n) {
      return bias ? detail::to_float(bias[n]) : 0.0f;
    });
    return;
  }
  detail::blocked_forward(w, code, x, p.M, detail::StoreTile<T>{bias, y, w.N});
}

template <typename T>
void gemm_grad_input(const Gemm4bitGradInputParams& p) {
  const Weight4bit& w = p.weight;
  const float* code = codebook_4bit(w.quant_type).data();
  detail::blocked_grad_input(w, code, static_cast<const T*>(p.grad_output), p.M,
                             detail::StoreTile<T>{nullptr, static_cast<T*>(p.grad_input), w.K});
}

}  // namespace

void gemm_4bit(const Gemm4bitParams& p) {
  validate(p);
  if (p.M == 0 || p.weight.N == 0) return;
  detail::dispatch_dtype(p.dtype, [&](auto tag) { gemm_forward<decltype(tag)>(p); });
}

void gemm_4bit_grad_input(const Gemm4bitGradInputParams& p) {
  validate(p);
  if (p.M == 0 || p.weight.K == 0) return;
  detail::dispatch_dtype(p.dtype, [&](auto tag) { gemm_grad_input<decltype(tag)>(p); });
}

}  // namespace fourbit
