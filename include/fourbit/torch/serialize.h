// Checkpoint and adapter I/O for fourbit::nn module trees.
//
// A 4-bit checkpoint is bitsandbytes' format, as transformers saves a 4-bit model: for each
// Linear4bit at module path P, the tensors
//   P.weight (uint8 packed codes), P.weight.absmax, P.weight.quant_map,
//   P.weight.nested_absmax, P.weight.nested_quant_map (double quantization only),
//   P.weight.quant_state.bitsandbytes__nf4 (or __fp4: uint8 bytes of the JSON holding
//     quant_type, blocksize, dtype, shape and the nested_* fields), and P.bias;
// every other parameter and buffer of the tree under its own path. A LoRA layer's base is
// read from P (PEFT's P.base_layer is accepted as the same module).
//
// A PEFT adapter is a directory with adapter_model.safetensors (for each LoraLinear4bit at
// path P: base_model.model.P.lora_A.weight [r, in], base_model.model.P.lora_B.weight [out, r])
// and adapter_config.json (peft_type LORA, r, lora_alpha, lora_dropout, use_rslora,
// target_modules = the LoRA paths), which peft.PeftModel.from_pretrained loads.
#pragma once

#include <torch/nn/module.h>

#include <string>

#include "fourbit/torch/safetensors.h"

namespace fourbit {
namespace io {

// Loads a 4-bit checkpoint into `model`: a .safetensors file, a transformers sharded
// checkpoint's model.safetensors.index.json, or a directory holding either (see checkpoint.h;
// shards are mapped one at a time and each tensor copied straight into its layer, so the load
// holds the model plus one shard's mapping and one layer's tensors). `prefix` is prepended to
// the module paths to form the checkpoint's keys (e.g. "model." for a transformers checkpoint
// whose tree is wrapped). strict: every tensor of the model must be in the checkpoint and
// every key of it under `prefix` must be used. Errors (c10::ValueError) name the key and the
// value (and the index and shard file for a bad index).
void load_4bit_checkpoint(::torch::nn::Module& model, const std::string& path, bool strict = true,
                          const std::string& prefix = "");
void load_4bit_state_dict(::torch::nn::Module& model, const TensorMap& tensors, bool strict = true,
                          const std::string& prefix = "");

// The model's base tensors in that format (LoRA adapters left out), and a file of them.
TensorMap state_dict_4bit(const ::torch::nn::Module& model, const std::string& prefix = "");
void save_4bit_checkpoint(const ::torch::nn::Module& model, const std::string& path, const std::string& prefix = "");

// Writes the LoRA adapters of `model` as a PEFT adapter directory (created if missing). Every
// adapter must share r, lora_alpha, lora_dropout and use_rslora (one LoraConfig).
void save_peft_adapter(const ::torch::nn::Module& model, const std::string& directory,
                       const std::string& base_model_name_or_path = "");

// Loads a PEFT adapter directory into the LoraLinear4bit layers of `model` (which must exist at
// the adapter's paths, with its r and scaling); errors name the file, key and value.
void load_peft_adapter(::torch::nn::Module& model, const std::string& directory);

}  // namespace io
}  // namespace fourbit
