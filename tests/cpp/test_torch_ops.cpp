// The typed op calls of the C++ API (src/torch/ops.h) against boxed calls of the same ops on
// the same arguments: each wrapper's signature matches its registered kernels (a mismatch
// throws at the first call), its arguments reach the op in the schema's order, and its results
// are the op's, bit for bit. Every op the modules and optimizers call is called here on the
// CPU, paged_prefetch included (the optimizer calls it for CUDA parameters only).
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>
#include <string_view>
#include <vector>

#include "fourbit/torch/nn.h"
#include "ops.h"

namespace {

namespace ops = fourbit::ops;
using torch::Tensor;

// fourbit::<name> called boxed on `args`; returns the output stack.
std::vector<c10::IValue> boxed(const char* name, std::vector<c10::IValue> args) {
  const auto op = c10::Dispatcher::singleton().findSchemaOrThrow((std::string("fourbit::") + name).c_str(), "");
  op.callBoxed(&args);
  return args;
}

void expect_equal(const Tensor& mine, const c10::IValue& theirs) {
  ASSERT_TRUE(theirs.isTensor());
  const Tensor t = theirs.toTensor();
  EXPECT_EQ(mine.scalar_type(), t.scalar_type());
  EXPECT_EQ(mine.sizes(), t.sizes());
  EXPECT_TRUE(torch::equal(mine, t));
}

constexpr int64_t N = 24, K = 40, R = 4, kBlock = 64, kNestedBlock = 256;

struct Quantized {
  Tensor W, absmax, nested_absmax, nested_code, offset;
};

// W quantized by the typed calls (nf4, double-quantized absmax), checked against boxed calls.
Quantized quantize_both_ways(const Tensor& weight) {
  Quantized q;
  std::tie(q.W, q.absmax) = ops::quantize_4bit(weight, kBlock, "nf4", torch::kUInt8);
  const auto b = boxed("quantize_4bit", {weight, kBlock, std::string("nf4"), static_cast<int64_t>(torch::kUInt8)});
  expect_equal(q.W, b[0]);
  expect_equal(q.absmax, b[1]);

  q.offset = q.absmax.mean();
  fourbit::nn::Linear4bit ref(fourbit::nn::Linear4bitOptions(K, N));
  q.nested_code = ref->nested_quant_map().clone();
  const Tensor centered = q.absmax - q.offset;
  Tensor codes;
  std::tie(codes, q.nested_absmax) = ops::quantize_blockwise(centered, q.nested_code, kNestedBlock);
  const auto nb = boxed("quantize_blockwise", {centered, q.nested_code, kNestedBlock});
  expect_equal(codes, nb[0]);
  expect_equal(q.nested_absmax, nb[1]);
  q.absmax = codes;
  return q;
}

TEST(TorchOps, QuantizeAndDequantizeMatchBoxedCalls) {
  torch::manual_seed(0);
  const Tensor weight = torch::randn({N, K});
  std::vector<int64_t> shape{N, K};

  Tensor packed, absmax;
  std::tie(packed, absmax) = ops::quantize_4bit(weight, kBlock, "fp4", torch::kUInt8);
  const Tensor deq = ops::dequantize_4bit(packed, absmax, kBlock, "fp4", shape, torch::kBFloat16);
  EXPECT_EQ(deq.sizes(), torch::IntArrayRef(shape));
  expect_equal(deq, boxed("dequantize_4bit", {packed, absmax, kBlock, std::string("fp4"), shape,
                                              static_cast<int64_t>(torch::kBFloat16)})[0]);
  // fp4 with a per-block scale: the round trip stays within the format's coarsest step.
  EXPECT_LT((deq.to(torch::kFloat32) - weight).abs().max().item<float>(), weight.abs().max().item<float>() / 2);

  const Quantized q = quantize_both_ways(weight);
  const Tensor deq_nested = ops::dequantize_4bit_nested(q.W, q.absmax, q.nested_absmax, q.nested_code, q.offset,
                                                        kBlock, kNestedBlock, "nf4", shape, torch::kFloat32);
  expect_equal(deq_nested, boxed("dequantize_4bit_nested",
                                 {q.W, q.absmax, q.nested_absmax, q.nested_code, q.offset, kBlock, kNestedBlock,
                                  std::string("nf4"), shape, static_cast<int64_t>(torch::kFloat32)})[0]);
  EXPECT_LT((deq_nested - weight).abs().max().item<float>(), weight.abs().max().item<float>() / 4);
}

TEST(TorchOps, MatmulAndLoraOpsMatchBoxedCalls) {
  torch::manual_seed(1);
  const Quantized q = quantize_both_ways(torch::randn({N, K}));
  const Tensor x = torch::randn({3, K}), bias = torch::randn({N}), dy = torch::randn({3, N});
  const Tensor A = torch::randn({R, K}), B = torch::randn({N, R}), x_lora = torch::randn({3, K});
  const double scaling = 0.75;
  const std::optional<Tensor> na = q.nested_absmax, nc = q.nested_code, off = q.offset;

  const Tensor y = ops::gemm_4bit(x, q.W, q.absmax, na, nc, off, bias, kBlock, kNestedBlock, "nf4", N, K);
  expect_equal(y, boxed("gemm_4bit", {x, q.W, q.absmax, na, nc, off, bias, kBlock, kNestedBlock, std::string("nf4"),
                                      N, K, std::string("auto")})[0]);
  // The bias reaches the op as the bias: the same product without it differs by exactly it.
  const Tensor y0 = ops::gemm_4bit(x, q.W, q.absmax, na, nc, off, std::nullopt, kBlock, kNestedBlock, "nf4", N, K);
  EXPECT_TRUE(torch::allclose(y - y0, bias.expand({3, N}), 1e-5, 1e-5));

  const Tensor dx = ops::gemm_4bit_grad_input(dy, q.W, q.absmax, na, nc, off, kBlock, kNestedBlock, "nf4", N, K);
  EXPECT_EQ(dx.sizes(), x.sizes());
  expect_equal(dx, boxed("gemm_4bit_grad_input", {dy, q.W, q.absmax, na, nc, off, kBlock, kNestedBlock,
                                                  std::string("nf4"), N, K, std::string("auto")})[0]);

  Tensor ly, xa;
  std::tie(ly, xa) = ops::lora_4bit(x, q.W, q.absmax, na, nc, off, bias, kBlock, kNestedBlock, "nf4", N, K, A, B,
                                    scaling, x_lora);
  const auto lb = boxed("lora_4bit", {x, q.W, q.absmax, na, nc, off, bias, kBlock, kNestedBlock, std::string("nf4"),
                                      N, K, A, B, scaling, x_lora});
  expect_equal(ly, lb[0]);
  expect_equal(xa, lb[1]);
  EXPECT_TRUE(torch::allclose(xa, torch::matmul(x_lora, A.t()), 1e-5, 1e-5));
  EXPECT_TRUE(torch::allclose(ly, y + scaling * torch::matmul(xa, B.t()), 1e-4, 1e-4));

  const std::array<bool, 4> mask{true, true, true, false};
  const auto g = ops::lora_4bit_backward(dy, q.W, q.absmax, na, nc, off, kBlock, kNestedBlock, "nf4", N, K, A, B,
                                         scaling, x_lora, xa, /*separate_x_lora=*/true, mask);
  const auto gb = boxed("lora_4bit_backward",
                        {dy, q.W, q.absmax, na, nc, off, kBlock, kNestedBlock, std::string("nf4"), N, K, A, B,
                         scaling, x_lora, xa, true, std::vector<bool>(mask.begin(), mask.end())});
  expect_equal(std::get<0>(g), gb[0]);
  expect_equal(std::get<1>(g), gb[1]);
  expect_equal(std::get<2>(g), gb[2]);
  expect_equal(std::get<3>(g), gb[3]);
  EXPECT_EQ(std::get<3>(g).numel(), 0);  // dB not asked for
  EXPECT_TRUE(torch::allclose(std::get<2>(g), scaling * torch::matmul(torch::matmul(dy, B).t(), x_lora), 1e-4, 1e-4));
}

TEST(TorchOps, OptimizerOpsMatchBoxedCalls) {
  torch::manual_seed(2);
  const Tensor p0 = torch::randn({300}), g = torch::randn({300});
  const Tensor empty = torch::empty({0});
  const std::vector<int64_t> steps{3};
  auto run = [&](bool typed) {
    std::vector<Tensor> ps{p0.clone()}, gs{g}, s1{torch::full({300}, 0.1f)}, s2{torch::full({300}, 0.2f)};
    if (typed) {
      ops::adamw_step(ps, gs, s1, s2, {}, {}, empty, empty, steps, 1e-2, 0.9, 0.999, 1e-8, 0.01);
    } else {
      boxed("adamw_step", {ps, gs, s1, s2, std::vector<Tensor>{}, std::vector<Tensor>{}, empty, empty, steps, 1e-2,
                           0.9, 0.999, 1e-8, 0.01});
    }
    return std::vector<Tensor>{ps[0], s1[0], s2[0]};
  };
  const auto mine = run(true), theirs = run(false);
  EXPECT_FALSE(torch::equal(mine[0], p0));  // the step updated the parameter in place
  for (size_t i = 0; i < mine.size(); ++i) expect_equal(mine[i], c10::IValue(theirs[i]));

  const Tensor z = ops::paged_zeros({5, 7}, torch::kUInt8, torch::Device("cpu"));
  EXPECT_EQ(z.sizes(), torch::IntArrayRef({5, 7}));
  EXPECT_EQ(z.scalar_type(), torch::kUInt8);
  EXPECT_EQ(z.count_nonzero().item<int64_t>(), 0);
  expect_equal(z, boxed("paged_zeros", {std::vector<int64_t>{5, 7}, static_cast<int64_t>(torch::kUInt8),
                                        torch::Device("cpu")})[0]);

  // Host buffers never move; the device argument is still checked.
  const Tensor before = z.clone();
  ops::paged_prefetch({z}, torch::Device("cpu"));
  EXPECT_TRUE(torch::equal(z, before));
  EXPECT_THROW(ops::paged_prefetch({z}, torch::Device("meta")), c10::ValueError);
  EXPECT_THROW(boxed("paged_prefetch", {std::vector<Tensor>{z}, torch::Device("meta")}), c10::ValueError);
}

// The safety net of the wrappers: a handle whose C++ signature differs from the kernels' (here
// `str` as std::string_view instead of the kernels' std::string) is refused when it is made.
TEST(TorchOps, AWrongSignatureIsRefused) {
  using wrong = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const ops::OptTensor&,
                           const ops::OptTensor&, const ops::OptTensor&, const ops::OptTensor&, int64_t, int64_t,
                           std::string_view, int64_t, int64_t, std::string_view);
  EXPECT_THROW(ops::typed_op<wrong>("fourbit::gemm_4bit"), c10::Error);
  EXPECT_NO_THROW(ops::typed_op<ops::sig::gemm_4bit>("fourbit::gemm_4bit"));
}

}  // namespace
