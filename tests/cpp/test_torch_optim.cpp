// fourbit::optim (AdamW, AdamW8bit, PagedAdamW8bit) against fourbit.optim in Python on the
// same parameters and gradients (tests/fixtures/cpp_torch/optim.safetensors): parameters and
// states after three steps, a save/load in the middle, and argument and archive errors.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <memory>
#include <sstream>

#include "fourbit/torch/optim.h"
#include "torch_fixtures.h"

namespace {

using namespace fourbit_test;
namespace fo = fourbit::optim;

fo::AdamWOptions hyper() { return fo::AdamWOptions(1e-2).beta1(0.9).beta2(0.99).eps(1e-8).weight_decay(0.1); }

std::unique_ptr<fo::AdamW> make(const std::string& name, std::vector<torch::Tensor> params) {
  if (name == "adamw") return std::make_unique<fo::AdamW>(params, hyper());
  if (name == "adamw8bit") return std::make_unique<fo::AdamW8bit>(params, hyper());
  return std::make_unique<fo::PagedAdamW8bit>(params, hyper());
}

void run_steps(fo::AdamW& opt, torch::Tensor& p, torch::Tensor& q, const fourbit::io::TensorMap& fx, int from, int to) {
  for (int s = from; s < to; ++s) {
    p.mutable_grad() = entry(fx, "gp" + std::to_string(s)).clone();
    q.mutable_grad() = entry(fx, "gq" + std::to_string(s)).clone();
    opt.step();
  }
}

class OptimCase : public ::testing::TestWithParam<std::string> {};

TEST_P(OptimCase, ThreeStepsMatchPython) {
  const auto fx = load_fixture("optim.safetensors");
  const std::string name = GetParam();
  auto p = entry(fx, "p0").clone().requires_grad_(true);
  auto q = entry(fx, "q0").clone().requires_grad_(true);
  auto opt = make(name, {p, q});
  run_steps(*opt, p, q, fx, 0, 3);
  EXPECT_EQ(max_diff(p, entry(fx, name + ".p")), 0.0);
  EXPECT_EQ(max_diff(q, entry(fx, name + ".q")), 0.0);
  const auto* st = opt->state_of(p);
  ASSERT_NE(st, nullptr);
  EXPECT_EQ(st->step(), 3);
  EXPECT_TRUE(torch::equal(st->state1(), entry(fx, name + ".state.state1")));
  EXPECT_TRUE(torch::equal(st->state2(), entry(fx, name + ".state.state2")));
  if (name != "adamw") {
    EXPECT_EQ(st->state1().scalar_type(), torch::kUInt8);
    EXPECT_TRUE(torch::equal(st->absmax1(), entry(fx, name + ".state.absmax1")));
    EXPECT_TRUE(torch::equal(st->absmax2(), entry(fx, name + ".state.absmax2")));
    // q has 10 elements, below min_8bit_size: 32-bit states.
    EXPECT_EQ(opt->state_of(q)->state1().scalar_type(), torch::kFloat32);
  }
}

TEST_P(OptimCase, SaveAndLoadResumeExactly) {
  const auto fx = load_fixture("optim.safetensors");
  const std::string name = GetParam();
  auto p = entry(fx, "p0").clone().requires_grad_(true);
  auto q = entry(fx, "q0").clone().requires_grad_(true);
  auto first = make(name, {p, q});
  run_steps(*first, p, q, fx, 0, 2);
  std::stringstream archive;
  torch::save(*first, archive);
  first.reset();
  // A fresh optimizer (other hyper-parameters, no state) takes the saved ones.
  auto second = make(name, {p, q});
  second->param_groups()[0].options().set_lr(123.0);
  torch::load(*second, archive);
  EXPECT_EQ(second->param_groups()[0].options().get_lr(), 1e-2);
  EXPECT_EQ(second->state_of(p)->step(), 2);
  run_steps(*second, p, q, fx, 2, 3);
  EXPECT_EQ(max_diff(p, entry(fx, name + ".p")), 0.0);
  EXPECT_EQ(max_diff(q, entry(fx, name + ".q")), 0.0);
}

INSTANTIATE_TEST_SUITE_P(Optimizers, OptimCase, ::testing::Values("adamw", "adamw8bit", "paged_adamw8bit"));

TEST(OptimErrors, BadHyperParametersNameTheValue) {
  auto p = torch::zeros({4}, torch::requires_grad());
  expect_value_error([&] { fo::AdamW({p}, fo::AdamWOptions(-1.0)); }, {"lr = -1"});
  expect_value_error([&] { fo::AdamW({p}, fo::AdamWOptions().beta2(1.0)); }, {"beta2 = 1"});
  expect_value_error([&] { fo::AdamW({p}, fo::AdamWOptions().eps(0.0)); }, {"eps = 0"});
  expect_value_error([&] { fo::AdamW({p}, {}, 16); }, {"optim_bits", "16"});
}

TEST(OptimErrors, AnArchiveForOtherParametersIsRefusedAndChangesNothing) {
  auto p = torch::randn({8, 4}, torch::requires_grad());
  fo::AdamW small({p});
  p.mutable_grad() = torch::ones({8, 4});
  small.step();
  std::stringstream archive;
  torch::save(small, archive);
  auto other = torch::randn({4, 8}, torch::requires_grad());
  fo::AdamW target({other}, fo::AdamWOptions(0.5));
  expect_value_error([&] { torch::load(target, archive); }, {"state_0_0_state1", "[8, 4]", "[4, 8]"});
  EXPECT_EQ(target.state_of(other), nullptr);
  EXPECT_EQ(target.param_groups()[0].options().get_lr(), 0.5);
  auto a = torch::zeros({3}, torch::requires_grad()), b = torch::zeros({3}, torch::requires_grad());
  fo::AdamW two({a, b});
  archive.seekg(0);
  expect_value_error([&] { torch::load(two, archive); }, {"group 0", "1 parameters", "2"});
}

// GPU machine: 8-bit paged states on CUDA give the CPU's parameters (fp32 reordering aside).
TEST(CudaOptim, PagedAdamW8bitMatchesCpu) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "needs a CUDA GPU";
  const auto fx = load_fixture("optim.safetensors");
  auto p = entry(fx, "p0").cuda().requires_grad_(true);
  auto q = entry(fx, "q0").cuda().requires_grad_(true);
  fo::PagedAdamW8bit opt({p, q}, hyper());
  for (int s = 0; s < 3; ++s) {
    p.mutable_grad() = entry(fx, "gp" + std::to_string(s)).cuda();
    q.mutable_grad() = entry(fx, "gq" + std::to_string(s)).cuda();
    opt.step();
  }
  EXPECT_LE(max_diff(p.cpu(), entry(fx, "paged_adamw8bit.p")), 1e-5);
  EXPECT_LE(max_diff(q.cpu(), entry(fx, "paged_adamw8bit.q")), 1e-5);
}

}  // namespace
