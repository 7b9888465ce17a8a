// Blockwise quantization entry points: 4-bit (NF4/FP4) and 8-bit (dynamic map).
//
// Each entry point takes a POD params struct of raw pointers and sizes, validates it and
// throws fourbit::Error (naming the argument and the value) on bad input. The CPU entry
// points run multi-threaded on host memory; the *_cuda ones take device pointers and
// enqueue on `stream` without synchronising. All sizes are int64: tensors with more than
// 2^31 elements are fine. Layouts and rounding rules: docs/format.md.
#pragma once

#include <cstdint>

#include "fourbit/types.h"

// Same type as the CUDA runtime's cudaStream_t, so this header needs no CUDA headers.
typedef struct CUstream_st* cudaStream_t;

namespace fourbit {

// Y = quantize_4bit(X): per block of `blocksize` consecutive elements, absmax = max |x|,
// code = nearest codebook entry to x / absmax; two codes per byte, the element with the
// lower index in the high nibble. The last block may be partial.
struct Quantize4bitParams {
  const void* input = nullptr;  // [numel] elements of `dtype`
  DType dtype = DType::Float32;
  int64_t numel = 0;
  int64_t blocksize = 64;       // power of two in [32, 4096]
  QuantType quant_type = QuantType::NF4;
  uint8_t* packed = nullptr;    // [(numel + 1) / 2] bytes
  float* absmax = nullptr;      // [ceil(numel / blocksize)]
};

// The per-block scales of a 4-bit tensor: either plain fp32 (`absmax`) or double-quantized
// (`absmax_q`: one uint8 per block, decoded as
//  nested_code[absmax_q[b]] * nested_absmax[b / nested_blocksize] + *offset).
struct BlockScales {
  const float* absmax = nullptr;         // plain: [blocks] fp32; leave null when nested
  const uint8_t* absmax_q = nullptr;     // nested: [blocks] uint8
  const float* nested_code = nullptr;    // nested: [256] fp32 (the signed dynamic map)
  const float* nested_absmax = nullptr;  // nested: [ceil(blocks / nested_blocksize)] fp32
  const float* offset = nullptr;         // nested: pointer to one fp32 (device memory in CUDA)
  int64_t nested_blocksize = 256;

  bool nested() const { return absmax_q != nullptr; }
};

// X = dequantize_4bit(Y): out[i] = codebook[code_i] * scale[i / blocksize], computed in
// fp32 and rounded once to `out_dtype`. Nested scales are decoded in the same pass.
struct Dequantize4bitParams {
  const uint8_t* packed = nullptr;  // [(numel + 1) / 2] bytes
  BlockScales scales;
  int64_t numel = 0;
  int64_t blocksize = 64;
  QuantType quant_type = QuantType::NF4;
  void* out = nullptr;              // [numel] elements of `out_dtype`
  DType out_dtype = DType::Float32;
};

// 8-bit blockwise quantization with a 256-entry sorted code (the dynamic map):
// absmax = max |x| over the block (NaN ignored), code = the entry nearest to x / absmax,
// ties to the lower index.
struct QuantizeBlockwiseParams {
  const void* input = nullptr;  // [numel] elements of `dtype`
  DType dtype = DType::Float32;
  int64_t numel = 0;
  int64_t blocksize = 256;      // power of two in [32, 4096]
  const float* code = nullptr;  // [256] fp32, sorted ascending
  uint8_t* out = nullptr;       // [numel]
  float* absmax = nullptr;      // [ceil(numel / blocksize)]
};

struct DequantizeBlockwiseParams {
  const uint8_t* input = nullptr;  // [numel]
  const float* code = nullptr;     // [256] fp32
  const float* absmax = nullptr;   // [ceil(numel / blocksize)]
  int64_t numel = 0;
  int64_t blocksize = 256;
  void* out = nullptr;             // [numel] elements of `out_dtype`
  DType out_dtype = DType::Float32;
};

// Number of scale blocks for `numel` elements: ceil(numel / blocksize), without the
// overflow of (numel + blocksize - 1) near INT64_MAX.
inline int64_t num_blocks(int64_t numel, int64_t blocksize) {
  return numel / blocksize + (numel % blocksize != 0 ? 1 : 0);
}

// Argument validation shared by the CPU and CUDA paths (throws InvalidArgument).
void validate(const Quantize4bitParams& p);
void validate(const Dequantize4bitParams& p);
void validate(const QuantizeBlockwiseParams& p);
void validate(const DequantizeBlockwiseParams& p);

// CPU implementations (host pointers).
void quantize_4bit(const Quantize4bitParams& p);
void dequantize_4bit(const Dequantize4bitParams& p);
void quantize_blockwise(const QuantizeBlockwiseParams& p);
void dequantize_blockwise(const DequantizeBlockwiseParams& p);

// True when libfourbit was built with its CUDA kernels.
bool built_with_cuda();

// CUDA implementations (device pointers; enqueued on `stream`). Throw a Runtime Error if
// libfourbit was built without CUDA or a launch fails.
void quantize_4bit_cuda(const Quantize4bitParams& p, cudaStream_t stream);
void dequantize_4bit_cuda(const Dequantize4bitParams& p, cudaStream_t stream);
void quantize_blockwise_cuda(const QuantizeBlockwiseParams& p, cudaStream_t stream);
void dequantize_blockwise_cuda(const DequantizeBlockwiseParams& p, cudaStream_t stream);

}  // namespace fourbit
