// fourbit::models::LlamaForCausalLM against transformers + PEFT on the same 4-bit checkpoint
// (tests/fixtures/cpp_torch/llama_tiny*, written by make_cpp_torch_fixtures.py): base logits,
// LoRA logits, causal-LM loss and every LoRA gradient; the adapter round trip; a few training
// steps; and LlamaConfig / loading / add_lora errors, each naming the field or key and value.
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "fourbit/torch/llama.h"
#include "fourbit/torch/optim.h"
#include "fourbit/torch/serialize.h"
#include "torch_fixtures.h"

namespace {

using namespace fourbit_test;
namespace fm = fourbit::models;
namespace fnn = fourbit::nn;
namespace fio = fourbit::io;
namespace fs = std::filesystem;
using json = nlohmann::json;

// float32 throughout on both sides: the differences are summation order only (measured 0 on
// this CPU, logits of magnitude ~0.6); 1e-4 leaves room for other CPUs' kernels.
constexpr double kLogitTol = 1e-4;
constexpr double kGradTol = 1e-4;

const std::string kTiny = fixture_path("cpp_torch/llama_tiny");
const std::string kAdapter = fixture_path("cpp_torch/llama_tiny_adapter");
const std::vector<std::string> kTargets{"q_proj", "v_proj", "down_proj"};

fs::path temp_dir(const std::string& name) {
  const auto dir = fs::temp_directory_path() / ("fourbit_test_torch_llama_" + std::to_string(::getpid())) / name;
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

json tiny_config() {
  std::ifstream in(kTiny + "/config.json");
  return json::parse(in);
}

// A copy of the tiny checkpoint whose config.json is `config`.
fs::path checkpoint_with_config(const std::string& name, const json& config) {
  const auto dir = temp_dir(name);
  fs::copy_file(kTiny + "/model.safetensors", dir / "model.safetensors");
  std::ofstream(dir / "config.json") << config.dump(2);
  return dir;
}

fm::LlamaForCausalLM tiny_with_adapter() {
  auto model = fm::load_llama_4bit(kTiny);
  model->add_lora(kTargets, fnn::LoraOptions(4).lora_alpha(8));
  fio::load_peft_adapter(*model, kAdapter);
  model->eval();
  return model;
}

TEST(LlamaTiny, BaseLogitsMatchTransformers) {
  const auto fx = load_fixture("llama_tiny.safetensors");
  auto model = fm::load_llama_4bit(kTiny);
  model->eval();
  const auto& c = model->config();
  EXPECT_EQ(c.hidden_size, 64);
  EXPECT_EQ(c.num_key_value_heads, 2);
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_FALSE(c.tie_word_embeddings);
  // transformers + bitsandbytes quantize every projection and leave lm_head in float.
  for (auto& [path, slot] : model->linear_layers()) EXPECT_EQ(slot->quantized(), path != "lm_head") << path;
  for (const auto& p : model->parameters()) EXPECT_FALSE(p.requires_grad());
  torch::NoGradGuard no_grad;
  const auto out = model->forward(entry(fx, "input_ids"));
  EXPECT_FALSE(out.loss.defined());
  // transformers with fourbit's Python layers, and transformers with bitsandbytes' own
  // dequantized weights (a reference that shares no code with fourbit).
  const double diff = max_diff(out.logits, entry(fx, "base_logits"));
  const double diff_bnb = max_diff(out.logits, entry(fx, "bnb_base_logits"));
  EXPECT_LE(diff, kLogitTol);
  EXPECT_LE(diff_bnb, kLogitTol);
  std::printf("base logits: max |C++ - transformers| = %.3g, |C++ - transformers + bitsandbytes| = %.3g "
              "(|logits| up to %.3g)\n", diff, diff_bnb, entry(fx, "base_logits").abs().max().item<double>());
}

TEST(LlamaTiny, Bfloat16ModelMatchesTransformersInBfloat16) {
  const auto fx = load_fixture("llama_tiny.safetensors");
  auto model = fm::load_llama_4bit(kTiny, torch::kBFloat16);
  model->eval();
  ASSERT_TRUE(model->config().compute_dtype.has_value());
  EXPECT_EQ(*model->config().compute_dtype, torch::kFloat32);  // the checkpoint's bnb_4bit_compute_dtype
  EXPECT_EQ(model->model->embed_tokens->weight.scalar_type(), torch::kBFloat16);
  EXPECT_EQ(model->lm_head.plain->weight.scalar_type(), torch::kBFloat16);
  EXPECT_EQ(model->model->decoder_layers[0]->self_attn->q_proj.q->absmax().scalar_type(), torch::kUInt8);
  EXPECT_EQ(model->model->decoder_layers[0]->self_attn->q_proj.q->nested_absmax().scalar_type(), torch::kFloat32);
  torch::NoGradGuard no_grad;
  const auto logits = model->forward(entry(fx, "input_ids")).logits;
  // Same operations in the same dtypes as transformers: equal up to summation order (measured 0).
  // The bound is relative to the baseline of the float32 model (4.1e-3 from transformers'
  // bfloat16 one, about one bfloat16 ulp at |logits| ~0.6): a C++ model that computed in float32,
  // or in bfloat16 where transformers does not, lands at or beyond it.
  const double baseline = max_diff(entry(fx, "base_logits"), entry(fx, "bf16_base_logits"));
  const double diff = max_diff(logits, entry(fx, "bf16_base_logits"));
  EXPECT_LE(diff, 0.5 * baseline);
  std::printf("bfloat16 base logits: max |C++ - transformers| = %.3g (float32 vs bfloat16 in Python: %.3g)\n", diff,
              baseline);
}

TEST(LlamaTiny, LoraLogitsLossAndGradientsMatchPeft) {
  const auto fx = load_fixture("llama_tiny.safetensors");
  auto model = tiny_with_adapter();
  const auto out = model->forward(entry(fx, "input_ids"), entry(fx, "labels"));
  EXPECT_LE(max_diff(out.logits.detach(), entry(fx, "logits")), kLogitTol);
  EXPECT_NEAR(out.loss.item<double>(), entry(fx, "loss").item<double>(), 1e-5);
  out.loss.backward();
  int checked = 0;
  double worst = 0.0;
  for (const auto& item : model->named_modules()) {
    auto* lora = dynamic_cast<fnn::LoraLinear4bitImpl*>(item.value().get());
    if (!lora) continue;
    for (const char* which : {"lora_A", "lora_B"}) {
      const auto& param = std::string(which) == "lora_A" ? lora->lora_A() : lora->lora_B();
      ASSERT_TRUE(param.grad().defined()) << item.key() << "." << which;
      const auto& expected = entry(fx, "grad." + item.key() + "." + which);
      const double d = max_diff(param.grad(), expected);
      const double scale = expected.abs().max().item<double>();
      EXPECT_GT(scale, 0.0) << item.key() << "." << which;
      EXPECT_LE(d, kGradTol * std::max(1.0, scale)) << item.key() << "." << which;
      worst = std::max(worst, d);
      ++checked;
    }
  }
  EXPECT_EQ(checked, 12);  // 2 layers x 3 targets x (A, B)
  std::printf("LoRA: loss %.6f (PEFT %.6f); worst gradient |diff| %.3g over %d tensors\n", out.loss.item<double>(),
              entry(fx, "loss").item<double>(), worst, checked);
}

TEST(LlamaTiny, LossIgnoresMinus100AndShiftsLabels) {
  const auto fx = load_fixture("llama_tiny.safetensors");
  auto model = tiny_with_adapter();
  torch::NoGradGuard no_grad;
  const auto ids = entry(fx, "input_ids");
  auto labels = entry(fx, "labels");
  const auto out = model->forward(ids, labels);
  // By hand: position t predicts labels[t + 1]; the -100 is left out of the mean.
  const int64_t T = ids.size(1);
  const auto logp = torch::log_softmax(out.logits.narrow(1, 0, T - 1), -1);
  const auto target = labels.narrow(1, 1, T - 1);
  const auto mask = target.ne(-100);
  const auto picked = logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1);
  const double expected = -(picked * mask).sum().item<double>() / mask.sum().item<double>();
  EXPECT_NEAR(out.loss.item<double>(), expected, 1e-5);
  EXPECT_EQ(mask.logical_not().sum().item<int64_t>(), 1);
}

TEST(LlamaTiny, AdapterRoundTripAndTrainingLowersLoss) {
  const auto fx = load_fixture("llama_tiny.safetensors");
  auto model = fm::load_llama_4bit(kTiny);
  torch::manual_seed(0);
  const auto params = model->add_lora({"all-linear"}, fnn::LoraOptions(4).lora_alpha(8));
  EXPECT_EQ(params.size(), 2u * 7u * 2u);  // 7 projections x 2 layers, lm_head left out
  fourbit::optim::AdamW opt(params, fourbit::optim::AdamWOptions(1e-2).weight_decay(0.0));
  const auto ids = entry(fx, "input_ids");
  model->train();
  float first = 0, last = 0;
  for (int step = 0; step < 15; ++step) {
    opt.zero_grad();
    auto loss = model->forward(ids, ids).loss;
    loss.backward();
    opt.step();
    (step == 0 ? first : last) = loss.item<float>();
  }
  EXPECT_LT(last, 0.8f * first) << "loss " << first << " -> " << last;

  const auto dir = temp_dir("adapter");
  fio::save_peft_adapter(*model, dir.string());
  json config = json::parse(std::ifstream(dir / "adapter_config.json"));
  EXPECT_EQ(config["target_modules"].size(), 14u);
  EXPECT_EQ(config["target_modules"][0], "model.layers.0.self_attn.q_proj");
  auto again = fm::load_llama_4bit(kTiny);
  again->add_lora({"all-linear"}, fnn::LoraOptions(4).lora_alpha(8));
  fio::load_peft_adapter(*again, dir.string());
  model->eval();
  again->eval();
  torch::NoGradGuard no_grad;
  EXPECT_EQ(max_diff(model->forward(ids).logits, again->forward(ids).logits), 0.0);
}

TEST(LlamaTiny, ShardedCheckpointLoadsLikeTheSingleFile) {
  // transformers' sharded layout: two shard files (layer 1 and lm_head in the second) + index.
  const auto dir = temp_dir("sharded");
  fs::copy_file(kTiny + "/config.json", dir / "config.json");
  const auto all = fio::load_safetensors(kTiny + "/model.safetensors");
  fio::TensorMap first, second;
  json weight_map = json::object();
  for (const auto& [key, t] : all) {
    const bool late = key.rfind("model.layers.1.", 0) == 0 || key.rfind("lm_head", 0) == 0;
    (late ? second : first)[key] = t;
    weight_map[key] = late ? "model-00002-of-00002.safetensors" : "model-00001-of-00002.safetensors";
  }
  ASSERT_FALSE(first.empty());
  ASSERT_FALSE(second.empty());
  fio::save_safetensors((dir / "model-00001-of-00002.safetensors").string(), first);
  fio::save_safetensors((dir / "model-00002-of-00002.safetensors").string(), second);
  std::ofstream(dir / "model.safetensors.index.json") << json{{"metadata", json::object()}, {"weight_map", weight_map}}.dump();
  const auto fx = load_fixture("llama_tiny.safetensors");
  auto model = fm::load_llama_4bit(dir.string());
  model->eval();
  torch::NoGradGuard no_grad;
  EXPECT_LE(max_diff(model->forward(entry(fx, "input_ids")).logits, entry(fx, "base_logits")), kLogitTol);
}

TEST(LlamaTiny, TiedEmbeddingsHaveNoHead) {
  auto config = fm::LlamaConfig::from_file(kTiny);
  config.tie_word_embeddings = true;
  fm::LlamaForCausalLM model(config);
  for (const auto& p : model->named_parameters()) EXPECT_EQ(p.key().rfind("lm_head", 0), std::string::npos) << p.key();
  torch::NoGradGuard no_grad;
  const auto ids = torch::randint(0, config.vocab_size, {1, 5});
  const auto h = model->model->forward(ids);
  EXPECT_EQ(max_diff(model->forward(ids).logits, torch::matmul(h, model->model->embed_tokens->weight.t())), 0.0);
}

// ---------------------------------------------------------------------------- errors

void expect_config_error(const json& config, std::initializer_list<std::string> parts) {
  expect_value_error([&] { fm::LlamaConfig::from_json(config.dump(), "cfg"); }, parts);
}

TEST(LlamaConfigErrors, UnsupportedRopeScalingNamesFieldAndValue) {
  auto c = tiny_config();
  c["rope_scaling"] = {{"rope_type", "linear"}, {"factor", 2.0}};
  expect_config_error(c, {"cfg", "'rope_scaling'", "\"linear\""});
  c = tiny_config();
  c["rope_parameters"]["rope_type"] = "llama3";
  expect_config_error(c, {"'rope_parameters.rope_type'", "\"llama3\""});
  c = tiny_config();
  c["rope_parameters"]["factor"] = 8.0;
  expect_config_error(c, {"'rope_parameters.factor'", "8.0"});
  c = tiny_config();
  c["rope_scaling"] = nullptr;  // null is plain rotary embedding: accepted
  EXPECT_NO_THROW(fm::LlamaConfig::from_json(c.dump()));
}

TEST(LlamaConfigErrors, RopeThetaAndDefaultsAreRead) {
  auto c = tiny_config();
  c["rope_parameters"]["rope_theta"] = 500000.0;  // transformers 5's layout
  EXPECT_EQ(fm::LlamaConfig::from_json(c.dump()).rope_theta, 500000.0);
  c = tiny_config();
  c.erase("rope_parameters");
  c["rope_theta"] = 250000.0;  // transformers 4's layout
  c["rope_scaling"] = nullptr;
  c.erase("num_key_value_heads");
  c.erase("head_dim");
  const auto config = fm::LlamaConfig::from_json(c.dump());
  EXPECT_EQ(config.rope_theta, 250000.0);
  EXPECT_EQ(config.num_key_value_heads, 4);  // transformers' defaults: MHA, hidden / heads
  EXPECT_EQ(config.head_dim, 16);
  EXPECT_EQ(config.rms_norm_eps, 1e-5);
  // The theta reaches the rotary embedding: position 1's angles are inv_freq = theta^(-2i/D).
  fm::LlamaModel model(config, [](const std::string&) { return true; });
  const auto [cos, sin] = model->rotary(2, torch::kCPU);
  const double expected = std::pow(250000.0, -2.0 / 16.0);  // i = 1
  EXPECT_NEAR(sin[1][1].item<double>(), std::sin(expected), 1e-7);
  EXPECT_NEAR(sin[1][9].item<double>(), std::sin(expected), 1e-7);  // the second half repeats the first
}

TEST(LlamaConfigErrors, MissingAndBadFieldsAreNamed) {
  for (const char* field : {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                            "vocab_size", "rms_norm_eps"}) {
    auto c = tiny_config();
    c.erase(field);
    expect_config_error(c, {"missing field", std::string("'") + field + "'"});
  }
  auto c = tiny_config();
  c["hidden_size"] = "64";
  expect_config_error(c, {"'hidden_size'", "\"64\""});
  c = tiny_config();
  c["num_key_value_heads"] = 3;
  expect_config_error(c, {"'num_attention_heads' (4)", "'num_key_value_heads' (3)"});
  c = tiny_config();
  c["attention_bias"] = true;
  expect_config_error(c, {"'attention_bias'", "true"});
  c = tiny_config();
  c["mlp_bias"] = true;
  expect_config_error(c, {"'mlp_bias'", "true"});
  c = tiny_config();
  c["hidden_act"] = "gelu";
  expect_config_error(c, {"'hidden_act'", "\"gelu\""});
  c = tiny_config();
  c["model_type"] = "gpt2";
  expect_config_error(c, {"'model_type'", "\"gpt2\""});
  c = tiny_config();
  c["quantization_config"]["bnb_4bit_compute_dtype"] = "int8";
  expect_config_error(c, {"'quantization_config.bnb_4bit_compute_dtype'", "\"int8\""});
  c = tiny_config();
  c["head_dim"] = 15;
  expect_config_error(c, {"'head_dim'", "15"});
  expect_value_error([] { fm::LlamaConfig::from_json("{not json"); }, {"config.json", "not valid JSON"});
  expect_value_error([] { fm::LlamaConfig::from_file("/nonexistent/dir"); }, {"/nonexistent/dir"});
}

TEST(LlamaLoadErrors, ConfigThatDisagreesWithTheCheckpointNamesKeyAndShapes) {
  auto c = tiny_config();
  c["intermediate_size"] = 96;
  auto dir = checkpoint_with_config("mlp", c);
  expect_value_error([&] { fm::load_llama_4bit(dir.string()); },
                     {"model.layers.0.mlp.gate_proj.weight", "[128,64]", "[96, 64]"});
  c = tiny_config();
  c["vocab_size"] = 100;
  dir = checkpoint_with_config("vocab", c);
  expect_value_error([&] { fm::load_llama_4bit(dir.string()); }, {"model.embed_tokens.weight", "[128, 64]", "[100, 64]"});
  c = tiny_config();
  c["num_hidden_layers"] = 1;
  dir = checkpoint_with_config("layers", c);
  expect_value_error([&] { fm::load_llama_4bit(dir.string()); }, {"does not use", "model.layers.1."});
  c = tiny_config();
  c["tie_word_embeddings"] = true;
  dir = checkpoint_with_config("tied", c);
  expect_value_error([&] { fm::load_llama_4bit(dir.string()); }, {"does not use", "'lm_head.weight'"});
}

TEST(LlamaLoadErrors, LoraTargetsAndInputsAreChecked) {
  auto model = fm::load_llama_4bit(kTiny);
  expect_value_error([&] { model->add_lora({"q_proj", "qkv_proj"}, fnn::LoraOptions(4)); }, {"'qkv_proj'", "names no"});
  // lm_head is float (transformers left it unquantized): refused before q_proj is touched.
  expect_value_error([&] { model->add_lora({"q_proj", "lm_head"}, fnn::LoraOptions(4)); }, {"'lm_head'", "float layer"});
  expect_value_error([&] { model->add_lora({}, fnn::LoraOptions(4)); }, {"targets is empty"});
  EXPECT_TRUE(fnn::lora_parameters(*model).empty());  // nothing changed by the refused calls
  model->add_lora({"q_proj"}, fnn::LoraOptions(4));
  expect_value_error([&] { model->add_lora({"q_proj"}, fnn::LoraOptions(4)); },
                     {"model.layers.0.self_attn.q_proj", "already has"});
  torch::NoGradGuard no_grad;
  expect_value_error([&] { model->forward(torch::tensor({{1, 2, 128}})); }, {"input_ids", "[1, 128]"});
  expect_value_error([&] { model->forward(torch::zeros({1, 65}, torch::kInt64)); },
                     {"65 positions", "max_position_embeddings=64"});
  expect_value_error([&] { model->forward(torch::zeros({4}, torch::kInt64)); }, {"input_ids", "[4]"});
  expect_value_error([&] { model->forward(torch::zeros({1, 4}, torch::kInt64), torch::zeros({1, 3}, torch::kInt64)); },
                     {"labels", "[1, 3]"});
}

}  // namespace
