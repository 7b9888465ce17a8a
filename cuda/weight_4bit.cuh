// Device helpers for reading a 4-bit weight, shared by the dequantize and the matmul
// kernels: the codebook as a kernel argument and in shared memory, and the per-block scale
// (plain, or double-quantized and decoded in registers). Internal header.
#pragma once

#include <cstdint>

#include "common.cuh"
#include "fourbit/codebook.h"
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

}  // namespace cuda
}  // namespace fourbit
