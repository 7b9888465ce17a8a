// A 4-bit linear layer with a LoRA adapter, forward and backward in fused products.
//
// Shapes (row-major, contiguous, one dtype: fp32, fp16 or bf16; products accumulate in fp32):
//   X [M, K] base input, X_l [M, K] adapter input (the dropped-out X; X itself when null),
//   W [N, K] 4-bit (see gemm.h), A [r, K] (lora_A), B [N, r] (lora_B), bias [N], s = scaling.
//
//   forward:  Y  = X deq(W)^T + bias + s (X_l A^T) B^T,   XA = X_l A^T  (kept for backward)
//   backward: G  = s dY B                                   [M, r], fp32, internal
//             dX = dY deq(W) (+ G A when X_l is X)          [M, K]
//             dX_l = G A      (only with a separate X_l)    [M, K]
//             dA = G^T X_l                                  [r, K]
//             dB = s dY^T XA                                [N, r]
// The weight is frozen: there is no dW. dbias (the column sums of dY) is left to the
// caller. Any M >= 0, N >= 0, K >= 0; 1 <= r <= kLoraMaxRank. How the products are fused:
// docs/kernels.md ("LoRA").
#pragma once

#include <cstdint>

#include "fourbit/gemm.h"

namespace fourbit {

// Largest adapter rank the fused kernels take: the CPU epilogue keeps an r x 128 fp32 tile
// of B (or A) per thread, 512 KiB at this rank, still L2-sized. PEFT ranks are 8..256.
constexpr int64_t kLoraMaxRank = 1024;

struct Lora4bitForwardParams {
  Weight4bit weight;
  const void* x = nullptr;       // X [M, K]
  const void* x_lora = nullptr;  // X_l [M, K], or null for X_l = X
  const void* lora_a = nullptr;  // A [r, K]
  const void* lora_b = nullptr;  // B [N, r]
  const void* bias = nullptr;    // [N], or null
  double scaling = 1.0;          // s
  void* y = nullptr;             // Y [M, N]
  void* xa = nullptr;            // XA [M, r] (written; the backward reads it)
  int64_t M = 0;
  int64_t r = 0;
  DType dtype = DType::BFloat16;
};

// The base product Y = X deq(W)^T + bias of a LoRA forward, as gemm_4bit params.
inline Gemm4bitParams base_product_params(const Lora4bitForwardParams& p) {
  Gemm4bitParams base;
  base.weight = p.weight;
  base.x = p.x;
  base.bias = p.bias;
  base.y = p.y;
  base.M = p.M;
  base.dtype = p.dtype;
  return base;
}

struct Lora4bitBackwardParams {
  Weight4bit weight;
  const void* grad_output = nullptr;  // dY [M, N]
  const void* x_lora = nullptr;       // X_l [M, K] (X when there is no separate X_l); for dA
  const void* xa = nullptr;           // XA [M, r] from the forward; for dB
  const void* lora_a = nullptr;       // A [r, K]
  const void* lora_b = nullptr;       // B [N, r]
  double scaling = 1.0;               // s
  // true: the forward had a separate X_l, so grad_input gets the base part dY deq(W) only
  // and grad_input_lora the adapter part G A. false: X_l was X and grad_input gets both
  // (grad_input_lora must be null).
  bool separate_lora_input = false;
  void* grad_input = nullptr;       // dX [M, K], or null when not needed
  void* grad_input_lora = nullptr;  // dX_l [M, K], or null when not needed
  void* grad_a = nullptr;           // dA [r, K], or null when not needed
  void* grad_b = nullptr;           // dB [N, r], or null when not needed
  int64_t M = 0;
  int64_t r = 0;
  DType dtype = DType::BFloat16;
};

void validate(const Lora4bitForwardParams& p);
void validate(const Lora4bitBackwardParams& p);

// CPU: the blocked 4-bit drivers with the adapter in their epilogue (src/lora_4bit.cpp).
void lora_4bit_forward(const Lora4bitForwardParams& p);
void lora_4bit_backward(const Lora4bitBackwardParams& p);

// CUDA (device pointers; enqueued on `stream`): the 4-bit kernels of gemm_4bit_cuda for
// the base product, small adapter kernels for the rest (cuda/lora_4bit.cu).
void lora_4bit_forward_cuda(const Lora4bitForwardParams& p, cudaStream_t stream);
void lora_4bit_backward_cuda(const Lora4bitBackwardParams& p, cudaStream_t stream);

}  // namespace fourbit
