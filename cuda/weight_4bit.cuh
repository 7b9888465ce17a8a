// Device helpers for reading a 4-bit weight, shared by the dequantize and the matmul
// kernels: the codebook as a kernel argument and in shared memory, and the per-block scale
// (plain, or double-quantized and decoded in registers). Internal header.
#pragma once

#include <cstdint>

#include "common.cuh"
#include "fourbit/codebook.h"
#include "fourbit/detail/element_math.h"
#include "fourbit/quantize.h"

namespace fourbit {
namespace cuda {

// The 16 codebook values, passed by value as a kernel argument.
struct Codebook4bit {
  float values[kCodebook4bitSize];
};

inline Codebook4bit codebook_arg(QuantType quant_type) {
  Codebook4bit code{};
  const auto& values = codebook_4bit(quant_type);
  for (int k = 0; k < kCodebook4bitSize; ++k) code.values[k] = values[k];
  return code;
}

// Copies the kernel-parameter codebook to shared memory with compile-time indices (a
// run-time index into a parameter array would force a local-memory copy per thread).
__device__ __forceinline__ void load_codebook(const Codebook4bit& code, float* lut) {
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < kCodebook4bitSize; ++k) lut[k] = code.values[k];
  }
  __syncthreads();
}

using detail::block_scale;
using detail::dequant_value;
using detail::log2_pow2;
using detail::nibble_of;

inline bool aligned_to(const void* ptr, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

// The block scale of weight row n, scale block kb, read from a pipeline stage's copy of the
// fragment layout's transposed scales (fp32, or nested uint8 codes decoded here); 0 past the
// last row. Shared by the sm80 and sm90 fused kernels (Args: their argument structs, which
// both carry N, blocks_per_row, nested_absmax and nested_shift).
template <bool kNested, typename Args>
__device__ __forceinline__ float fragment_stage_scale(const Args& args, const unsigned char* s_row,
                                                      int n_local, int64_t n, int64_t kb,
                                                      const float* nested_code, float offset) {
  if (n >= args.N) return 0.0f;
  if constexpr (!kNested) return reinterpret_cast<const float*>(s_row)[n_local];
  const int64_t block = n * args.blocks_per_row + kb;
  return detail::nested_scale(nested_code[s_row[n_local]], __ldg(args.nested_absmax + (block >> args.nested_shift)),
                              offset);
}

}  // namespace cuda
}  // namespace fourbit
