// CUDA impl of the LoRA ops. One dispatch rule, the one gemm_4bit uses:
//
//   M >= kCublasMinRows (training)  -> the weight dequantized once into a temporary, then
//                                      cuBLAS (through ATen) for every product; the adapter
//                                      terms accumulate into Y / dX in place (addmm_ with
//                                      beta = 1, alpha = scaling), so no [M, N] or [M, K]
//                                      temporary and no separate scale / add passes
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
  const int64_t M = p.M, N = p.weight.N, K = p.weight.K;
  const at::Tensor x = call.x.view({M, K});
  const at::Tensor x_lora = call.x_lora.defined() ? call.x_lora.view({M, K}) : x;
  at::Tensor xa = call.xa.view({M, p.r});
  at::mm_out(xa, x_lora, call.lora_a.t());
  if (N == 0) return;
  const at::Tensor w = fourbit::binding::dequantized_weight(p.weight, p.dtype, call.x.options());
  at::Tensor y = call.y.view({M, N});
  if (call.bias.defined()) {
    at::addmm_out(y, call.bias, x, w.t());
  } else {
    at::mm_out(y, x, w.t());
  }
  y.addmm_(xa, call.lora_b.t(), 1.0, p.scaling);
}

void cuda_backward(const LoraBackwardCall& call) {
  const fourbit::Lora4bitBackwardParams& p = call.params;
  if (p.M < fourbit::binding::kCublasMinRows) {
    fourbit::binding::run_core(
        [&] { fourbit::lora_4bit_backward_cuda(p, fourbit::binding::current_stream()); });
    return;
  }
  const int64_t M = p.M, N = p.weight.N, K = p.weight.K, r = p.r;
  const at::Tensor dy = call.grad_output.view({M, N});
  const bool adapter_into_dx = p.grad_input && !p.separate_lora_input;
  at::Tensor g;  // scaling * dY @ lora_B, [M, r]
  if (adapter_into_dx || p.grad_input_lora || p.grad_a) {
    g = at::mm(dy, call.lora_b).mul_(p.scaling);
  }
  if (p.grad_input && K > 0) {
    at::Tensor dx = call.grad_input.view({M, K});
    const at::Tensor w =
        fourbit::binding::dequantized_weight(p.weight, p.dtype, call.grad_output.options());
    at::mm_out(dx, dy, w);
    if (adapter_into_dx) dx.addmm_(g, call.lora_a);
  }
  if (p.grad_input_lora) {
    at::Tensor dxl = call.grad_input_lora.view({M, K});
    at::mm_out(dxl, g, call.lora_a);
  }
  if (p.grad_a) {
    at::Tensor da = call.grad_a;
    at::mm_out(da, g.t(), call.x_lora.view({M, K}));
  }
  if (p.grad_b) {
    at::Tensor db = call.grad_b;
    at::mm_out(db, dy.t(), call.xa.view({M, r}));
    db.mul_(p.scaling);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fourbit, CUDA, m) {
  fourbit::binding::register_lora_impls<fourbit::binding::DeviceGuard, &cuda_forward,
                                        &cuda_backward>(m);
}
