// Device-independent half of the optimizer ops (src/torch/optim_ops.cpp): argument checks
// (ValueError naming the argument and value) and the tensors -> core table translation,
// shared by the CPU and CUDA impls.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "fourbit/optim.h"

namespace fourbit {
namespace binding {

// A checked multi-tensor AdamW table; `params.tensors` points into `tensors`.
struct AdamWTable {
  std::vector<AdamWTensor> tensors;
  AdamWMultiTensorParams params;
};

AdamWTable build_adamw_table(at::TensorList params, at::TensorList grads, at::TensorList state1,
                             at::TensorList state2, at::TensorList absmax1,
                             at::TensorList absmax2, const at::Tensor& qmap1,
                             const at::Tensor& qmap2, at::IntArrayRef steps, double lr,
                             double beta1, double beta2, double eps, double weight_decay);

// Runs a core call, turning fourbit::Error into ValueError (InvalidArgument) or RuntimeError.
void run_optim_core(const std::function<void()>& fn);

}  // namespace binding
}  // namespace fourbit
