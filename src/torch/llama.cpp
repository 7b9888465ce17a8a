// fourbit::models (include/fourbit/torch/llama.h): transformers' Llama decoder on fourbit::nn.
// The semantics follow transformers' modeling_llama (RMSNorm with a float32 variance, rotary
// embedding in the rotate_half layout, grouped-query causal attention through
// at::scaled_dot_product_attention, SwiGLU MLP, pre-norm residual blocks, shifted causal-LM
// loss); the config is read with nlohmann-json.
#include "fourbit/torch/llama.h"

#include <c10/util/Exception.h>
#include <torch/nn/functional/loss.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>

#include "fourbit/torch/checkpoint.h"
#include "fourbit/torch/serialize.h"

namespace fourbit {
namespace models {
namespace {

using ::torch::Tensor;
using json = nlohmann::json;
namespace fnn = fourbit::nn;

constexpr int64_t kIgnoreIndex = -100;  // transformers' (and PEFT's) label to ignore

int64_t required_int(const json& j, const char* field, const std::string& source) {
  TORCH_CHECK_VALUE(j.contains(field) && !j[field].is_null(), source, ": missing field '", field, "'");
  TORCH_CHECK_VALUE(j[field].is_number_integer(), source, ": field '", field, "' must be an integer, got ",
                    j[field].dump());
  return j[field].get<int64_t>();
}

int64_t optional_int(const json& j, const char* field, int64_t fallback, const std::string& source) {
  if (!j.contains(field) || j[field].is_null()) return fallback;
  return required_int(j, field, source);
}

double number(const json& j, const char* field, const std::string& source) {
  TORCH_CHECK_VALUE(j[field].is_number(), source, ": field '", field, "' must be a number, got ", j[field].dump());
  return j[field].get<double>();
}

bool optional_bool(const json& j, const char* field, bool fallback, const std::string& source) {
  if (!j.contains(field) || j[field].is_null()) return fallback;
  TORCH_CHECK_VALUE(j[field].is_boolean(), source, ": field '", field, "' must be true or false, got ",
                    j[field].dump());
  return j[field].get<bool>();
}

// Refuses `field` unless it is absent or equals one of `fine`.
void require_value(const json& j, const char* field, std::initializer_list<json> fine, const std::string& source,
                   const char* why) {
  if (!j.contains(field)) return;
  for (const auto& f : fine) {
    if (j[field] == f) return;
  }
  TORCH_CHECK_VALUE(false, source, ": field '", field, "' = ", j[field].dump(), " is not supported (", why, ")");
}

std::string read_text(const std::string& path) {
  std::ifstream in(path);
  TORCH_CHECK_VALUE(in.good(), "cannot open Llama config '", path, "'");
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// x = [x1, x2] (halves of the last dimension) -> [-x2, x1]
Tensor rotate_half(const Tensor& x) {
  const int64_t half = x.size(-1) / 2;
  return ::torch::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
}

}  // namespace

// ---------------------------------------------------------------------------- LlamaConfig

LlamaConfig LlamaConfig::from_json(const std::string& text, const std::string& source) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    TORCH_CHECK_VALUE(false, source, " is not valid JSON: ", e.what());
  }
  TORCH_CHECK_VALUE(j.is_object(), source, " must hold a JSON object, got ", j.dump());
  require_value(j, "model_type", {"llama"}, source, "this model is transformers' Llama");
  require_value(j, "hidden_act", {"silu"}, source, "the MLP is SwiGLU");
  require_value(j, "attention_bias", {false}, source, "the projections have no bias");
  require_value(j, "mlp_bias", {false}, source, "the projections have no bias");
  require_value(j, "rope_scaling", {nullptr}, source, "only plain rotary embedding: rope_scaling must be null");
  require_value(j, "pretraining_tp", {1}, source, "tensor-parallel pretraining layout");
  if (j.contains("attention_dropout") && !(j["attention_dropout"].is_number() && j["attention_dropout"] == 0)) {
    TORCH_CHECK_VALUE(false, source, ": field 'attention_dropout' = ", j["attention_dropout"].dump(),
                      " is not supported (attention has no dropout here; use 0.0)");
  }

  LlamaConfig c;
  c.hidden_size = required_int(j, "hidden_size", source);
  c.intermediate_size = required_int(j, "intermediate_size", source);
  c.num_hidden_layers = required_int(j, "num_hidden_layers", source);
  c.num_attention_heads = required_int(j, "num_attention_heads", source);
  c.num_key_value_heads = optional_int(j, "num_key_value_heads", 0, source);
  c.head_dim = optional_int(j, "head_dim", 0, source);
  c.vocab_size = required_int(j, "vocab_size", source);
  c.max_position_embeddings = optional_int(j, "max_position_embeddings", c.max_position_embeddings, source);
  TORCH_CHECK_VALUE(j.contains("rms_norm_eps"), source, ": missing field 'rms_norm_eps'");
  c.rms_norm_eps = number(j, "rms_norm_eps", source);
  c.tie_word_embeddings = optional_bool(j, "tie_word_embeddings", false, source);

  // transformers < 5: "rope_theta" (+ "rope_scaling"); transformers 5: "rope_parameters".
  if (j.contains("rope_parameters") && !j["rope_parameters"].is_null()) {
    const json& rp = j["rope_parameters"];
    const std::string where = source + ": field 'rope_parameters'";
    TORCH_CHECK_VALUE(rp.is_object(), where, " must be an object, got ", rp.dump());
    if (rp.contains("rope_type")) {
      TORCH_CHECK_VALUE(rp["rope_type"] == "default", source, ": field 'rope_parameters.rope_type' = ",
                        rp["rope_type"].dump(), " is not supported (only \"default\" rotary embedding)");
    }
    for (const auto& [key, value] : rp.items()) {
      TORCH_CHECK_VALUE(key == "rope_type" || key == "rope_theta", source, ": field 'rope_parameters.", key,
                        "' = ", value.dump(), " is not supported (only rope_type \"default\" and rope_theta)");
    }
    if (rp.contains("rope_theta")) c.rope_theta = number(rp, "rope_theta", source + " rope_parameters");
  } else if (j.contains("rope_theta")) {
    c.rope_theta = number(j, "rope_theta", source);
  }
  if (j.contains("quantization_config") && j["quantization_config"].is_object()) {
    const json& qc = j["quantization_config"];
    if (qc.contains("bnb_4bit_compute_dtype") && !qc["bnb_4bit_compute_dtype"].is_null()) {
      const json& v = qc["bnb_4bit_compute_dtype"];
      if (v == "float32") {
        c.compute_dtype = ::torch::kFloat32;
      } else if (v == "bfloat16") {
        c.compute_dtype = ::torch::kBFloat16;
      } else if (v == "float16") {
        c.compute_dtype = ::torch::kFloat16;
      } else {
        TORCH_CHECK_VALUE(false, source, ": field 'quantization_config.bnb_4bit_compute_dtype' = ", v.dump(),
                          " is not supported (\"float32\", \"bfloat16\" or \"float16\")");
      }
    }
  }
  TORCH_CHECK_VALUE(std::isfinite(c.rope_theta) && c.rope_theta > 0, source, ": field 'rope_theta' must be > 0, got ",
                    c.rope_theta);
  c.finalize(source);
  return c;
}

LlamaConfig LlamaConfig::from_file(const std::string& path) {
  std::error_code ec;
  const std::string file =
      std::filesystem::is_directory(path, ec) ? (std::filesystem::path(path) / "config.json").string() : path;
  return from_json(read_text(file), "Llama config '" + file + "'");
}

LlamaConfig& LlamaConfig::finalize(const std::string& source) {
  auto positive = [&](const char* field, int64_t v) {
    TORCH_CHECK_VALUE(v > 0, source, ": field '", field, "' must be > 0, got ", v);
  };
  positive("hidden_size", hidden_size);
  positive("intermediate_size", intermediate_size);
  positive("num_hidden_layers", num_hidden_layers);
  positive("num_attention_heads", num_attention_heads);
  positive("vocab_size", vocab_size);
  positive("max_position_embeddings", max_position_embeddings);
  TORCH_CHECK_VALUE(std::isfinite(rms_norm_eps) && rms_norm_eps > 0, source, ": field 'rms_norm_eps' must be > 0, got ",
                    rms_norm_eps);
  if (num_key_value_heads == 0) num_key_value_heads = num_attention_heads;
  positive("num_key_value_heads", num_key_value_heads);
  TORCH_CHECK_VALUE(num_attention_heads % num_key_value_heads == 0, source, ": field 'num_attention_heads' (",
                    num_attention_heads, ") must be a multiple of 'num_key_value_heads' (", num_key_value_heads, ")");
  if (head_dim == 0) {
    TORCH_CHECK_VALUE(hidden_size % num_attention_heads == 0, source, ": field 'hidden_size' (", hidden_size,
                      ") must be a multiple of 'num_attention_heads' (", num_attention_heads,
                      ") when 'head_dim' is not given");
    head_dim = hidden_size / num_attention_heads;
  }
  positive("head_dim", head_dim);
  TORCH_CHECK_VALUE(head_dim % 2 == 0, source, ": field 'head_dim' must be even (rotary embedding), got ", head_dim);
  return *this;
}

// ---------------------------------------------------------------------------- small modules

FrozenLinearImpl::FrozenLinearImpl(int64_t in_features, int64_t out_features) {
  weight = register_parameter("weight", ::torch::zeros({out_features, in_features}), /*requires_grad=*/false);
}

Tensor FrozenLinearImpl::forward(const Tensor& x) { return ::torch::nn::functional::linear(x, weight); }

RMSNormImpl::RMSNormImpl(int64_t hidden_size, double eps_) : eps(eps_) {
  weight = register_parameter("weight", ::torch::ones({hidden_size}), /*requires_grad=*/false);
}

Tensor RMSNormImpl::forward(const Tensor& x) {
  const Tensor h = x.to(::torch::kFloat32);
  const Tensor variance = h.pow(2).mean(-1, /*keepdim=*/true);
  return weight * (h * ::torch::rsqrt(variance + eps)).to(x.scalar_type());
}

void LinearSlot::init(::torch::nn::Module& owner, const std::string& name_, int64_t in, int64_t out, bool quantized,
                      std::optional<::torch::Dtype> compute_dtype) {
  owner_ = &owner;
  name = name_;
  if (quantized) {
    q = owner.register_module(
        name, fnn::Linear4bit(fnn::Linear4bitOptions(in, out).bias(false).compute_dtype(compute_dtype).init_weight(false)));
  } else {
    plain = owner.register_module(name, FrozenLinear(in, out));
  }
}

Tensor LinearSlot::operator()(const Tensor& x) {
  if (!lora.is_empty()) return lora(x);
  if (!q.is_empty()) return q(x);
  return plain(x);
}

void LinearSlot::add_lora(const fnn::LoraOptions& options, const std::string& path) {
  TORCH_CHECK_VALUE(!q.is_empty(), "add_lora: target '", path,
                    "' is a float layer (not quantized in the checkpoint); LoRA goes on Linear4bit layers only");
  TORCH_CHECK_VALUE(lora.is_empty(), "add_lora: '", path, "' already has a LoRA adapter");
  lora = owner_->replace_module(name, fnn::LoraLinear4bit(q, options));
}

// ---------------------------------------------------------------------------- decoder

LlamaAttentionImpl::LlamaAttentionImpl(const LlamaConfig& c, const std::string& path, const QuantizedPredicate& quantized)
    : num_heads(c.num_attention_heads), num_kv_heads(c.num_key_value_heads), head_dim(c.head_dim) {
  const int64_t H = c.hidden_size;
  q_proj.init(*this, "q_proj", H, num_heads * head_dim, quantized(path + ".q_proj"), c.compute_dtype);
  k_proj.init(*this, "k_proj", H, num_kv_heads * head_dim, quantized(path + ".k_proj"), c.compute_dtype);
  v_proj.init(*this, "v_proj", H, num_kv_heads * head_dim, quantized(path + ".v_proj"), c.compute_dtype);
  o_proj.init(*this, "o_proj", num_heads * head_dim, H, quantized(path + ".o_proj"), c.compute_dtype);
}

Tensor LlamaAttentionImpl::forward(const Tensor& x, const Tensor& cos, const Tensor& sin) {
  const int64_t B = x.size(0), T = x.size(1);
  // [B, T, heads * D] -> [B, heads, T, D]
  auto heads = [&](const Tensor& t, int64_t n) { return t.view({B, T, n, head_dim}).transpose(1, 2); };
  Tensor q = heads(q_proj(x), num_heads), k = heads(k_proj(x), num_kv_heads), v = heads(v_proj(x), num_kv_heads);
  q = q * cos + rotate_half(q) * sin;  // cos/sin [T, D] broadcast over batch and heads
  k = k * cos + rotate_half(k) * sin;
  // Scale 1/sqrt(head_dim) (SDPA's default); each query head group shares one key/value head.
  Tensor y = at::scaled_dot_product_attention(q, k, v, /*attn_mask=*/std::nullopt, /*dropout_p=*/0.0,
                                              /*is_causal=*/true, /*scale=*/std::nullopt,
                                              /*enable_gqa=*/num_heads != num_kv_heads);
  return o_proj(y.transpose(1, 2).reshape({B, T, num_heads * head_dim}));
}

LlamaMLPImpl::LlamaMLPImpl(const LlamaConfig& c, const std::string& path, const QuantizedPredicate& quantized) {
  gate_proj.init(*this, "gate_proj", c.hidden_size, c.intermediate_size, quantized(path + ".gate_proj"), c.compute_dtype);
  up_proj.init(*this, "up_proj", c.hidden_size, c.intermediate_size, quantized(path + ".up_proj"), c.compute_dtype);
  down_proj.init(*this, "down_proj", c.intermediate_size, c.hidden_size, quantized(path + ".down_proj"), c.compute_dtype);
}

Tensor LlamaMLPImpl::forward(const Tensor& x) { return down_proj(::torch::silu(gate_proj(x)) * up_proj(x)); }

LlamaDecoderLayerImpl::LlamaDecoderLayerImpl(const LlamaConfig& c, const std::string& path,
                                             const QuantizedPredicate& quantized) {
  self_attn = register_module("self_attn", LlamaAttention(c, path + ".self_attn", quantized));
  mlp = register_module("mlp", LlamaMLP(c, path + ".mlp", quantized));
  input_layernorm = register_module("input_layernorm", RMSNorm(c.hidden_size, c.rms_norm_eps));
  post_attention_layernorm = register_module("post_attention_layernorm", RMSNorm(c.hidden_size, c.rms_norm_eps));
}

Tensor LlamaDecoderLayerImpl::forward(const Tensor& x, const Tensor& cos, const Tensor& sin) {
  const Tensor h = x + self_attn(input_layernorm(x), cos, sin);
  return h + mlp(post_attention_layernorm(h));
}

LlamaModelImpl::LlamaModelImpl(const LlamaConfig& c, const QuantizedPredicate& quantized) : config_(c) {
  embed_tokens = register_module("embed_tokens", ::torch::nn::Embedding(c.vocab_size, c.hidden_size));
  embed_tokens->weight.set_requires_grad(false);
  layers = register_module("layers", ::torch::nn::ModuleList());
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    decoder_layers.push_back(LlamaDecoderLayer(c, "model.layers." + std::to_string(i), quantized));
    layers->push_back(decoder_layers.back());
  }
  norm = register_module("norm", RMSNorm(c.hidden_size, c.rms_norm_eps));
}

std::pair<Tensor, Tensor> LlamaModelImpl::rotary(int64_t seq_len, const ::torch::Device& device) const {
  // inv_freq[i] = theta^(-2i / D), i < D/2; angle[t, i] = t * inv_freq[i]; both halves alike.
  const auto f32 = ::torch::TensorOptions().dtype(::torch::kFloat32).device(device);
  const int64_t D = config_.head_dim;
  const Tensor exponent = ::torch::arange(0, D, 2, ::torch::TensorOptions().dtype(::torch::kInt64).device(device))
                              .to(::torch::kFloat32) / static_cast<double>(D);
  const Tensor inv_freq = 1.0 / ::torch::pow(config_.rope_theta, exponent);
  const Tensor positions = ::torch::arange(seq_len, f32);
  const Tensor freqs = ::torch::outer(positions, inv_freq);
  const Tensor emb = ::torch::cat({freqs, freqs}, -1);
  return {emb.cos(), emb.sin()};
}

Tensor LlamaModelImpl::forward(const Tensor& input_ids) {
  TORCH_CHECK_VALUE(input_ids.defined() && input_ids.dim() == 2 && input_ids.size(1) >= 1,
                    "LlamaForCausalLM: input_ids must have shape [batch, seq_len >= 1], got ",
                    input_ids.defined() ? input_ids.sizes() : ::torch::IntArrayRef{});
  TORCH_CHECK_VALUE(input_ids.scalar_type() == ::torch::kInt64, "LlamaForCausalLM: input_ids must be int64, got ",
                    input_ids.scalar_type());
  TORCH_CHECK_VALUE(input_ids.size(1) <= config_.max_position_embeddings, "LlamaForCausalLM: input_ids has ",
                    input_ids.size(1), " positions, more than max_position_embeddings=",
                    config_.max_position_embeddings);
  if (input_ids.numel() > 0) {
    const int64_t lo = input_ids.min().item<int64_t>(), hi = input_ids.max().item<int64_t>();
    TORCH_CHECK_VALUE(lo >= 0 && hi < config_.vocab_size, "LlamaForCausalLM: input_ids must be in [0, vocab_size=",
                      config_.vocab_size, "), got values in [", lo, ", ", hi, "]");
  }
  Tensor h = embed_tokens(input_ids);
  const auto [cos, sin] = rotary(input_ids.size(1), h.device());
  for (auto& layer : decoder_layers) h = layer(h, cos.to(h.scalar_type()), sin.to(h.scalar_type()));
  return norm(h);
}

LlamaForCausalLMImpl::LlamaForCausalLMImpl(const LlamaConfig& config, QuantizedPredicate quantized,
                                           ::torch::Dtype dtype)
    : config_(config), dtype_(dtype) {
  TORCH_CHECK_VALUE(dtype == ::torch::kFloat32 || dtype == ::torch::kBFloat16 || dtype == ::torch::kFloat16,
                    "LlamaForCausalLM: dtype must be float32, bfloat16 or float16, got ", dtype);
  config_.finalize();
  if (!quantized) quantized = [](const std::string& path) { return path != "lm_head"; };
  model = register_module("model", LlamaModel(config_, quantized));
  if (!config_.tie_word_embeddings) {
    lm_head.init(*this, "lm_head", config_.hidden_size, config_.vocab_size, quantized("lm_head"),
                 config_.compute_dtype);
  }
  // The float weights (not the 4-bit layers' fp32 statistics) take the model's dtype.
  if (dtype != ::torch::kFloat32) {
    ::torch::NoGradGuard no_grad;
    for (const auto& m : modules(/*include_self=*/false)) {
      if (dynamic_cast<fnn::Linear4bitImpl*>(m.get()) || dynamic_cast<fnn::LoraLinear4bitImpl*>(m.get())) continue;
      for (auto& p : m->parameters(/*recurse=*/false)) p.set_data(p.to(dtype));
    }
  }
}

CausalLMOutput LlamaForCausalLMImpl::forward(const Tensor& input_ids, const std::optional<Tensor>& labels) {
  const Tensor h = model(input_ids);
  CausalLMOutput out;
  out.logits = config_.tie_word_embeddings ? ::torch::nn::functional::linear(h, model->embed_tokens->weight)
                                           : lm_head(h);
  out.logits = out.logits.to(::torch::kFloat32);
  if (labels) {
    TORCH_CHECK_VALUE(labels->sizes() == input_ids.sizes(), "LlamaForCausalLM: labels must have input_ids' shape ",
                      input_ids.sizes(), ", got ", labels->sizes());
    TORCH_CHECK_VALUE(labels->scalar_type() == ::torch::kInt64, "LlamaForCausalLM: labels must be int64, got ",
                      labels->scalar_type());
    // Position t predicts token t + 1: the last position has no target.
    const int64_t T = input_ids.size(1);
    const Tensor logits = out.logits.narrow(1, 0, T - 1).reshape({-1, config_.vocab_size});
    const Tensor targets = labels->narrow(1, 1, T - 1).reshape({-1});
    out.loss = ::torch::nn::functional::cross_entropy(
        logits, targets, ::torch::nn::functional::CrossEntropyFuncOptions().ignore_index(kIgnoreIndex));
  }
  return out;
}

std::vector<std::pair<std::string, LinearSlot*>> LlamaForCausalLMImpl::linear_layers() {
  std::vector<std::pair<std::string, LinearSlot*>> out;
  for (size_t i = 0; i < model->decoder_layers.size(); ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    auto& a = *model->decoder_layers[i]->self_attn;
    auto& m = *model->decoder_layers[i]->mlp;
    for (LinearSlot* s : {&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj}) out.emplace_back(p + "self_attn." + s->name, s);
    for (LinearSlot* s : {&m.gate_proj, &m.up_proj, &m.down_proj}) out.emplace_back(p + "mlp." + s->name, s);
  }
  if (!config_.tie_word_embeddings) out.emplace_back("lm_head", &lm_head);
  return out;
}

std::vector<Tensor> LlamaForCausalLMImpl::add_lora(const std::vector<std::string>& targets,
                                                   const fnn::LoraOptions& options) {
  TORCH_CHECK_VALUE(!targets.empty(), "add_lora: targets is empty; name projections (\"q_proj\", ...) or \"all-linear\"");
  const bool all = targets.size() == 1 && targets[0] == "all-linear";
  std::set<std::string> wanted(targets.begin(), targets.end()), found;
  std::vector<std::pair<std::string, LinearSlot*>> chosen;
  for (const auto& [path, slot] : linear_layers()) {
    const bool hit = all ? path != "lm_head" : wanted.count(slot->name) != 0;
    if (!hit) continue;
    found.insert(slot->name);
    chosen.emplace_back(path, slot);
  }
  if (!all) {
    for (const auto& t : targets) {
      TORCH_CHECK_VALUE(found.count(t), "add_lora: target '", t,
                        "' names no linear layer (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj",
                        config_.tie_word_embeddings ? "" : ", lm_head", ", or \"all-linear\" alone)");
    }
  }
  // Check every target before changing any.
  for (const auto& [path, slot] : chosen) {
    TORCH_CHECK_VALUE(slot->quantized(), "add_lora: target '", path,
                      "' is a float layer (not quantized in the checkpoint); LoRA goes on Linear4bit layers only");
  }
  for (const auto& [path, slot] : chosen) slot->add_lora(options, path);
  return fnn::lora_parameters(*this);
}

LlamaForCausalLM load_llama_4bit(const std::string& directory, ::torch::Dtype dtype) {
  const LlamaConfig config = LlamaConfig::from_file(directory);
  LlamaForCausalLM model{nullptr};
  {
    // The keys alone decide which layers are 4-bit; the reader is gone before the load maps shards.
    const std::vector<std::string> keys = io::CheckpointReader(directory).keys();
    const std::set<std::string> key_set(keys.begin(), keys.end());
    auto quantized = [&](const std::string& path) {
      return key_set.count(path + ".weight.quant_state.bitsandbytes__nf4") != 0 ||
             key_set.count(path + ".weight.quant_state.bitsandbytes__fp4") != 0;
    };
    model = LlamaForCausalLM(config, quantized, dtype);
  }
  io::load_4bit_checkpoint(*model, directory);
  for (auto& p : model->parameters()) p.set_requires_grad(false);
  return model;
}

}  // namespace models
}  // namespace fourbit
