// fourbit::nn (Linear4bit, LoraLinear4bit) against fourbit.nn in Python on the same inputs
// (tests/fixtures/cpp_torch/linear.safetensors, lora.safetensors): quantized bytes, outputs,
// gradients; which parameters train; argument errors. Cuda* tests need a GPU (skipped without).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "fourbit/torch/nn.h"
#include "fourbit/torch/serialize.h"
#include "torch_fixtures.h"

namespace {

using namespace fourbit_test;
namespace fnn = fourbit::nn;

constexpr int64_t N = 48, K = 40;

fnn::Linear4bit python_layer(const fourbit::io::TensorMap& fx, const std::string& c) {
  fnn::Linear4bit layer(fnn::Linear4bitOptions(K, N).quant_type(c).compress_statistics(c == "nf4"));
  fourbit::io::load_4bit_state_dict(*layer, fx, /*strict=*/false, c + ".layer.");
  return layer;
}

class Linear4bitCase : public ::testing::TestWithParam<std::string> {};

TEST_P(Linear4bitCase, QuantizesToPythonsBytes) {
  const auto fx = load_fixture("linear.safetensors");
  const std::string c = GetParam();
  fnn::Linear4bit mine(fnn::Linear4bitOptions(K, N).quant_type(c).compress_statistics(c == "nf4"));
  mine->quantize_(entry(fx, "W"), entry(fx, "bias"));
  const auto theirs = python_layer(fx, c);
  EXPECT_TRUE(torch::equal(mine->weight(), theirs->weight()));
  EXPECT_TRUE(torch::equal(mine->absmax(), theirs->absmax()));
  EXPECT_TRUE(torch::equal(mine->bias(), theirs->bias()));
  EXPECT_EQ(mine->quant_state().nested, c == "nf4");
  if (c == "nf4") {
    EXPECT_TRUE(torch::equal(mine->nested_absmax(), theirs->nested_absmax()));
    EXPECT_TRUE(torch::equal(mine->nested_quant_map(), theirs->nested_quant_map()));
    EXPECT_EQ(mine->quant_state().nested_offset, theirs->quant_state().nested_offset);
  }
  EXPECT_EQ(max_diff(mine->dequantize(), entry(fx, c + ".deq")), 0.0);
}

TEST_P(Linear4bitCase, ForwardAndBackwardMatchPython) {
  const auto fx = load_fixture("linear.safetensors");
  const std::string c = GetParam();
  for (const auto& [name, dtype] : {std::pair{"f32", torch::kFloat32}, std::pair{"bf16", torch::kBFloat16}}) {
    SCOPED_TRACE(c + "." + name);
    auto layer = python_layer(fx, c);
    layer->bias().set_requires_grad(true);
    auto x = entry(fx, "x").detach().to(dtype).clone().requires_grad_(true);
    auto y = layer(x);
    y.backward(entry(fx, "dy").to(dtype));
    const std::string p = c + "." + name + ".";
    EXPECT_EQ(max_diff(y, entry(fx, p + "y")), 0.0);
    EXPECT_EQ(max_diff(x.grad(), entry(fx, p + "dx")), 0.0);
    EXPECT_EQ(max_diff(layer->bias().grad(), entry(fx, p + "dbias")), 0.0);
  }
}

INSTANTIATE_TEST_SUITE_P(Formats, Linear4bitCase, ::testing::Values("nf4", "fp4"));

TEST(Linear4bit, BaseIsFrozenAndHasNoWeightGradient) {
  fnn::Linear4bit layer(fnn::Linear4bitOptions(K, N));
  for (const auto& p : layer->parameters()) EXPECT_FALSE(p.requires_grad());
  EXPECT_EQ(layer->weight().scalar_type(), torch::kUInt8);
  auto x = torch::randn({2, K}, torch::requires_grad());
  layer(x).sum().backward();
  EXPECT_TRUE(x.grad().defined());
  EXPECT_FALSE(layer->bias().grad().defined());
}

// init_weight(false): the same buffers (names, shapes, dtypes) as a drawn layer, all zero, and
// a load fills them to the drawn layer's output; for nf4/fp4, nested or not, odd sizes.
TEST(Linear4bit, UninitialisedLayerHasTheDrawnLayersBuffersAndLoadsIntoThem) {
  for (const char* type : {"nf4", "fp4"}) {
    for (bool nested : {true, false}) {
      SCOPED_TRACE(std::string(type) + (nested ? " nested" : " plain"));
      const auto opts = fnn::Linear4bitOptions(70, 33).quant_type(type).blocksize(128).compress_statistics(nested);
      fnn::Linear4bit drawn(opts);
      fnn::Linear4bit empty(fnn::Linear4bitOptions(opts).init_weight(false));
      auto a = drawn->named_buffers(), b = empty->named_buffers();
      ASSERT_EQ(a.size(), b.size());
      for (const auto& item : a) {
        ASSERT_TRUE(b.contains(item.key())) << item.key();
        EXPECT_EQ(b[item.key()].sizes(), item.value().sizes()) << item.key();
        EXPECT_EQ(b[item.key()].scalar_type(), item.value().scalar_type()) << item.key();
      }
      EXPECT_EQ(empty->bias().sizes(), drawn->bias().sizes());
      EXPECT_FALSE(empty->bias().requires_grad());
      EXPECT_EQ(empty->dequantize().abs().max().item<float>(), 0.0f);
      const auto x = torch::randn({3, 70});
      EXPECT_EQ(empty(x).abs().max().item<float>(), 0.0f);
      const auto& s = drawn->quant_state();
      empty->load_quantized(drawn->weight(), drawn->absmax(), s,
                            nested ? std::optional<torch::Tensor>(drawn->nested_absmax()) : std::nullopt,
                            nested ? std::optional<torch::Tensor>(drawn->nested_quant_map()) : std::nullopt);
      empty->bias().set_data(drawn->bias().clone());
      EXPECT_TRUE(torch::equal(empty(x), drawn(x)));
    }
  }
}

TEST(LoraLinear4bit, ForwardAndBackwardMatchPython) {
  const auto fx = load_fixture("linear.safetensors");
  const auto lx = load_fixture("lora.safetensors");
  fnn::LoraLinear4bit lora(python_layer(fx, "nf4"), fnn::LoraOptions(4).lora_alpha(8));
  EXPECT_DOUBLE_EQ(lora->scaling(), 2.0);
  {
    torch::NoGradGuard g;
    lora->lora_A().copy_(entry(lx, "lora_A"));
    lora->lora_B().copy_(entry(lx, "lora_B"));
  }
  auto x = entry(fx, "x").clone().requires_grad_(true);
  auto y = lora(x);
  y.backward(entry(fx, "dy"));
  EXPECT_LE(max_diff(y, entry(lx, "y")), 1e-6);
  EXPECT_LE(max_diff(x.grad(), entry(lx, "dx")), 1e-6);
  EXPECT_LE(max_diff(lora->lora_A().grad(), entry(lx, "dA")), 1e-5);
  EXPECT_LE(max_diff(lora->lora_B().grad(), entry(lx, "dB")), 1e-5);
}

TEST(LoraLinear4bit, OnlyTheAdapterTrains) {
  fnn::LoraLinear4bit lora(fnn::Linear4bit(fnn::Linear4bitOptions(K, N)), fnn::LoraOptions(8).lora_alpha(16));
  std::vector<std::string> trainable;
  for (const auto& p : lora->named_parameters()) {
    if (p.value().requires_grad()) trainable.push_back(p.key());
  }
  EXPECT_EQ(trainable, (std::vector<std::string>{"lora_A", "lora_B"}));
  EXPECT_EQ(fnn::lora_parameters(*lora).size(), 2u);
  // PEFT's init: lora_B is zero, so the adapter starts as a no-op.
  auto x = torch::randn({3, K});
  EXPECT_TRUE(torch::equal(lora(x), lora->base_layer()->forward(x)));
  // Gradients reach lora_A and lora_B only.
  lora(x).pow(2).sum().backward();
  EXPECT_TRUE(lora->lora_B().grad().defined());
  EXPECT_GT(lora->lora_B().grad().abs().sum().item<float>(), 0.0f);
  EXPECT_FALSE(lora->base_layer()->bias().grad().defined());
}

TEST(LoraLinear4bit, MergedWeightIsBasePlusScaledProduct) {
  fnn::LoraLinear4bit lora(fnn::Linear4bit(fnn::Linear4bitOptions(K, N)),
                           fnn::LoraOptions(4).lora_alpha(8).init_lora_weights(false));
  auto x = torch::randn({5, K});
  auto merged = torch::nn::functional::linear(x, lora->merged_weight(), lora->base_layer()->bias());
  EXPECT_LE(max_diff(lora(x).detach(), merged), 1e-4);
}

TEST(LoraLinear4bit, DropoutActsOnTheAdapterInputInTrainingOnly) {
  torch::manual_seed(0);
  fnn::LoraLinear4bit lora(fnn::Linear4bit(fnn::Linear4bitOptions(K, N)),
                           fnn::LoraOptions(4).lora_dropout(0.5).init_lora_weights(false));
  fnn::LoraLinear4bit plain(lora->base_layer(), fnn::LoraOptions(4).init_lora_weights(false));
  {
    torch::NoGradGuard g;
    plain->lora_A().copy_(lora->lora_A());
    plain->lora_B().copy_(lora->lora_B());
  }
  auto x = torch::randn({6, K});
  lora->eval();
  EXPECT_TRUE(torch::allclose(lora(x), plain(x)));
  lora->train();
  auto y = lora(x);
  EXPECT_FALSE(torch::allclose(y, plain(x)));
  y.sum().backward();
  EXPECT_GT(lora->lora_A().grad().abs().sum().item<float>(), 0.0f);
}

TEST(Linear4bitErrors, BadArgumentsNameTheArgumentAndValue) {
  expect_value_error([] { fnn::Linear4bit(fnn::Linear4bitOptions(K, N).quant_type("nf5")); }, {"quant_type", "nf5"});
  expect_value_error([] { fnn::Linear4bit(fnn::Linear4bitOptions(K, N).blocksize(48)); }, {"blocksize", "48"});
  expect_value_error([] { fnn::Linear4bit(fnn::Linear4bitOptions(0, N)); }, {"in_features", "0"});
  fnn::Linear4bit layer(fnn::Linear4bitOptions(K, N));
  expect_value_error([&] { layer(torch::randn({2, K + 1})); }, {"in_features=40", "[2, 41]"});
  expect_value_error([&] { layer(torch::ones({2, K}, torch::kInt64)); }, {"x must be", "Long"});
  expect_value_error([&] { layer->quantize_(torch::randn({N, K + 2})); }, {"weight must have shape", "[48, 42]"});
  expect_value_error([&] { fnn::LoraLinear4bit(layer, fnn::LoraOptions(0)); }, {"r must be", "got 0"});
  expect_value_error([&] { fnn::LoraLinear4bit(layer, fnn::LoraOptions(4).lora_dropout(1.5)); },
                     {"lora_dropout", "1.5"});
}

// GPU machine: the same layers on CUDA give the CPU's results (within fp32 reordering).
TEST(CudaLinear4bit, MatchesCpu) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "needs a CUDA GPU";
  const auto fx = load_fixture("linear.safetensors");
  auto cpu = python_layer(fx, "nf4");
  auto gpu = python_layer(fx, "nf4");
  gpu->to(torch::kCUDA);
  fnn::LoraLinear4bit lora_cpu(cpu, fnn::LoraOptions(4).init_lora_weights(false));
  fnn::LoraLinear4bit lora_gpu(gpu, fnn::LoraOptions(4));
  {
    torch::NoGradGuard g;
    lora_gpu->lora_A().copy_(lora_cpu->lora_A());
    lora_gpu->lora_B().copy_(lora_cpu->lora_B());
  }
  auto x = entry(fx, "x");
  EXPECT_LE(max_diff(gpu(x.cuda()).cpu(), cpu(x)), 1e-4);
  torch::Tensor xc = x.clone().requires_grad_(true);
  torch::Tensor xg = x.cuda().requires_grad_(true);
  torch::Tensor yc = lora_cpu->forward(xc);
  torch::Tensor yg = lora_gpu->forward(xg);
  EXPECT_LE(max_diff(yg.detach().cpu(), yc.detach()), 1e-4);
  yc.sum().backward();
  yg.sum().backward();
  EXPECT_LE(max_diff(xg.grad().cpu(), xc.grad()), 1e-4);
  EXPECT_LE(max_diff(lora_gpu->lora_A().grad().cpu(), lora_cpu->lora_A().grad()), 1e-3);
}

}  // namespace
