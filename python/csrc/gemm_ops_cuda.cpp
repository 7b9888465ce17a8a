// CUDA impl of the 4-bit matmul ops: the core's fused kernels, plus, for large M, a
// one-pass dequantize into a temporary followed by cuBLAS (through ATen), which the core
// cannot do because it does not link cuBLAS.
//
// Kernel choice for algo="auto" (the core's own Auto rule is in cuda/gemm_4bit.cu):
//   M >= kCublasMinRows, or fp32 with M > the gemv limit  -> dequantize + cuBLAS
//   otherwise                                             -> the core (gemv / tiled kernels)
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "checks.h"
#include "gemm_ops.h"
#include "gemm_ops_cuda.h"

namespace fourbit {
namespace binding {

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

at::Tensor dequantized_weight(const Weight4bit& w, DType dtype, const at::TensorOptions& options) {
  at::Tensor out = at::empty({w.N, w.K}, options);
  run_core([&] {
    dequantize_4bit_cuda(whole_weight_dequantize(w, dtype, out.mutable_data_ptr()), current_stream());
  });
  return out;
}

}  // namespace binding
}  // namespace fourbit

namespace {

using fourbit::binding::current_stream;
using fourbit::binding::ForwardCall;
using fourbit::binding::GemmAlgo;
using fourbit::binding::GradInputCall;
using fourbit::binding::kCublasMinRows;

// Rows the core's gemv kernel takes at once (cuda/gemm_4bit_kernels.cuh).
constexpr int64_t kGemvMaxRows = 8;

fourbit::Gemm4bitAlgo core_algo(GemmAlgo algo) {
  switch (algo) {
    case GemmAlgo::Gemv: return fourbit::Gemm4bitAlgo::Gemv;
    case GemmAlgo::TensorCore: return fourbit::Gemm4bitAlgo::TensorCore;
    case GemmAlgo::CudaCore: return fourbit::Gemm4bitAlgo::CudaCore;
    default: return fourbit::Gemm4bitAlgo::Auto;
  }
}

bool use_cublas(GemmAlgo algo, int64_t M, fourbit::DType dtype) {
  if (algo != GemmAlgo::Auto) return algo == GemmAlgo::DequantBlas;
  return M >= kCublasMinRows || (dtype == fourbit::DType::Float32 && M > kGemvMaxRows);
}

void cuda_forward(const ForwardCall& call) {
  const fourbit::Gemm4bitParams& p = call.params;
  const GemmAlgo algo = fourbit::binding::parse_gemm_algo(call.algo);
  if (p.M == 0 || p.weight.N == 0) return;
  if (use_cublas(algo, p.M, p.dtype)) {
    fourbit::binding::gemm_forward_dense(
        call, fourbit::binding::dequantized_weight(p.weight, p.dtype, call.x.options()));
    return;
  }
  fourbit::binding::run_core(
      [&] { fourbit::gemm_4bit_cuda(p, current_stream(), core_algo(algo)); });
}

void cuda_grad_input(const GradInputCall& call) {
  const fourbit::Gemm4bitGradInputParams& p = call.params;
  const GemmAlgo algo = fourbit::binding::parse_gemm_algo(call.algo);
  if (p.M == 0 || p.weight.K == 0) return;
  if (use_cublas(algo, p.M, p.dtype)) {
    fourbit::binding::gemm_grad_input_dense(
        call, fourbit::binding::dequantized_weight(p.weight, p.dtype, call.grad_output.options()));
    return;
  }
  fourbit::binding::run_core(
      [&] { fourbit::gemm_4bit_grad_input_cuda(p, current_stream(), core_algo(algo)); });
}

}  // namespace

TORCH_LIBRARY_IMPL(fourbit, CUDA, m) {
  fourbit::binding::register_gemm_impls<fourbit::binding::DeviceGuard, &cuda_forward, &cuda_grad_input>(m);
}
