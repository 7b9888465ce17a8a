// fourbit::optim: AdamW with 32-bit or 8-bit blockwise states, optionally paged, as
// torch::optim::Optimizers (C++ twins of fourbit.optim.AdamW / AdamW8bit / PagedAdamW8bit).
//
// A step runs one torch.ops.fourbit.adamw_step per parameter group and device (the fused
// multi-tensor kernel Python uses), so C++ and Python training give the same numbers.
// State per parameter: step, state1/state2 (fp32, or uint8 codes for 8-bit states) and, for
// 8-bit states, absmax1/absmax2 (fp32, one per 256 elements); tensors with fewer than
// min_8bit_size elements keep 32-bit states, as bitsandbytes does. Paged optimizers allocate
// the states of tensors with >= 100000 elements from fourbit's page manager (CUDA managed
// memory; plain host memory on the CPU). save()/load() write and read every state and
// hyper-parameter through torch::serialize archives (torch::save(optimizer, path)).
#pragma once

#include <torch/optim/optimizer.h>
#include <torch/serialize/archive.h>
#include <torch/types.h>

#include <tuple>
#include <vector>

namespace fourbit {
namespace optim {

struct AdamWOptions : public ::torch::optim::OptimizerCloneableOptions<AdamWOptions> {
  AdamWOptions(double lr = 1e-3) : lr_(lr) {}
  TORCH_ARG(double, lr);
  TORCH_ARG(double, beta1) = 0.9;
  TORCH_ARG(double, beta2) = 0.999;
  TORCH_ARG(double, eps) = 1e-8;
  TORCH_ARG(double, weight_decay) = 1e-2;

 public:
  // Throws c10::ValueError naming the bad hyper-parameter (lr < 0, betas outside [0, 1), ...).
  void check() const;
  void serialize(::torch::serialize::InputArchive& archive) override;
  void serialize(::torch::serialize::OutputArchive& archive) const override;
  double get_lr() const override { return lr(); }
  void set_lr(const double lr) override { this->lr(lr); }
};

struct AdamWParamState : public ::torch::optim::OptimizerCloneableParamState<AdamWParamState> {
  TORCH_ARG(int64_t, step) = 0;
  TORCH_ARG(::torch::Tensor, state1);
  TORCH_ARG(::torch::Tensor, state2);
  TORCH_ARG(::torch::Tensor, absmax1);  // 8-bit states only
  TORCH_ARG(::torch::Tensor, absmax2);  // 8-bit states only
};

// AdamW with 32-bit states (optim_bits = 32) or 8-bit ones (optim_bits = 8).
class AdamW : public ::torch::optim::Optimizer {
 public:
  explicit AdamW(const std::vector<::torch::optim::OptimizerParamGroup>& param_groups,
                 AdamWOptions defaults = {}, int optim_bits = 32, int64_t min_8bit_size = 4096,
                 bool is_paged = false);
  explicit AdamW(std::vector<::torch::Tensor> params, AdamWOptions defaults = {}, int optim_bits = 32,
                 int64_t min_8bit_size = 4096, bool is_paged = false)
      : AdamW({::torch::optim::OptimizerParamGroup(std::move(params))}, std::move(defaults), optim_bits,
              min_8bit_size, is_paged) {}

  ::torch::Tensor step(LossClosure closure = nullptr) override;
  void save(::torch::serialize::OutputArchive& archive) const override;
  // Checks everything first (counts, each state's dtype and shape, hyper-parameters), then
  // replaces the state; a bad archive throws c10::ValueError naming the entry and leaves the
  // optimizer as it was.
  void load(::torch::serialize::InputArchive& archive) override;

  int optim_bits() const { return optim_bits_; }
  int64_t min_8bit_size() const { return min_8bit_size_; }
  bool is_paged() const { return is_paged_; }
  // The state of `param` (nullptr before its first step).
  const AdamWParamState* state_of(const ::torch::Tensor& param) const;

 private:
  bool uses_8bit(const ::torch::Tensor& p) const;
  ::torch::Tensor buffer(const ::torch::Tensor& p, ::torch::Dtype dtype) const;
  const std::pair<::torch::Tensor, ::torch::Tensor>& qmaps(const ::torch::Device& device);

  int optim_bits_;
  int64_t min_8bit_size_;
  bool is_paged_;
  std::vector<std::pair<::torch::Device, std::pair<::torch::Tensor, ::torch::Tensor>>> qmaps_;
};

// AdamW with 8-bit blockwise states (bitsandbytes.optim.AdamW8bit).
class AdamW8bit : public AdamW {
 public:
  explicit AdamW8bit(std::vector<::torch::Tensor> params, AdamWOptions defaults = {}, int64_t min_8bit_size = 4096)
      : AdamW(std::move(params), std::move(defaults), 8, min_8bit_size, false) {}
};

// AdamW with paged 8-bit blockwise states (bitsandbytes.optim.PagedAdamW8bit).
class PagedAdamW8bit : public AdamW {
 public:
  explicit PagedAdamW8bit(std::vector<::torch::Tensor> params, AdamWOptions defaults = {},
                          int64_t min_8bit_size = 4096)
      : AdamW(std::move(params), std::move(defaults), 8, min_8bit_size, true) {}
};

}  // namespace optim
}  // namespace fourbit
