// fourbit::models: a Llama-family decoder (transformers' LlamaForCausalLM) on fourbit::nn, so a
// C++ program can load a transformers 4-bit Llama checkpoint (bitsandbytes' format, single file
// or sharded), put LoRA adapters on chosen projections, train them and save a PEFT adapter.
//
//   LlamaConfig        the fields of transformers' config.json this model uses, checked;
//   LlamaForCausalLM   embedding -> N x (RMSNorm, GQA causal attention with rotary embedding,
//                      RMSNorm, SwiGLU MLP, residuals) -> RMSNorm -> lm_head (tied or not);
//                      module and parameter names are transformers' ("model.layers.0.self_attn.
//                      q_proj", ...), so fourbit::io's checkpoint loader and PEFT adapter saver
//                      map its keys unchanged;
//   load_llama_4bit    config.json + checkpoint of a directory -> a loaded, frozen model.
//
// Every linear layer is a frozen fourbit::nn::Linear4bit, except those the checkpoint keeps in
// float (transformers leaves lm_head unquantized): those, the embedding and the norms are frozen
// float tensors of the model's dtype (float32 by default, or bfloat16 / float16), which is also
// the dtype the 4-bit layers compute in; norms take their variance in float32 and the logits are
// returned in float32, as transformers does. Inputs are full, unpadded sequences (no attention
// mask, no KV cache): this is a training forward.
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <functional>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "fourbit/torch/nn.h"

namespace fourbit {
namespace models {

// The fields of a transformers Llama config.json. from_json() requires hidden_size,
// intermediate_size, num_hidden_layers, num_attention_heads, vocab_size and rms_norm_eps; the
// others take transformers' defaults when absent. rope_theta is read from "rope_theta" or
// "rope_parameters": {"rope_type": "default", "rope_theta": ...} (transformers 5); any
// rope_scaling other than null, a rope_type other than "default", attention_bias or mlp_bias
// true, a hidden_act other than "silu" and a model_type other than "llama" are refused. Errors
// are c10::ValueError naming the file, the field and the value.
struct LlamaConfig {
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;  // 0: num_attention_heads (transformers' default)
  int64_t head_dim = 0;             // 0: hidden_size / num_attention_heads
  int64_t vocab_size = 0;
  int64_t max_position_embeddings = 2048;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  bool tie_word_embeddings = false;
  // quantization_config.bnb_4bit_compute_dtype: the dtype the 4-bit layers compute in (inputs
  // cast to it, outputs back), as bitsandbytes' Linear4bit does; unset: the activations' dtype.
  std::optional<::torch::Dtype> compute_dtype;

  static LlamaConfig from_json(const std::string& text, const std::string& source = "config.json");
  // `path`: a config.json file or a directory holding one.
  static LlamaConfig from_file(const std::string& path);
  // Fills the defaults (num_key_value_heads, head_dim) and checks the sizes (all > 0, heads
  // divisible by kv heads, head_dim even); the error names the field and value.
  LlamaConfig& finalize(const std::string& source = "LlamaConfig");
};

// A frozen float linear layer (transformers' nn.Linear left unquantized, e.g. lm_head):
// parameter "weight" [out, in], no bias.
class FrozenLinearImpl : public ::torch::nn::Module {
 public:
  FrozenLinearImpl(int64_t in_features, int64_t out_features);
  ::torch::Tensor forward(const ::torch::Tensor& x);
  ::torch::Tensor weight;
};
TORCH_MODULE(FrozenLinear);

// transformers' LlamaRMSNorm: weight * (x / sqrt(mean(x^2) + eps)), the variance in float32.
class RMSNormImpl : public ::torch::nn::Module {
 public:
  RMSNormImpl(int64_t hidden_size, double eps);
  ::torch::Tensor forward(const ::torch::Tensor& x);
  ::torch::Tensor weight;
  double eps;
};
TORCH_MODULE(RMSNorm);

// One projection of the model: a Linear4bit, the LoRA layer that replaced it, or a float
// FrozenLinear, registered in its owner under `name` (so its path is transformers').
class LinearSlot {
 public:
  LinearSlot() = default;
  // Registers a Linear4bit (quantized = true) or a FrozenLinear in `owner` as `name`.
  void init(::torch::nn::Module& owner, const std::string& name, int64_t in, int64_t out, bool quantized,
            std::optional<::torch::Dtype> compute_dtype = std::nullopt);
  ::torch::Tensor operator()(const ::torch::Tensor& x);
  // Replaces the Linear4bit with a LoraLinear4bit around it; refused for a float layer.
  void add_lora(const fourbit::nn::LoraOptions& options, const std::string& path);
  bool quantized() const { return !q.is_empty(); }
  bool has_lora() const { return !lora.is_empty(); }

  std::string name;
  fourbit::nn::Linear4bit q{nullptr};
  fourbit::nn::LoraLinear4bit lora{nullptr};
  FrozenLinear plain{nullptr};

 private:
  ::torch::nn::Module* owner_ = nullptr;
};

// Which linear layers are 4-bit: true for the path ("model.layers.0.self_attn.q_proj",
// "lm_head"). The default: all but lm_head, what transformers + bitsandbytes quantize.
using QuantizedPredicate = std::function<bool(const std::string& path)>;

class LlamaAttentionImpl : public ::torch::nn::Module {
 public:
  LlamaAttentionImpl(const LlamaConfig& config, const std::string& path, const QuantizedPredicate& quantized);
  // x [B, T, hidden], cos/sin [T, head_dim] -> [B, T, hidden]
  ::torch::Tensor forward(const ::torch::Tensor& x, const ::torch::Tensor& cos, const ::torch::Tensor& sin);
  LinearSlot q_proj, k_proj, v_proj, o_proj;
  int64_t num_heads, num_kv_heads, head_dim;
};
TORCH_MODULE(LlamaAttention);

class LlamaMLPImpl : public ::torch::nn::Module {
 public:
  LlamaMLPImpl(const LlamaConfig& config, const std::string& path, const QuantizedPredicate& quantized);
  ::torch::Tensor forward(const ::torch::Tensor& x);  // down(silu(gate(x)) * up(x))
  LinearSlot gate_proj, up_proj, down_proj;
};
TORCH_MODULE(LlamaMLP);

class LlamaDecoderLayerImpl : public ::torch::nn::Module {
 public:
  LlamaDecoderLayerImpl(const LlamaConfig& config, const std::string& path, const QuantizedPredicate& quantized);
  ::torch::Tensor forward(const ::torch::Tensor& x, const ::torch::Tensor& cos, const ::torch::Tensor& sin);
  RMSNorm input_layernorm{nullptr}, post_attention_layernorm{nullptr};
  LlamaAttention self_attn{nullptr};
  LlamaMLP mlp{nullptr};
};
TORCH_MODULE(LlamaDecoderLayer);

// transformers' LlamaModel: embed_tokens, layers, norm (the "model." part of the paths).
class LlamaModelImpl : public ::torch::nn::Module {
 public:
  LlamaModelImpl(const LlamaConfig& config, const QuantizedPredicate& quantized);
  ::torch::Tensor forward(const ::torch::Tensor& input_ids);  // [B, T] int64 -> hidden [B, T, H]
  ::torch::nn::Embedding embed_tokens{nullptr};
  ::torch::nn::ModuleList layers{nullptr};
  std::vector<LlamaDecoderLayer> decoder_layers;
  RMSNorm norm{nullptr};
  // cos and sin [T, head_dim] of the rotary embedding for positions 0..T-1 (rotate_half layout:
  // the frequencies repeated twice), in float32 on `device`.
  std::pair<::torch::Tensor, ::torch::Tensor> rotary(int64_t seq_len, const ::torch::Device& device) const;

 private:
  LlamaConfig config_;
};
TORCH_MODULE(LlamaModel);

struct CausalLMOutput {
  ::torch::Tensor logits;  // [B, T, vocab_size], float32
  ::torch::Tensor loss;    // scalar; undefined without labels
};

class LlamaForCausalLMImpl : public ::torch::nn::Module {
 public:
  // dtype: of the float weights and of the activations (float32, bfloat16 or float16).
  // The 4-bit layers start all zero (Linear4bitOptions::init_weight(false)): load a
  // checkpoint into the model (load_llama_4bit does both).
  explicit LlamaForCausalLMImpl(const LlamaConfig& config, QuantizedPredicate quantized = nullptr,
                                ::torch::Dtype dtype = ::torch::kFloat32);

  // input_ids [B, T] (int64, values in [0, vocab_size), 1 <= T <= max_position_embeddings).
  // labels [B, T] (int64; -100 = ignored): the loss is transformers' causal-LM loss, the mean
  // cross entropy of logits[:, t] against labels[:, t + 1] over the labels that are not -100.
  CausalLMOutput forward(const ::torch::Tensor& input_ids, const std::optional<::torch::Tensor>& labels = std::nullopt);

  // Puts a LoRA adapter on every 4-bit projection whose name is in `targets` ("q_proj",
  // "v_proj", ...; "all-linear": every projection of the decoder layers, as PEFT's
  // all-linear, which leaves lm_head out). A target that names no layer, or a float layer, is
  // refused. Returns the trainable parameters (lora_A, lora_B of every adapter).
  std::vector<::torch::Tensor> add_lora(const std::vector<std::string>& targets, const fourbit::nn::LoraOptions& options);

  // Every projection with its path (lm_head last unless tied).
  std::vector<std::pair<std::string, LinearSlot*>> linear_layers();

  const LlamaConfig& config() const { return config_; }
  ::torch::Dtype dtype() const { return dtype_; }
  LlamaModel model{nullptr};
  LinearSlot lm_head;  // unused (nothing registered) when tie_word_embeddings

 private:
  LlamaConfig config_;
  ::torch::Dtype dtype_;
};
TORCH_MODULE(LlamaForCausalLM);

// Builds the model of `directory`/config.json and loads its checkpoint (model.safetensors or a
// sharded model.safetensors.index.json) strictly: a linear layer is 4-bit where the checkpoint
// holds its bitsandbytes quant state (P.weight.quant_state.bitsandbytes__nf4 / __fp4), float
// otherwise. Float weights are cast to `dtype` (the model's compute dtype). Every parameter is
// frozen; add adapters with add_lora().
LlamaForCausalLM load_llama_4bit(const std::string& directory, ::torch::Dtype dtype = ::torch::kFloat32);

}  // namespace models
}  // namespace fourbit
