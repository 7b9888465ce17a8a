// fourbit::io: safetensors files, bitsandbytes 4-bit checkpoints (Python's and transformers'
// bytes) into module trees and back, PEFT adapters out and back; malformed input gives
// c10::ValueError naming the file, key and value.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdio>
#include <filesystem>
#include <fstream>

#include "fourbit/torch/nn.h"
#include "fourbit/torch/serialize.h"
#include "torch_fixtures.h"

namespace {

using namespace fourbit_test;
namespace fnn = fourbit::nn;
namespace fio = fourbit::io;
namespace fs = std::filesystem;

constexpr int64_t N = 48, K = 40;

std::string temp_path(const std::string& name) {
  const auto dir = fs::temp_directory_path() / ("fourbit_test_torch_io_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  return (dir / name).string();
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string safetensors_bytes(const std::string& header, const std::string& data) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((header.size() >> (8 * i)) & 0xff);
  return out + header + data;
}

// A module tree like a user's: "fc" (Linear4bit), "head.proj" (Linear4bit), "norm" (plain).
struct NetImpl : torch::nn::Module {
  NetImpl() {
    fc = register_module("fc", fnn::Linear4bit(fnn::Linear4bitOptions(K, N)));
    head = register_module("head", std::make_shared<torch::nn::Module>());
    proj = head->register_module("proj", fnn::Linear4bit(fnn::Linear4bitOptions(N, 8).bias(false)));
    norm = register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({N})));
  }
  fnn::Linear4bit fc{nullptr}, proj{nullptr};
  std::shared_ptr<torch::nn::Module> head;
  torch::nn::LayerNorm norm{nullptr};
};
TORCH_MODULE(Net);

TEST(Safetensors, RoundTripsDtypesShapesAndMetadata) {
  fio::TensorMap in{{"a", torch::randn({3, 4})},
                    {"b", torch::randn({5}).to(torch::kBFloat16)},
                    {"c", torch::arange(7, torch::kUInt8)},
                    {"d", torch::tensor({1, -2}, torch::kInt64)},
                    {"empty", torch::zeros({0, 3})}};
  const std::string path = temp_path("roundtrip.safetensors");
  fio::save_safetensors(path, in, {{"format", "pt"}});
  std::map<std::string, std::string> meta;
  const auto out = fio::load_safetensors(path, &meta);
  ASSERT_EQ(out.size(), in.size());
  for (const auto& [k, v] : in) EXPECT_TRUE(torch::equal(out.at(k), v)) << k;
  EXPECT_EQ(meta.at("format"), "pt");
}

TEST(Safetensors, MalformedFilesAreRefusedWithTheReason) {
  const std::string path = temp_path("bad.safetensors");
  write_bytes(path, "abc");
  expect_value_error([&] { fio::load_safetensors(path); }, {path, "3 bytes"});
  write_bytes(path, safetensors_bytes("{\"a\": {", ""));
  expect_value_error([&] { fio::load_safetensors(path); }, {"not valid JSON"});
  std::string big = safetensors_bytes("{}", "");
  big[0] = '\x7f';
  write_bytes(path, big);
  expect_value_error([&] { fio::load_safetensors(path); }, {"declares a header of 127 bytes"});
  write_bytes(path, safetensors_bytes(R"({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}})",
                                      std::string(16, '\0')));
  expect_value_error([&] { fio::load_safetensors(path); }, {"'w'", "span 12 bytes", "needs 16"});
  write_bytes(path, safetensors_bytes(R"({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 32]}})",
                                      std::string(16, '\0')));
  expect_value_error([&] { fio::load_safetensors(path); }, {"'w'", "[0, 32]", "16 data bytes"});
  write_bytes(path, safetensors_bytes(R"({"w": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}})", "x"));
  expect_value_error([&] { fio::load_safetensors(path); }, {"'w'", "unsupported dtype 'Q7'"});
  write_bytes(path, safetensors_bytes(R"({"w": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 1]}})", "x"));
  expect_value_error([&] { fio::load_safetensors(path); }, {"'w'", "non-negative"});
}

// Python's Linear4bit state dict, renamed to the paths of a tree.
fio::TensorMap python_layer_as(const fio::TensorMap& fx, const std::string& path) {
  fio::TensorMap out;
  const std::string prefix = "nf4.layer.";
  for (const auto& [k, v] : fx) {
    if (k.rfind(prefix, 0) == 0) out[path + "." + k.substr(prefix.size())] = v;
  }
  return out;
}

TEST(Checkpoint4bit, LoadsPythonsStateDictIntoATreeAndSavesItBack) {
  const auto fx = load_fixture("linear.safetensors");
  Net source;
  auto sd = fio::state_dict_4bit(*source);
  for (auto& [k, v] : python_layer_as(fx, "fc")) sd[k] = v;
  const std::string path = temp_path("net.safetensors");
  fio::save_safetensors(path, sd);
  Net net;
  fio::load_4bit_checkpoint(*net, path);
  EXPECT_EQ(max_diff(net->fc->dequantize(), entry(fx, "nf4.deq")), 0.0);
  EXPECT_TRUE(torch::equal(net->fc->bias(), entry(fx, "bias")));
  EXPECT_TRUE(torch::equal(net->proj->dequantize(), source->proj->dequantize()));
  EXPECT_TRUE(torch::equal(net->norm->weight, source->norm->weight));
  // And back: the saved tensors are Python's, key for key (the JSON as JSON).
  const auto again = fio::state_dict_4bit(*net);
  for (const auto& [k, v] : python_layer_as(fx, "fc")) {
    if (k.find("quant_state") == std::string::npos) EXPECT_TRUE(torch::equal(again.at(k), v)) << k;
  }
  EXPECT_TRUE(again.count("fc.weight.quant_state.bitsandbytes__nf4"));
}

TEST(Checkpoint4bit, LoadsATransformersBitsandbytesCheckpoint) {
  // tests/fixtures/bnb_llama_nf4 was quantized and saved by transformers + bitsandbytes.
  fnn::Linear4bit gate(fnn::Linear4bitOptions(64, 128).bias(false));
  fio::load_4bit_checkpoint(*gate, fixture_path("bnb_llama_nf4/model.safetensors"), /*strict=*/false,
                            "model.layers.0.mlp.gate_proj.");
  EXPECT_EQ(gate->quant_state().dtype, torch::kBFloat16);
  EXPECT_TRUE(gate->quant_state().nested);
  const auto expected = entry(load_fixture("llama.safetensors"), "gate_proj.deq");
  EXPECT_EQ(max_diff(gate->dequantize(torch::kBFloat16).to(torch::kFloat32), expected), 0.0);
}

TEST(Checkpoint4bit, BadCheckpointsNameTheKeyAndValue) {
  const auto fx = load_fixture("linear.safetensors");
  const auto good = python_layer_as(fx, "fc");
  auto load = [](fio::TensorMap sd) {
    fnn::Linear4bit layer(fnn::Linear4bitOptions(K, N));
    torch::nn::Sequential tree;  // puts the layer at path "0"
    tree->push_back(layer);
    fio::load_4bit_state_dict(*tree, sd, /*strict=*/true, "");
  };
  auto renamed = [&](fio::TensorMap sd) {
    fio::TensorMap out;
    for (auto& [k, v] : sd) out["0" + k.substr(2)] = v;
    return out;
  };
  auto sd = renamed(good);
  EXPECT_NO_THROW(load(sd));
  auto missing = sd;
  missing.erase("0.weight.absmax");
  expect_value_error([&] { load(missing); }, {"missing key '0.weight.absmax'"});
  auto extra = sd;
  extra["0.weight.stray"] = torch::zeros({1});
  expect_value_error([&] { load(extra); }, {"does not use", "'0.weight.stray'"});
  auto json_tensor = [](const std::string& s) {
    return torch::from_blob(const_cast<char*>(s.data()), {static_cast<int64_t>(s.size())}, torch::kUInt8).clone();
  };
  auto bad_json = sd;
  bad_json["0.weight.quant_state.bitsandbytes__nf4"] = json_tensor("{\"quant_type\": ");
  expect_value_error([&] { load(bad_json); }, {"0.weight.quant_state.bitsandbytes__nf4", "valid JSON"});
  auto bad_shape = sd;
  bad_shape["0.weight.quant_state.bitsandbytes__nf4"] = json_tensor(
      R"({"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [40, 48], "nested_blocksize": 256,)"
      R"( "nested_dtype": "float32", "nested_offset": 0.5})");
  expect_value_error([&] { load(bad_shape); }, {"shape is [40,48]", "[48, 40]"});
  auto bad_blocksize = sd;
  bad_blocksize["0.weight.quant_state.bitsandbytes__nf4"] = json_tensor(
      R"({"quant_type": "nf4", "blocksize": 100, "dtype": "float32", "shape": [48, 40], "nested_blocksize": 256,)"
      R"( "nested_dtype": "float32", "nested_offset": 0.5})");
  expect_value_error([&] { load(bad_blocksize); }, {"'0.weight'", "blocksize", "100"});
  auto short_absmax = sd;
  short_absmax["0.weight.absmax"] = sd["0.weight.absmax"].slice(0, 0, 3);
  expect_value_error([&] { load(short_absmax); }, {"'0.weight'", "absmax has 3 elements"});
  auto wrong_type = sd;
  wrong_type["0.weight.quant_map"] = torch::zeros({16});
  expect_value_error([&] { load(wrong_type); }, {"0.weight.quant_map", "nf4 codebook"});
  auto bad_bias = sd;
  bad_bias["0.bias"] = torch::zeros({N + 1});
  expect_value_error([&] { load(bad_bias); }, {"'0.bias'", "[49]"});
}

// A model with LoRA on both 4-bit layers.
Net lora_net(int64_t r, double alpha) {
  Net net;
  net->replace_module("fc", fnn::LoraLinear4bit(net->fc, fnn::LoraOptions(r).lora_alpha(alpha).init_lora_weights(false)));
  return net;
}

TEST(Checkpoint4bit, LoadsTheBaseOfALoraLayerFromItsPath) {
  // After LoRA is added, the base of "fc" sits at "fc.base_layer" (PEFT's name); the
  // checkpoint's keys stay "fc.weight", ... and the adapter is not in it.
  Net source;
  const std::string path = temp_path("base.safetensors");
  fio::save_4bit_checkpoint(*source, path);
  Net net = lora_net(4, 8);
  fio::load_4bit_checkpoint(*net, path);
  EXPECT_TRUE(torch::equal(net->fc->dequantize(), source->fc->dequantize()));
  EXPECT_TRUE(torch::equal(net->fc->bias(), source->fc->bias()));
}

TEST(PeftAdapter, SavesPeftsLayoutAndLoadsBack) {
  const std::string dir = temp_path("adapter");
  Net a = lora_net(4, 8);
  fio::save_peft_adapter(*a, dir, "tiny");
  const auto tensors = fio::load_safetensors(dir + "/adapter_model.safetensors");
  ASSERT_EQ(tensors.size(), 2u);
  EXPECT_EQ(tensors.at("base_model.model.fc.lora_A.weight").sizes(), (std::vector<int64_t>{4, K}));
  EXPECT_EQ(tensors.at("base_model.model.fc.lora_B.weight").sizes(), (std::vector<int64_t>{N, 4}));
  Net b = lora_net(4, 8);
  fio::load_peft_adapter(*b, dir);
  auto* la = a->named_modules()["fc"]->as<fnn::LoraLinear4bitImpl>();
  auto* lb = b->named_modules()["fc"]->as<fnn::LoraLinear4bitImpl>();
  EXPECT_TRUE(torch::equal(la->lora_A(), lb->lora_A()));
  EXPECT_TRUE(torch::equal(la->lora_B(), lb->lora_B()));
}

TEST(PeftAdapter, MismatchesAndMalformedFilesAreRefused) {
  const std::string dir = temp_path("adapter_bad");
  fio::save_peft_adapter(*lora_net(4, 8), dir);
  expect_value_error([&] { Net n = lora_net(8, 16); fio::load_peft_adapter(*n, dir); }, {"r=4", "'fc'", "r=8"});
  expect_value_error([&] { Net n = lora_net(4, 16); fio::load_peft_adapter(*n, dir); }, {"scaling 2", "'fc'", "4"});
  expect_value_error([&] { Net n; fio::load_peft_adapter(*n, dir); }, {"no LoraLinear4bit"});
  {
    std::ofstream(dir + "/adapter_config.json") << "{\"peft_type\": \"LORA\", \"r\": ";
  }
  expect_value_error([&] { Net n = lora_net(4, 8); fio::load_peft_adapter(*n, dir); },
                     {"adapter_config.json", "not valid JSON"});
  {
    std::ofstream(dir + "/adapter_config.json") << R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": true})";
  }
  expect_value_error([&] { Net n = lora_net(4, 8); fio::load_peft_adapter(*n, dir); }, {"use_dora=true"});
  {
    std::ofstream(dir + "/adapter_config.json") << R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8})";
  }
  auto tensors = fio::load_safetensors(dir + "/adapter_model.safetensors");
  tensors.erase("base_model.model.fc.lora_B.weight");
  fio::save_safetensors(dir + "/adapter_model.safetensors", tensors);
  expect_value_error([&] { Net n = lora_net(4, 8); fio::load_peft_adapter(*n, dir); },
                     {"missing key 'base_model.model.fc.lora_B.weight'"});
}

}  // namespace
