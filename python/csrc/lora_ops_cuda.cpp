// CUDA impl of the LoRA ops. One dispatch rule, the one gemm_4bit uses:
//
//   M >= kCublasMinRows (training)  -> the weight dequantized once into a temporary, then
//                                      lora_forward_dense / lora_backward_dense
//                                      (lora_ops.cpp, shared with the CPU): cuBLAS through
//                                      ATen for every product
//   smaller M                       -> the core (cuda/lora_4bit.cu): the 4-bit gemv / tiled
//                                      kernels plus the small adapter GEMMs
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
  if (p.M < fourbit::binding::kCublasMinRows) {
    fourbit::binding::run_core(
        [&] { fourbit::lora_4bit_forward_cuda(p, fourbit::binding::current_stream()); });
    return;
  }
  fourbit::binding::lora_forward_dense(call, [&] {
    return fourbit::binding::dequantized_weight(p.weight, p.dtype, call.x.options());
  });
}

void cuda_backward(const LoraBackwardCall& call) {
  const fourbit::Lora4bitBackwardParams& p = call.params;
  if (p.M < fourbit::binding::kCublasMinRows) {
    fourbit::binding::run_core(
        [&] { fourbit::lora_4bit_backward_cuda(p, fourbit::binding::current_stream()); });
    return;
  }
  fourbit::binding::lora_backward_dense(call, [&] {
    return fourbit::binding::dequantized_weight(p.weight, p.dtype, call.grad_output.options());
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fourbit, CUDA, m) {
  fourbit::binding::register_lora_impls<fourbit::binding::DeviceGuard, &cuda_forward,
                                        &cuda_backward>(m);
}
