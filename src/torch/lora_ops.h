// The LoRA ops on a 4-bit weight (lora_4bit, lora_4bit_backward): argument checks and the
// tensor -> core params translation, shared by the CPU impl (lora_ops.cpp) and the CUDA
// impl (lora_ops_cuda.cpp). Every user error is a ValueError naming the argument and value.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <functional>
#include <optional>

#include "fourbit/lora.h"
#include "gemm_ops.h"

namespace fourbit {
namespace binding {

// A checked forward call: Y (X.shape[:-1] + [N]) and XA (X.shape[:-1] + [r]) allocated,
// the inputs made contiguous, `params` pointing into all of them.
struct LoraForwardCall {
  at::Tensor x, x_lora, lora_a, lora_b, bias, y, xa;
  Lora4bitForwardParams params;
};
LoraForwardCall prepare_lora_forward(const at::Tensor& X, const WeightArgs& w,
                                     const std::optional<at::Tensor>& bias,
                                     const at::Tensor& lora_A, const at::Tensor& lora_B,
                                     double scaling, const std::optional<at::Tensor>& X_lora);

// A checked backward call. output_mask = which of (dX, dX_l, dA, dB) to compute; the others
// are returned as empty tensors (shape [0]).
struct LoraBackwardCall {
  at::Tensor grad_output, x_lora, xa, lora_a, lora_b;
  at::Tensor grad_input, grad_input_lora, grad_a, grad_b;
  Lora4bitBackwardParams params;
};
LoraBackwardCall prepare_lora_backward(const at::Tensor& grad_output, const WeightArgs& w,
                                       const at::Tensor& lora_A, const at::Tensor& lora_B,
                                       double scaling, const std::optional<at::Tensor>& X_lora,
                                       const std::optional<at::Tensor>& XA, bool separate_x_lora,
                                       std::array<bool, 4> output_mask);

// The large-M path of both devices: every product by ATen's matmul (cuBLAS / oneDNN) on
// the weight dequantized once by `dequantize` (called only when a 4-bit product is
// needed). The adapter terms accumulate into Y / dX in place (addmm_ with beta = 1,
// alpha = scaling): no [M, N] or [M, K] LoRA temporary, no separate scale / add passes.
void lora_forward_dense(const LoraForwardCall& call, const std::function<at::Tensor()>& dequantize);
void lora_backward_dense(const LoraBackwardCall& call, const std::function<at::Tensor()>& dequantize);

// Registers both ops for one dispatch key; `Guard` is constructed from the activation first.
template <typename Guard, void (*run_forward)(const LoraForwardCall&),
          void (*run_backward)(const LoraBackwardCall&)>
void register_lora_impls(torch::Library& m) {
  m.impl("lora_4bit",
         [](const at::Tensor& X, const at::Tensor& W, const at::Tensor& absmax,
            const std::optional<at::Tensor>& nested_absmax,
            const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
            const std::optional<at::Tensor>& bias, int64_t blocksize, int64_t nested_blocksize,
            std::string quant_type, int64_t N, int64_t K, const at::Tensor& lora_A,
            const at::Tensor& lora_B, double scaling, const std::optional<at::Tensor>& X_lora) {
           Guard guard(X);
           const WeightArgs w{W, absmax, nested_absmax, nested_code, offset,
                              blocksize, nested_blocksize, quant_type, N, K};
           LoraForwardCall call = prepare_lora_forward(X, w, bias, lora_A, lora_B, scaling, X_lora);
           run_forward(call);
           return std::make_tuple(call.y, call.xa);
         });
  m.impl("lora_4bit_backward",
         [](const at::Tensor& grad_output, const at::Tensor& W, const at::Tensor& absmax,
            const std::optional<at::Tensor>& nested_absmax,
            const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
            int64_t blocksize, int64_t nested_blocksize, std::string quant_type, int64_t N,
            int64_t K, const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling,
            const std::optional<at::Tensor>& X_lora, const std::optional<at::Tensor>& XA,
            bool separate_x_lora, std::array<bool, 4> output_mask) {
           Guard guard(grad_output);
           const WeightArgs w{W, absmax, nested_absmax, nested_code, offset,
                              blocksize, nested_blocksize, quant_type, N, K};
           LoraBackwardCall call = prepare_lora_backward(grad_output, w, lora_A, lora_B, scaling,
                                                         X_lora, XA, separate_x_lora, output_mask);
           run_backward(call);
           return std::make_tuple(call.grad_input, call.grad_input_lora, call.grad_a, call.grad_b);
         });
}

}  // namespace binding
}  // namespace fourbit
