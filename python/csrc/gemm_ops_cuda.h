// CUDA helpers of the binding shared by the matmul ops (gemm_ops_cuda.cpp) and the LoRA
// ops (lora_ops_cuda.cpp): the current stream, a device guard, and the dequantize into a
// temporary that feeds cuBLAS at large M. Internal header (CUDA builds only).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include "fourbit/gemm.h"

namespace fourbit {
namespace binding {

// Activation rows from which cuBLAS (after the dequantize) takes over: at large M the GEMM
// dominates and the one extra pass over the weight is a few percent of it. An estimate
// from the H100 anchors (bitsandbytes' fused kernel loses to dequantize + cuBLAS above
// M ~ 1536); to be tuned with benchmarks/bench_matmul.py on the GPU.
constexpr int64_t kCublasMinRows = 1024;

cudaStream_t current_stream();

// The weight dequantized to `dtype` in one pass (a fresh tensor; the caching allocator
// hands back the same block call after call).
at::Tensor dequantized_weight(const Weight4bit& w, DType dtype, const at::TensorOptions& options);

// Makes the tensor's device current for the op's lifetime.
struct DeviceGuard {
  explicit DeviceGuard(const at::Tensor& t) : guard(t.device()) {}
  c10::cuda::CUDAGuard guard;
};

}  // namespace binding
}  // namespace fourbit
