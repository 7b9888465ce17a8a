// CUDA entry points of the 4-bit matmul: validate, then pick the kernel. This is the one
// place that maps a shape to a kernel (Gemm4bitAlgo::Auto):
//
//   forward, M <= kGemvMaxRows      -> gemv (cuda/gemm_4bit_gemv.cu): bound by reading the
//                                      packed weight once
//   fp16/bf16 on sm80 or newer      -> tensor-core tiled kernel (cuda/gemm_4bit_tiled.cu)
//   fp32, or an older GPU           -> CUDA-core tiled kernel (same file)
//
// The torch binding adds one rule on top for large M, where cuBLAS's GEMM beats these
// kernels: dequantize into a buffer, then cuBLAS (src/torch/gemm_ops_cuda.cpp). The core
// does not link cuBLAS, so C++ users get the fused kernels at every M.
#include "common.cuh"
#include "fourbit/gemm.h"
#include "gemm_4bit_kernels.cuh"

namespace fourbit {
namespace {

bool tensor_cores_usable(DType dtype) {
  return plan::tensor_cores_usable(dtype, cuda::compute_capability());
}

}  // namespace

void gemm_4bit_cuda(const Gemm4bitParams& p, cudaStream_t stream, Gemm4bitAlgo algo) {
  validate(p);
  if (p.M == 0 || p.weight.N == 0) return;
  switch (algo) {
    case Gemm4bitAlgo::Auto:
      // The core has no dense GEMM: plan::choose_forward picks gemv or a tiled kernel.
      switch (plan::choose_forward(p.M, p.dtype, cuda::compute_capability(), /*has_blas=*/false)) {
        case plan::MatmulPath::Gemv: cuda::launch_gemv_4bit(p, stream); return;
        case plan::MatmulPath::TensorCoreTiled: cuda::launch_tiled_4bit_forward(p, true, stream); return;
        default: cuda::launch_tiled_4bit_forward(p, false, stream); return;
      }
    case Gemm4bitAlgo::Gemv:
      cuda::launch_gemv_4bit(p, stream);
      return;
    case Gemm4bitAlgo::TensorCore:
      FOURBIT_CHECK_ARG(tensor_cores_usable(p.dtype), "gemm_4bit_cuda: algo TensorCore needs "
                        "float16 or bfloat16 on sm80 or newer, got dtype ", to_string(p.dtype),
                        " on sm", cuda::compute_capability());
      cuda::launch_tiled_4bit_forward(p, true, stream);
      return;
    case Gemm4bitAlgo::CudaCore:
      cuda::launch_tiled_4bit_forward(p, false, stream);
      return;
  }
  FOURBIT_CHECK_ARG(false, "gemm_4bit_cuda: unknown algo enum value ", static_cast<int>(algo));
}

void gemm_4bit_grad_input_cuda(const Gemm4bitGradInputParams& p, cudaStream_t stream,
                               Gemm4bitAlgo algo) {
  validate(p);
  if (p.M == 0 || p.weight.K == 0) return;
  switch (algo) {
    case Gemm4bitAlgo::Auto:
      cuda::launch_tiled_4bit_grad_input(p, tensor_cores_usable(p.dtype), stream);
      return;
    case Gemm4bitAlgo::Gemv:
      FOURBIT_CHECK_ARG(false, "gemm_4bit_grad_input_cuda: algo Gemv has no input-gradient "
                        "kernel; use Auto, TensorCore or CudaCore");
      return;
    case Gemm4bitAlgo::TensorCore:
      FOURBIT_CHECK_ARG(tensor_cores_usable(p.dtype), "gemm_4bit_grad_input_cuda: algo "
                        "TensorCore needs float16 or bfloat16 on sm80 or newer, got dtype ",
                        to_string(p.dtype), " on sm", cuda::compute_capability());
      cuda::launch_tiled_4bit_grad_input(p, true, stream);
      return;
    case Gemm4bitAlgo::CudaCore:
      cuda::launch_tiled_4bit_grad_input(p, false, stream);
      return;
  }
  FOURBIT_CHECK_ARG(false, "gemm_4bit_grad_input_cuda: unknown algo enum value ",
                    static_cast<int>(algo));
}

}  // namespace fourbit
