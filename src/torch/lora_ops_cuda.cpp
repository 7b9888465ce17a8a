// CUDA impl of the LoRA ops. The adapter products go through cuBLAS (ATen) at every M (the
// core's small-GEMM kernel runs a whole reduction in one CTA at small M); the base product
// follows gemm_4bit's rule (gemm_ops_cuda.h):
//
//   forward, M <= kGemvMaxRows  -> the core's gemv kernel for X deq(W)^T + bias, then
//                                  XA = X_l A^T and Y += s XA B^T by cuBLAS
//   otherwise                   -> the weight dequantized once into a temporary, then
//                                  lora_forward_dense / lora_backward_dense (lora_ops.cpp,
//                                  shared with the CPU): cuBLAS for every product
//
// Why not one GEMM against a [N + r, K] buffer ([deq(W); A]) for Y and XA together: its
// [M, N + r] result interleaves Y and XA per row, so Y would need a strided copy out (2 M N
// bytes each way), which costs more than re-reading X for the r-column XA product.
#include <ATen/ATen.h>

#include "checks.h"
#include "gemm_ops_cuda.h"
#include "lora_ops.h"

namespace {

using fourbit::binding::LoraBackwardCall;
using fourbit::binding::LoraForwardCall;

void cuda_forward(const LoraForwardCall& call) {
  const fourbit::Lora4bitForwardParams& p = call.params;
  if (fourbit::binding::forward_uses_blas(p.M, p.dtype)) {
    fourbit::binding::lora_forward_dense(call, [&] {
      return fourbit::binding::dequantized_weight(p.weight, p.dtype, call.x.options());
    });
    return;
  }
  const int64_t M = p.M, N = p.weight.N, K = p.weight.K;
  at::Tensor xa = call.xa.view({M, p.r});
  at::mm_out(xa, (call.x_lora.defined() ? call.x_lora : call.x).view({M, K}), call.lora_a.t());
  if (M == 0 || N == 0) return;
  fourbit::binding::run_core([&] {
    fourbit::gemm_4bit_cuda(fourbit::base_product_params(p), fourbit::binding::current_stream(),
                            fourbit::Gemm4bitAlgo::Gemv);
  });
  call.y.view({M, N}).addmm_(xa, call.lora_b.t(), 1.0, p.scaling);
}

void cuda_backward(const LoraBackwardCall& call) {
  const fourbit::Lora4bitBackwardParams& p = call.params;
  fourbit::binding::lora_backward_dense(call, [&] {
    return fourbit::binding::dequantized_weight(p.weight, p.dtype, call.grad_output.options());
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fourbit, CUDA, m) {
  fourbit::binding::register_lora_impls<fourbit::binding::DeviceGuard, &cuda_forward,
                                        &cuda_backward>(m);
}
