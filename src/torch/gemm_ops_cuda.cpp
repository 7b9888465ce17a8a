// CUDA impl of the 4-bit matmul ops: the core's fused kernels, plus, for large M, a
// one-pass dequantize into a temporary followed by cuBLAS (through ATen), which the core
// cannot do because it does not link cuBLAS.
//
// Kernel choice for algo="auto" (include/fourbit/detail/launch_plan.h, has_blas = true):
//   forward, M <= kGemvMaxRows  -> the core's gemv kernel
//   forward, larger M           -> dequantize into a temporary + cuBLAS
//   input gradient, every M     -> dequantize into a temporary + cuBLAS
// algo="fused" (explicit only; unmeasured, so auto does not pick it): the fragment-layout
// kernels on a cached repack of the weight (fused_ops_cuda.cpp).
// algo="fused_sm90" (explicit only, unmeasured): the forward by the Hopper wgmma kernel on the
// same cached copy (sm90 and a build with 90a in FOURBIT_CUDA_ARCHS, else a ValueError); its
// input gradient is "fused"'s.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "checks.h"
#include "gemm_ops.h"
#include "gemm_ops_cuda.h"

namespace fourbit {
namespace binding {

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

namespace {
int current_compute_capability() {
  int device = 0, major = 0, minor = 0;
  run_core([&] {
    FOURBIT_CHECK_RUNTIME(cudaGetDevice(&device) == cudaSuccess &&
                              cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
                              cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) == cudaSuccess,
                          "could not read the compute capability of CUDA device ", device);
  });
  return major * 10 + minor;
}
}  // namespace

bool forward_uses_blas(int64_t M, DType dtype) {
  return plan::choose_forward(M, dtype, current_compute_capability(), /*has_blas=*/true) ==
         plan::MatmulPath::DequantizeBlas;
}

bool grad_input_uses_blas(int64_t M, DType dtype) {
  return plan::choose_grad_input(M, dtype, current_compute_capability(), /*has_blas=*/true) ==
         plan::MatmulPath::DequantizeBlas;
}

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

fourbit::Gemm4bitAlgo core_algo(GemmAlgo algo) {
  switch (algo) {
    case GemmAlgo::Gemv: return fourbit::Gemm4bitAlgo::Gemv;
    case GemmAlgo::TensorCore: return fourbit::Gemm4bitAlgo::TensorCore;
    case GemmAlgo::CudaCore: return fourbit::Gemm4bitAlgo::CudaCore;
    default: return fourbit::Gemm4bitAlgo::Auto;
  }
}

bool use_cublas(GemmAlgo algo, bool auto_uses_blas) {
  if (algo != GemmAlgo::Auto) return algo == GemmAlgo::DequantBlas;
  return auto_uses_blas;
}

void cuda_forward(const ForwardCall& call) {
  const fourbit::Gemm4bitParams& p = call.params;
  const GemmAlgo algo = fourbit::binding::parse_gemm_algo(call.algo);
  if (p.M == 0 || p.weight.N == 0) return;
  if (algo == GemmAlgo::Fused) return fourbit::binding::fused_forward(call);
  if (algo == GemmAlgo::FusedSm90) return fourbit::binding::fused_sm90_forward(call);
  if (use_cublas(algo, fourbit::binding::forward_uses_blas(p.M, p.dtype))) {
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
  if (algo == GemmAlgo::Fused || algo == GemmAlgo::FusedSm90) return fourbit::binding::fused_grad_input(call);
  if (use_cublas(algo, fourbit::binding::grad_input_uses_blas(p.M, p.dtype))) {
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
