// Matrix products with a 4-bit weight, dequantized on the fly (never materialised in full).
//
// The weight W is [N, K] (out_features x in_features) in bitsandbytes' layout: the
// row-major flattening of W quantized blockwise (a block may straddle rows when K is not
// a multiple of the blocksize), two codes per byte, scales plain or double-quantized.
//
//   gemm_4bit:            Y[M, N]  = X[M, K] @ deq(W)^T (+ bias[N])   (the forward)
//   gemm_4bit_grad_input: dX[M, K] = dY[M, N] @ deq(W)                (the input gradient)
//
// Activations and outputs are row-major, contiguous, of one dtype (fp32, fp16 or bf16);
// products accumulate in fp32 and round once to the output dtype. Any M >= 0, N >= 0 and
// K >= 0 work, odd K included. How each kernel works: docs/kernels.md.
#pragma once

#include <cstdint>

#include "fourbit/quantize.h"
#include "fourbit/types.h"

namespace fourbit {

// A quantized weight as the kernels see it.
struct Weight4bit {
  const uint8_t* packed = nullptr;  // [(N * K + 1) / 2] bytes
  BlockScales scales;               // one per `blocksize` elements of the flattened W
  int64_t blocksize = 64;
  QuantType quant_type = QuantType::NF4;
  int64_t N = 0;                    // rows (out_features)
  int64_t K = 0;                    // columns (in_features)
};

// Y = X @ deq(W)^T + bias.
struct Gemm4bitParams {
  Weight4bit weight;
  const void* x = nullptr;     // [M, K] of `dtype`
  const void* bias = nullptr;  // [N] of `dtype`, or null
  void* y = nullptr;           // [M, N] of `dtype`
  int64_t M = 0;
  DType dtype = DType::BFloat16;
};

// dX = dY @ deq(W).
struct Gemm4bitGradInputParams {
  Weight4bit weight;
  const void* grad_output = nullptr;  // dY [M, N] of `dtype`
  void* grad_input = nullptr;         // dX [M, K] of `dtype`
  int64_t M = 0;
  DType dtype = DType::BFloat16;
};

// Which CUDA kernel runs a product. Auto picks by shape (see cuda/gemm_4bit.cu);
// the others force one kernel (benchmarks and tests use them).
enum class Gemm4bitAlgo : int {
  Auto = 0,
  Gemv = 1,        // CUDA cores, memory-bound on the packed bytes (forward only, any dtype)
  TensorCore = 2,  // tiled, tensor cores, dequantize in the main loop (fp16/bf16, sm80+)
  CudaCore = 3,    // tiled, fp32 CUDA cores, dequantize in the main loop (any dtype, any GPU)
};

void validate(const Gemm4bitParams& p);
void validate(const Gemm4bitGradInputParams& p);

// CPU: blocked, multi-threaded, AVX-512 where the CPU has it; a gemv path for small M.
void gemm_4bit(const Gemm4bitParams& p);
void gemm_4bit_grad_input(const Gemm4bitGradInputParams& p);

// CUDA (device pointers; enqueued on `stream`).
void gemm_4bit_cuda(const Gemm4bitParams& p, cudaStream_t stream,
                    Gemm4bitAlgo algo = Gemm4bitAlgo::Auto);
void gemm_4bit_grad_input_cuda(const Gemm4bitGradInputParams& p, cudaStream_t stream,
                               Gemm4bitAlgo algo = Gemm4bitAlgo::Auto);

}  // namespace fourbit
