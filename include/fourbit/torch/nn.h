// fourbit::nn: libtorch modules for QLoRA, calling torch.ops.fourbit.* through the dispatcher.
//
//   Linear4bit      a linear layer whose weight is frozen in 4 bits (NF4/FP4, blockwise, with
//                   optional double quantization), bitsandbytes' bytes and quant state;
//   LoraLinear4bit  a Linear4bit base (frozen) plus a trainable LoRA adapter (lora_A [r, in],
//                   lora_B [out, r]), PEFT's math: y = base(x) + scaling * B(A(dropout(x))).
//
// Gradients reach the input, the bias (when it requires grad) and the adapter through
// torch::autograd::Function (the fused ops gemm_4bit_grad_input / lora_4bit_backward); the
// 4-bit weight never has a gradient. Checkpoints and adapters: serialize.h.
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <cstdint>
#include <optional>
#include <string>

namespace fourbit {
namespace nn {

struct Linear4bitOptions {
  Linear4bitOptions(int64_t in_features, int64_t out_features)
      : in_features_(in_features), out_features_(out_features) {}
  TORCH_ARG(int64_t, in_features);
  TORCH_ARG(int64_t, out_features);
  // Whether the layer has a bias (a float parameter, frozen unless set to require grad).
  TORCH_ARG(bool, bias) = true;
  // "nf4" (QLoRA's choice) or "fp4".
  TORCH_ARG(std::string, quant_type) = "nf4";
  // Elements per absmax block: 32, 64, ..., 4096.
  TORCH_ARG(int64_t, blocksize) = 64;
  // Double quantization of absmax (uint8 codes in blocks of 256 plus an fp32 offset).
  TORCH_ARG(bool, compress_statistics) = true;
  // Dtype of the product; unset: the input's dtype. Inputs are cast to it, outputs back.
  TORCH_ARG(std::optional<::torch::Dtype>, compute_dtype) = std::nullopt;
  // true: draw a weight as torch::nn::Linear does and quantize it. false: draw nothing; the
  // layer holds zero codes and zero scales (an all-zero weight, zero bias) in the format above
  // until quantize_, load_quantized or a checkpoint load fills it. Building a model only to
  // load a checkpoint into then costs an allocation per layer, not a float weight and its
  // quantization (an 8B model's worth of both).
  TORCH_ARG(bool, init_weight) = true;
};

// The non-tensor fields of a 4-bit weight's quant state (bitsandbytes' QuantState).
struct QuantState4bit {
  std::string quant_type = "nf4";
  int64_t blocksize = 64;
  ::torch::Dtype dtype = ::torch::kFloat32;  // the float dtype the weight was quantized from
  bool nested = false;
  int64_t nested_blocksize = 256;
  double nested_offset = 0.0;
};

class Linear4bitImpl : public ::torch::nn::Module {
 public:
  // A layer with a weight drawn as torch::nn::Linear draws it (Kaiming-uniform), quantized;
  // with options.init_weight(false), an all-zero 4-bit weight to load into.
  explicit Linear4bitImpl(const Linear4bitOptions& options);
  Linear4bitImpl(int64_t in_features, int64_t out_features)
      : Linear4bitImpl(Linear4bitOptions(in_features, out_features)) {}

  // Quantizes `weight` ([out_features, in_features], float32/float16/bfloat16, on the layer's
  // device) into the layer with its options' format; copies `bias` if given.
  void quantize_(const ::torch::Tensor& weight, const std::optional<::torch::Tensor>& bias = std::nullopt);

  // Installs an already quantized weight (bitsandbytes' tensors, as in a checkpoint): packed
  // bytes, absmax (fp32, or uint8 when state.nested), and when nested the fp32 nested absmax
  // and 256-entry nested code. Every size is checked against the layer's shape; an error
  // names the tensor and the bad value.
  void load_quantized(const ::torch::Tensor& packed, const ::torch::Tensor& absmax,
                      const QuantState4bit& state, const std::optional<::torch::Tensor>& nested_absmax,
                      const std::optional<::torch::Tensor>& nested_code);

  // y = x @ deq(W)^T + bias, x of shape [..., in_features].
  ::torch::Tensor forward(const ::torch::Tensor& x);

  // The weight dequantized to `dtype` ([out_features, in_features]).
  ::torch::Tensor dequantize(::torch::Dtype dtype = ::torch::kFloat32) const;

  const Linear4bitOptions& options() const { return options_; }
  const QuantState4bit& quant_state() const { return state_; }
  // The tensors of the quant state (buffers of the module, so .to(device) moves them):
  const ::torch::Tensor& weight() const { return weight_; }        // packed uint8 [(n+1)/2, 1]
  const ::torch::Tensor& absmax() const { return absmax_; }        // fp32, or uint8 when nested
  const ::torch::Tensor& quant_map() const { return quant_map_; }  // the 16-value codebook
  const ::torch::Tensor& nested_absmax() const { return nested_absmax_; }      // empty unless nested
  const ::torch::Tensor& nested_quant_map() const { return nested_quant_map_; }  // empty unless nested
  const ::torch::Tensor& nested_offset() const { return offset_; }  // fp32 scalar (0 unless nested)
  const ::torch::Tensor& bias() const { return bias_; }            // undefined without bias

  void pretty_print(std::ostream& stream) const override;

  // (Internal) x and bias in the compute dtype, and the input's dtype: shared with LoRA.
  struct Prepared {
    ::torch::Tensor x;
    std::optional<::torch::Tensor> bias;
    ::torch::Dtype input_dtype;
  };
  Prepared prepare(const ::torch::Tensor& x) const;

 private:
  void set_buffers(const ::torch::Tensor& packed, const ::torch::Tensor& absmax,
                   const std::optional<::torch::Tensor>& nested_absmax,
                   const std::optional<::torch::Tensor>& nested_code);

  Linear4bitOptions options_;
  QuantState4bit state_;
  ::torch::Tensor weight_, absmax_, quant_map_, nested_absmax_, nested_quant_map_, offset_, bias_;
};
TORCH_MODULE(Linear4bit);

struct LoraOptions {
  LoraOptions(int64_t r = 8) : r_(r) {}
  TORCH_ARG(int64_t, r);                 // adapter rank, >= 1
  TORCH_ARG(double, lora_alpha) = 8.0;   // scaling = lora_alpha / r (or / sqrt(r) with rslora)
  TORCH_ARG(double, lora_dropout) = 0.0; // dropout on the adapter's input, in [0, 1)
  TORCH_ARG(bool, use_rslora) = false;
  // PEFT's init: Kaiming-uniform lora_A and zero lora_B (the adapter starts as a no-op).
  // false: lora_B drawn like lora_A (for tests: a non-trivial adapter).
  TORCH_ARG(bool, init_lora_weights) = true;
  TORCH_ARG(::torch::Dtype, dtype) = ::torch::kFloat32;  // adapter weights' dtype
};

class LoraLinear4bitImpl : public ::torch::nn::Module {
 public:
  // Wraps `base` (registered as "base_layer"; its parameters are frozen) with an adapter
  // (parameters "lora_A" and "lora_B", the only trainable ones).
  LoraLinear4bitImpl(Linear4bit base, const LoraOptions& options);

  ::torch::Tensor forward(const ::torch::Tensor& x);

  // deq(W) + scaling * lora_B @ lora_A, computed in fp32, returned in `dtype`.
  ::torch::Tensor merged_weight(::torch::Dtype dtype = ::torch::kFloat32) const;

  const LoraOptions& options() const { return options_; }
  double scaling() const { return scaling_; }
  const Linear4bit& base_layer() const { return base_; }
  Linear4bit& base_layer() { return base_; }
  ::torch::Tensor& lora_A() { return lora_A_; }
  ::torch::Tensor& lora_B() { return lora_B_; }

  void pretty_print(std::ostream& stream) const override;

 private:
  LoraOptions options_;
  double scaling_;
  Linear4bit base_;
  ::torch::Tensor lora_A_, lora_B_;
};
TORCH_MODULE(LoraLinear4bit);

// Every trainable parameter of `module` that belongs to a LoRA adapter (what an optimizer gets).
std::vector<::torch::Tensor> lora_parameters(const ::torch::nn::Module& module);

}  // namespace nn
}  // namespace fourbit
