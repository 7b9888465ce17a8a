// 4-bit checkpoint and PEFT adapter I/O (include/fourbit/torch/serialize.h): bitsandbytes'
// tensor names and quant-state JSON, PEFT's adapter key names and adapter_config.json, with
// nlohmann-json for the JSON and safetensors.cpp for the files.
#include "fourbit/torch/serialize.h"

#include <c10/util/Exception.h>
#include <torch/utils.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <vector>

#include "fourbit/codebook.h"
#include "fourbit/torch/checkpoint.h"
#include "fourbit/torch/nn.h"
#include "fourbit/types.h"

namespace fourbit {
namespace io {
namespace {

using ::torch::Tensor;
using json = nlohmann::json;
using ordered_json = nlohmann::ordered_json;

constexpr size_t kMaxQuantStateJson = 1 << 16;  // a quant state's JSON is a few hundred bytes
const char* const kAdapterWeights = "adapter_model.safetensors";
const char* const kAdapterConfig = "adapter_config.json";
const char* const kPeftPrefix = "base_model.model.";

std::string join(const std::string& path, const std::string& name) { return path.empty() ? name : path + "." + name; }

// The checkpoint path of a module: PEFT's "P.base_layer" is the base layer at P.
std::string base_path(const std::string& name) {
  const std::string suffix = ".base_layer";
  if (name == "base_layer") return "";
  if (name.size() > suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0) {
    return name.substr(0, name.size() - suffix.size());
  }
  return name;
}

struct Layers {
  std::vector<std::pair<std::string, nn::Linear4bitImpl*>> linear;      // (checkpoint path, layer)
  std::vector<std::pair<std::string, nn::LoraLinear4bitImpl*>> lora;    // (module path, layer)
  std::vector<std::pair<std::string, Tensor>> plain;                    // other params and buffers
};

Layers collect(const ::torch::nn::Module& model) {
  Layers out;
  for (const auto& item : model.named_modules("", /*include_self=*/true)) {
    ::torch::nn::Module* m = item.value().get();
    if (auto* l = dynamic_cast<nn::Linear4bitImpl*>(m)) {
      out.linear.emplace_back(base_path(item.key()), l);
    } else if (auto* lora = dynamic_cast<nn::LoraLinear4bitImpl*>(m)) {
      out.lora.emplace_back(item.key(), lora);
    } else {
      for (const auto& p : m->named_parameters(false)) out.plain.emplace_back(join(item.key(), p.key()), p.value());
      for (const auto& b : m->named_buffers(false)) out.plain.emplace_back(join(item.key(), b.key()), b.value());
    }
  }
  return out;
}

const char* dtype_name(::torch::Dtype d) {
  switch (d) {
    case ::torch::kFloat32: return "float32";
    case ::torch::kFloat16: return "float16";
    case ::torch::kBFloat16: return "bfloat16";
    default: break;
  }
  TORCH_CHECK_VALUE(false, "no bitsandbytes name for dtype ", d);
  return "";
}

::torch::Dtype parse_dtype(const json& v, const std::string& where) {
  const std::string s = v.is_string() ? v.get<std::string>() : "";
  if (s == "float32") return ::torch::kFloat32;
  if (s == "float16") return ::torch::kFloat16;
  if (s == "bfloat16") return ::torch::kBFloat16;
  TORCH_CHECK_VALUE(false, where, " must be 'float32', 'float16' or 'bfloat16', got ", v.dump());
  return ::torch::kFloat32;
}

int64_t json_int(const json& obj, const char* field, const std::string& key) {
  TORCH_CHECK_VALUE(obj.contains(field), "checkpoint key '", key, "': quant state JSON lacks '", field, "'");
  const json& v = obj[field];
  TORCH_CHECK_VALUE(v.is_number_integer(), "checkpoint key '", key, "': '", field, "' must be an int, got ", v.dump());
  return v.get<int64_t>();
}

// The tensors of a checkpoint by key, from a TensorMap or a CheckpointReader (which copies
// each one out of its shard when asked), with the keys used so far.
class KeyReader {
 public:
  explicit KeyReader(const TensorMap& tensors) : map_(&tensors) {
    for (const auto& [k, v] : tensors) keys_.push_back(k);
  }
  explicit KeyReader(CheckpointReader& reader) : reader_(&reader), keys_(reader.keys()) {}
  bool has(const std::string& key) const { return map_ ? map_->count(key) != 0 : reader_->contains(key); }
  Tensor need(const std::string& key) {
    TORCH_CHECK_VALUE(has(key), "checkpoint is missing key '", key, "'");
    used_.insert(key);
    return map_ ? map_->at(key) : reader_->tensor(key);
  }
  void check_all_used(const std::string& prefix, const char* what) const {
    std::vector<std::string> unused;
    for (const auto& k : keys_) {
      if (k.compare(0, prefix.size(), prefix) == 0 && !used_.count(k)) unused.push_back(k);
    }
    if (unused.empty()) return;
    std::ostringstream s;
    for (size_t i = 0; i < unused.size() && i < 5; ++i) s << (i ? ", '" : "'") << unused[i] << "'";
    if (unused.size() > 5) s << ", ... (" << unused.size() << " in all)";
    TORCH_CHECK_VALUE(false, what, " has keys the model does not use: ", s.str());
  }

 private:
  const TensorMap* map_ = nullptr;
  CheckpointReader* reader_ = nullptr;
  std::vector<std::string> keys_;
  std::set<std::string> used_;
};

void copy_into(const Tensor& dst, const Tensor& src, const std::string& key) {
  TORCH_CHECK_VALUE(src.sizes() == dst.sizes(), "checkpoint key '", key, "' has shape ", src.sizes(),
                    ", the model's tensor has ", dst.sizes());
  ::torch::NoGradGuard no_grad;
  dst.copy_(src);
}

void load_linear(nn::Linear4bitImpl& layer, const std::string& base, KeyReader& keys) {
  const std::string wkey = base + "weight";
  const Tensor packed = keys.need(wkey);
  std::string qs_key;
  for (const char* qt : {"nf4", "fp4"}) {
    const std::string k = wkey + ".quant_state.bitsandbytes__" + qt;
    if (keys.has(k)) {
      TORCH_CHECK_VALUE(qs_key.empty(), "checkpoint has both '", qs_key, "' and '", k, "'");
      qs_key = k;
    }
  }
  TORCH_CHECK_VALUE(!qs_key.empty(), "checkpoint is missing key '", wkey,
                    ".quant_state.bitsandbytes__nf4' (or __fp4): '", wkey, "' is not a 4-bit weight");
  const Tensor qs_tensor = keys.need(qs_key);
  TORCH_CHECK_VALUE(qs_tensor.scalar_type() == ::torch::kUInt8 && qs_tensor.dim() == 1 &&
                        static_cast<size_t>(qs_tensor.numel()) <= kMaxQuantStateJson,
                    "checkpoint key '", qs_key, "' must be a 1-D uint8 tensor of JSON bytes (at most ",
                    kMaxQuantStateJson, "), got ", qs_tensor.scalar_type(), " of shape ", qs_tensor.sizes());
  const Tensor qs_bytes = qs_tensor.contiguous();
  const std::string text(static_cast<const char*>(qs_bytes.const_data_ptr()), qs_bytes.numel());
  json qs;
  try {
    qs = json::parse(text);
  } catch (const json::exception& e) {
    TORCH_CHECK_VALUE(false, "checkpoint key '", qs_key, "' does not hold valid JSON: ", e.what());
  }
  TORCH_CHECK_VALUE(qs.is_object(), "checkpoint key '", qs_key, "' must hold a JSON object, got ", qs.dump());

  nn::QuantState4bit state;
  const std::string suffix = qs_key.substr(qs_key.size() - 3);
  TORCH_CHECK_VALUE(qs.contains("quant_type") && qs["quant_type"].is_string() &&
                        qs["quant_type"].get<std::string>() == suffix,
                    "checkpoint key '", qs_key, "' names quant_type '", suffix, "' but its JSON says quant_type=",
                    qs.contains("quant_type") ? qs["quant_type"].dump() : std::string("(missing)"));
  state.quant_type = suffix;
  state.blocksize = json_int(qs, "blocksize", qs_key);
  TORCH_CHECK_VALUE(qs.contains("dtype"), "checkpoint key '", qs_key, "': quant state JSON lacks 'dtype'");
  state.dtype = parse_dtype(qs["dtype"], "checkpoint key '" + qs_key + "': 'dtype'");
  const int64_t N = layer.options().out_features(), K = layer.options().in_features();
  TORCH_CHECK_VALUE(qs.contains("shape") && qs["shape"] == json::array({N, K}), "checkpoint key '", qs_key,
                    "': shape is ", qs.contains("shape") ? qs["shape"].dump() : std::string("(missing)"),
                    " but the model's layer is [", N, ", ", K, "]");

  const Tensor quant_map = keys.need(wkey + ".quant_map");
  const auto& code = codebook_4bit(parse_quant_type(state.quant_type));
  const Tensor expected = ::torch::tensor(std::vector<float>(code.begin(), code.end()));
  TORCH_CHECK_VALUE(quant_map.numel() == 16 && ::torch::equal(quant_map.to(::torch::kFloat32).reshape({-1}), expected),
                    "checkpoint key '", wkey, ".quant_map' is not the ", state.quant_type, " codebook");

  std::optional<Tensor> nested_absmax, nested_code;
  state.nested = keys.has(wkey + ".nested_absmax");
  if (state.nested) {
    nested_absmax = keys.need(wkey + ".nested_absmax");
    nested_code = keys.need(wkey + ".nested_quant_map");
    state.nested_blocksize = json_int(qs, "nested_blocksize", qs_key);
    TORCH_CHECK_VALUE(qs.contains("nested_offset") && qs["nested_offset"].is_number(), "checkpoint key '", qs_key,
                      "': 'nested_offset' must be a number, got ",
                      qs.contains("nested_offset") ? qs["nested_offset"].dump() : std::string("(missing)"));
    state.nested_offset = qs["nested_offset"].get<double>();
    if (qs.contains("nested_dtype")) {
      TORCH_CHECK_VALUE(parse_dtype(qs["nested_dtype"], "checkpoint key '" + qs_key + "': 'nested_dtype'") ==
                            ::torch::kFloat32,
                        "checkpoint key '", qs_key, "': nested_dtype must be 'float32', got ", qs["nested_dtype"].dump());
    }
  } else {
    TORCH_CHECK_VALUE(!keys.has(wkey + ".nested_quant_map") && !qs.contains("nested_offset"), "checkpoint key '",
                      wkey, "': nested fields are present but '", wkey, ".nested_absmax' is missing");
  }
  const Tensor absmax = keys.need(wkey + ".absmax");
  try {
    layer.load_quantized(packed, absmax, state, nested_absmax, nested_code);
  } catch (const c10::ValueError& e) {
    TORCH_CHECK_VALUE(false, "checkpoint weight '", wkey, "': ", e.what_without_backtrace());
  }
  if (layer.bias().defined()) {
    const std::string bkey = base + "bias";
    const Tensor b = keys.need(bkey);
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == N, "checkpoint key '", bkey, "' has shape ", b.sizes(),
                      ", the model's bias is [", N, "]");
    TORCH_CHECK_VALUE(b.is_floating_point(), "checkpoint key '", bkey, "' must be a float tensor, got ",
                      b.scalar_type());
    ::torch::NoGradGuard no_grad;
    layer.bias().set_data(b.to(layer.bias().device()).clone());
  }
}

std::string read_text(const std::filesystem::path& path) {
  std::ifstream in(path);
  TORCH_CHECK_VALUE(in.good(), "cannot open '", path.string(), "'");
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

Tensor to_json_tensor(const ordered_json& j) {
  const std::string s = j.dump();
  Tensor t = ::torch::empty({static_cast<int64_t>(s.size())}, ::torch::kUInt8);
  std::memcpy(t.data_ptr(), s.data(), s.size());
  return t;
}

}  // namespace

namespace {

void load_4bit(::torch::nn::Module& model, KeyReader& keys, bool strict, const std::string& prefix) {
  const Layers layers = collect(model);
  for (const auto& [path, layer] : layers.linear) load_linear(*layer, prefix + (path.empty() ? "" : path + "."), keys);
  for (const auto& [path, t] : layers.plain) {
    const std::string key = prefix + path;
    if (!keys.has(key) && !strict) continue;
    copy_into(t, keys.need(key), key);
  }
  if (strict) keys.check_all_used(prefix, "checkpoint");
}

}  // namespace

void load_4bit_state_dict(::torch::nn::Module& model, const TensorMap& tensors, bool strict, const std::string& prefix) {
  KeyReader keys(tensors);
  load_4bit(model, keys, strict, prefix);
}

void load_4bit_checkpoint(::torch::nn::Module& model, const std::string& path, bool strict, const std::string& prefix) {
  CheckpointReader reader(path);
  KeyReader keys(reader);
  load_4bit(model, keys, strict, prefix);
}

TensorMap state_dict_4bit(const ::torch::nn::Module& model, const std::string& prefix) {
  const Layers layers = collect(model);
  TensorMap out;
  for (const auto& [path, layer] : layers.linear) {
    const std::string w = prefix + join(path, "weight");
    const auto& s = layer->quant_state();
    out[w] = layer->weight();
    out[w + ".absmax"] = layer->absmax();
    out[w + ".quant_map"] = layer->quant_map();
    ordered_json qs = {{"quant_type", s.quant_type},
                       {"blocksize", s.blocksize},
                       {"dtype", dtype_name(s.dtype)},
                       {"shape", {layer->options().out_features(), layer->options().in_features()}}};
    if (s.nested) {
      out[w + ".nested_absmax"] = layer->nested_absmax();
      out[w + ".nested_quant_map"] = layer->nested_quant_map();
      qs["nested_blocksize"] = s.nested_blocksize;
      qs["nested_dtype"] = "float32";
      qs["nested_offset"] = s.nested_offset;
    }
    out[w + ".quant_state.bitsandbytes__" + s.quant_type] = to_json_tensor(qs);
    if (layer->bias().defined()) out[prefix + join(path, "bias")] = layer->bias();
  }
  for (const auto& [path, t] : layers.plain) out[prefix + path] = t;
  return out;
}

void save_4bit_checkpoint(const ::torch::nn::Module& model, const std::string& path, const std::string& prefix) {
  save_safetensors(path, state_dict_4bit(model, prefix), {{"format", "pt"}});
}

void save_peft_adapter(const ::torch::nn::Module& model, const std::string& directory,
                       const std::string& base_model_name_or_path) {
  const Layers layers = collect(model);
  TORCH_CHECK_VALUE(!layers.lora.empty(), "save_peft_adapter: the model has no LoraLinear4bit layer");
  const nn::LoraOptions& first = layers.lora.front().second->options();
  TensorMap tensors;
  ordered_json targets = ordered_json::array();
  for (const auto& [path, lora] : layers.lora) {
    const auto& o = lora->options();
    TORCH_CHECK_VALUE(o.r() == first.r() && o.lora_alpha() == first.lora_alpha() &&
                          o.lora_dropout() == first.lora_dropout() && o.use_rslora() == first.use_rslora(),
                      "save_peft_adapter: LoRA layer '", path, "' has r=", o.r(), ", lora_alpha=", o.lora_alpha(),
                      ", lora_dropout=", o.lora_dropout(), ", use_rslora=", o.use_rslora(), " but '",
                      layers.lora.front().first, "' has r=", first.r(), ", lora_alpha=", first.lora_alpha(),
                      ", lora_dropout=", first.lora_dropout(), ", use_rslora=", first.use_rslora(),
                      "; one adapter has one configuration");
    TORCH_CHECK_VALUE(!path.empty(), "save_peft_adapter: the model itself is a LoraLinear4bit; wrap it in a module");
    tensors[kPeftPrefix + path + ".lora_A.weight"] = lora->lora_A();
    tensors[kPeftPrefix + path + ".lora_B.weight"] = lora->lora_B();
    targets.push_back(path);
  }
  ordered_json config = {
      {"peft_type", "LORA"},
      {"task_type", nullptr},
      {"base_model_name_or_path", base_model_name_or_path.empty() ? ordered_json(nullptr)
                                                                  : ordered_json(base_model_name_or_path)},
      {"r", first.r()},
      {"lora_alpha", first.lora_alpha()},
      {"lora_dropout", first.lora_dropout()},
      {"use_rslora", first.use_rslora()},
      {"target_modules", targets},
      {"bias", "none"},
      {"fan_in_fan_out", false},
      {"use_dora", false},
      {"init_lora_weights", true},
      {"inference_mode", true},
      {"modules_to_save", nullptr},
      {"rank_pattern", ordered_json::object()},
      {"alpha_pattern", ordered_json::object()},
  };
  const std::filesystem::path dir(directory);
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  TORCH_CHECK_VALUE(!ec, "save_peft_adapter: cannot create directory '", directory, "': ", ec.message());
  save_safetensors((dir / kAdapterWeights).string(), tensors, {{"format", "pt"}});
  std::ofstream out(dir / kAdapterConfig, std::ios::trunc);
  TORCH_CHECK_VALUE(out.good(), "save_peft_adapter: cannot write '", (dir / kAdapterConfig).string(), "'");
  out << config.dump(2) << "\n";
}

void load_peft_adapter(::torch::nn::Module& model, const std::string& directory) {
  const std::filesystem::path dir(directory);
  const std::string config_path = (dir / kAdapterConfig).string();
  json config;
  try {
    config = json::parse(read_text(dir / kAdapterConfig));
  } catch (const json::exception& e) {
    TORCH_CHECK_VALUE(false, "load_peft_adapter: '", config_path, "' is not valid JSON: ", e.what());
  }
  TORCH_CHECK_VALUE(config.is_object(), "load_peft_adapter: '", config_path, "' must hold a JSON object");
  auto field = [&](const char* name) -> const json& {
    TORCH_CHECK_VALUE(config.contains(name), "load_peft_adapter: '", config_path, "' lacks '", name, "'");
    return config[name];
  };
  TORCH_CHECK_VALUE(field("peft_type") == "LORA", "load_peft_adapter: '", config_path,
                    "': peft_type must be \"LORA\", got ", field("peft_type").dump());
  TORCH_CHECK_VALUE(field("r").is_number_integer() && field("r").get<int64_t>() >= 1, "load_peft_adapter: '",
                    config_path, "': r must be a positive int, got ", field("r").dump());
  TORCH_CHECK_VALUE(field("lora_alpha").is_number(), "load_peft_adapter: '", config_path,
                    "': lora_alpha must be a number, got ", field("lora_alpha").dump());
  const int64_t r = config["r"].get<int64_t>();
  const double alpha = config["lora_alpha"].get<double>();
  const bool rslora = config.value("use_rslora", false);
  auto unsupported = [&](const char* name, const json& fine) {
    if (config.contains(name) && !config[name].is_null() && config[name] != fine) {
      TORCH_CHECK_VALUE(false, "load_peft_adapter: '", config_path, "': ", name, "=", config[name].dump(),
                        " is not supported (expected ", fine.dump(), ")");
    }
  };
  unsupported("bias", "none");
  unsupported("use_dora", false);
  unsupported("fan_in_fan_out", false);
  unsupported("rank_pattern", json::object());
  unsupported("alpha_pattern", json::object());
  const double scaling = alpha / (rslora ? std::sqrt(static_cast<double>(r)) : static_cast<double>(r));

  const std::string weights_path = (dir / kAdapterWeights).string();
  const TensorMap tensors = load_safetensors(weights_path);
  KeyReader keys(tensors);
  const Layers layers = collect(model);
  TORCH_CHECK_VALUE(!layers.lora.empty(), "load_peft_adapter: the model has no LoraLinear4bit layer");
  for (const auto& [path, lora] : layers.lora) {
    TORCH_CHECK_VALUE(lora->options().r() == r, "load_peft_adapter: '", config_path, "' has r=", r,
                      " but the model's LoRA layer '", path, "' has r=", lora->options().r());
    TORCH_CHECK_VALUE(std::abs(lora->scaling() - scaling) <= 1e-12 * std::abs(scaling), "load_peft_adapter: '",
                      config_path, "' gives scaling ", scaling, " (lora_alpha=", alpha, ", r=", r,
                      ", use_rslora=", rslora, ") but the model's LoRA layer '", path, "' has ", lora->scaling());
    for (const char* which : {"lora_A", "lora_B"}) {
      const std::string key = kPeftPrefix + path + "." + which + ".weight";
      const Tensor t = [&]() -> Tensor {
        try {
          return keys.need(key);
        } catch (const c10::ValueError&) {
          TORCH_CHECK_VALUE(false, "load_peft_adapter: '", weights_path, "' is missing key '", key, "'");
        }
      }();
      Tensor& dst = std::string(which) == "lora_A" ? lora->lora_A() : lora->lora_B();
      TORCH_CHECK_VALUE(t.sizes() == dst.sizes(), "load_peft_adapter: '", weights_path, "' key '", key,
                        "' has shape ", t.sizes(), ", the model's is ", dst.sizes());
      TORCH_CHECK_VALUE(t.is_floating_point(), "load_peft_adapter: '", weights_path, "' key '", key,
                        "' must be a float tensor, got ", t.scalar_type());
      ::torch::NoGradGuard no_grad;
      dst.copy_(t);
    }
  }
  keys.check_all_used("", ("load_peft_adapter: '" + weights_path + "'").c_str());
}

}  // namespace io
}  // namespace fourbit
