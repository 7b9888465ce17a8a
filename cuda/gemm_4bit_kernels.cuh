// Launchers of the CUDA 4-bit matmul kernels; cuda/gemm_4bit.cu picks one per call.
// Internal header.
#pragma once

#include "fourbit/detail/launch_plan.h"
#include "fourbit/gemm.h"

namespace fourbit {
namespace cuda {

// Rows of X the gemv kernel takes at once (launch_plan.h gives the reason).
constexpr int64_t kGemvMaxRows = plan::kGemvMaxRows;

// Y = X @ deq(W)^T + bias on CUDA cores, memory-bound on the packed weight (any dtype, any M).
void launch_gemv_4bit(const Gemm4bitParams& p, cudaStream_t stream);

// The tiled kernels: 64 x 64 output tiles, the weight tile dequantized into shared memory
// inside the main loop. tensor_cores = true uses mma.sync (fp16/bf16 only, sm80+); false uses
// an fp32 CUDA-core tile (every dtype and architecture).
void launch_tiled_4bit_forward(const Gemm4bitParams& p, bool tensor_cores, cudaStream_t stream);
void launch_tiled_4bit_grad_input(const Gemm4bitGradInputParams& p, bool tensor_cores,
                                  cudaStream_t stream);

}  // namespace cuda
}  // namespace fourbit
