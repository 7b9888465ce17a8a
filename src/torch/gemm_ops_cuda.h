// CUDA helpers of the binding shared by the matmul ops (gemm_ops_cuda.cpp) and the LoRA
// ops (lora_ops_cuda.cpp): the current stream, a device guard, and the dequantize into a
// temporary that feeds cuBLAS at large M. Internal header (CUDA builds only).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include "fourbit/detail/launch_plan.h"
#include "fourbit/gemm.h"

namespace fourbit {
namespace binding {

cudaStream_t current_stream();

// The path of a matmul with M rows in the binding, which has cuBLAS (through ATen):
// plan::choose_forward / choose_grad_input with has_blas = true. Above the gemv's
// kGemvMaxRows rows the weight is dequantized into a temporary from torch's caching
// allocator and cuBLAS runs the product (the fused tiled kernel is estimated 3-4x slower
// than bf16 cuBLAS at M = 9..1023; docs/kernels.md).
bool forward_uses_blas(int64_t M, DType dtype);
bool grad_input_uses_blas(int64_t M, DType dtype);

// The weight dequantized to `dtype` in one pass (a fresh tensor; the caching allocator
// hands back the same block call after call).
at::Tensor dequantized_weight(const Weight4bit& w, DType dtype, const at::TensorOptions& options);

// algo="fused": the fragment-layout kernels on the weight's cached fragment copy
// (src/torch/fused_ops_cuda.cpp).
struct ForwardCall;
struct GradInputCall;
void fused_forward(const ForwardCall& call);
// algo="fused_sm90": the same cached copy, forward by the sm_90a wgmma kernel.
void fused_sm90_forward(const ForwardCall& call);
void fused_grad_input(const GradInputCall& call);

// Makes the tensor's device current for the op's lifetime.
struct DeviceGuard {
  explicit DeviceGuard(const at::Tensor& t) : guard(t.device()) {}
  c10::cuda::CUDAGuard guard;
};

}  // namespace binding
}  // namespace fourbit
