// CUDA impls of the optimizer ops (schemas and checks: optim_ops.cpp): one multi-tensor
// kernel launch per adamw_step call, on the current stream of the params' device; and the
// page manager's prefetch on that stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "fourbit/paging.h"
#include "optim_ops.h"

namespace fourbit {
namespace binding {
namespace {

void adamw_step_cuda_impl(at::TensorList params, at::TensorList grads, at::TensorList state1,
                          at::TensorList state2, at::TensorList absmax1, at::TensorList absmax2,
                          const at::Tensor& qmap1, const at::Tensor& qmap2, at::IntArrayRef steps,
                          double lr, double beta1, double beta2, double eps, double weight_decay) {
  if (params.empty()) return;
  TORCH_CHECK_VALUE(params[0].is_cuda(), "adamw_step: params[0] must be a CUDA tensor, got ",
                    params[0].device());
  AdamWTable table = build_adamw_table(params, grads, state1, state2, absmax1, absmax2, qmap1, qmap2,
                                       steps, lr, beta1, beta2, eps, weight_decay);
  c10::cuda::CUDAGuard guard(params[0].device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  run_optim_core([&] { adamw_step_cuda(table.params, stream); });
}

// Prefetches page-manager buffers to `device` (cpu: evict to the host); other tensors are
// skipped (they do not move).
void paged_prefetch_cuda(at::TensorList tensors, c10::Device device) {
  TORCH_CHECK_VALUE(device.is_cpu() || device.is_cuda(), "paged_prefetch: device must be cpu or cuda, got ",
                    device);
  if (tensors.empty()) return;
  c10::cuda::CUDAGuard guard(tensors[0].device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int target = device.is_cpu() ? kHostDevice : (device.has_index() ? device.index() : tensors[0].get_device());
  auto& pm = PageManager::instance();
  run_optim_core([&] {
    for (const at::Tensor& t : tensors) {
      const void* base = t.storage().data();
      if (!pm.owns(base)) continue;
      pm.prefetch(base, static_cast<int64_t>(t.storage().nbytes()), target, stream);
    }
  });
}

}  // namespace
}  // namespace binding
}  // namespace fourbit

TORCH_LIBRARY_IMPL(fourbit, CUDA, m) {
  m.impl("adamw_step", TORCH_FN(fourbit::binding::adamw_step_cuda_impl));
  m.impl("paged_prefetch", TORCH_FN(fourbit::binding::paged_prefetch_cuda));
}
