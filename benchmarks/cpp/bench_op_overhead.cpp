// Per-call cost of the dispatcher call the C++ modules make, boxed vs typed, on shapes so small
// that the call overhead is a visible part of the op: a 1x64 @ 64x64 Linear4bit forward
// (gemm_4bit) and a rank-8 LoRA forward + backward (lora_4bit + lora_4bit_backward) on the
// same layer (nf4, double-quantized absmax, bias). One thread.
//
//   boxed: what src/torch/dispatch.h's FOURBIT_CALL_OP did before: a std::vector<c10::IValue>
//          stack per call, OperatorHandle::callBoxed, outputs unboxed from the stack.
//   typed: src/torch/ops.h, what the modules call now: TypedOperatorHandle::call.
// Then the same comparison on paged_prefetch with one CPU tensor, whose CPU kernel only checks
// the device argument: the cost of the call itself. Plus, for scale, the whole module calls
// (typed): Linear4bit forward without autograd, LoraLinear4bit forward + backward (autograd).
//
// Each number is the best, over `reps` repetitions, of the mean time of `iters` calls; the
// cases alternate within each repetition (each boxed / typed pair in either order, every
// other repetition), so a load spike on a shared machine hits a few short repetitions of
// every case rather than one whole case.
//
//   cmake --build build --target bench_op_overhead
//   build/benchmarks/cpp/bench_op_overhead [iters=2000] [reps=50]
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "fourbit/torch/nn.h"
#include "ops.h"

namespace {

using torch::Tensor;

// The removed FOURBIT_CALL_OP, kept here only for the comparison.
std::vector<c10::IValue> call_boxed(const c10::OperatorHandle& op, std::vector<c10::IValue> stack) {
  op.callBoxed(&stack);
  return stack;
}

c10::OperatorHandle handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

// Mean nanoseconds per call of `fn` over `iters` calls.
double time_ns(const std::function<void()>& fn, int iters) {
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < iters; ++i) fn();
  const auto t1 = std::chrono::steady_clock::now();
  return std::chrono::duration<double, std::nano>(t1 - t0).count() / iters;
}

struct Case {
  const char* name;
  std::function<void()> fn;
  double best = 1e300;
};

}  // namespace

int main(int argc, char** argv) {
  const int iters = argc > 1 ? std::atoi(argv[1]) : 2000;
  const int reps = argc > 2 ? std::atoi(argv[2]) : 50;
  at::set_num_threads(1);
  torch::manual_seed(0);

  constexpr int64_t N = 64, K = 64, R = 8;
  fourbit::nn::Linear4bit base(fourbit::nn::Linear4bitOptions(K, N));  // nf4, nested, bias
  fourbit::nn::LoraLinear4bit lora(base, fourbit::nn::LoraOptions(R).init_lora_weights(false));
  const auto& s = base->quant_state();
  const Tensor x = torch::randn({1, K}), dy = torch::randn({1, N});
  const Tensor W = base->weight(), absmax = base->absmax(), bias = base->bias();
  const std::optional<Tensor> na = base->nested_absmax(), nc = base->nested_quant_map(), off = base->nested_offset();
  const std::optional<Tensor> opt_bias = bias;
  const Tensor A = lora->lora_A().detach(), B = lora->lora_B().detach();
  const double scaling = lora->scaling();
  const int64_t bs = s.blocksize, nbs = s.nested_blocksize;
  const std::string qt = s.quant_type;
  const std::array<bool, 4> mask{true, false, true, true};  // dX, dA, dB (no separate X_lora)

  const c10::OperatorHandle gemm_op = handle("fourbit::gemm_4bit");
  const c10::OperatorHandle lora_op = handle("fourbit::lora_4bit");
  const c10::OperatorHandle lora_bwd_op = handle("fourbit::lora_4bit_backward");
  const c10::OperatorHandle prefetch_op = handle("fourbit::paged_prefetch");
  const std::vector<Tensor> prefetch_list{x};
  const torch::Device cpu("cpu");

  auto gemm_boxed = [&] {
    return call_boxed(gemm_op, {x, W, absmax, na, nc, off, opt_bias, bs, nbs, qt, N, K, std::string("auto")})[0]
        .toTensor();
  };
  auto gemm_typed = [&] { return fourbit::ops::gemm_4bit(x, W, absmax, na, nc, off, opt_bias, bs, nbs, qt, N, K); };
  auto lora_boxed = [&] {
    auto out = call_boxed(lora_op, {x, W, absmax, na, nc, off, opt_bias, bs, nbs, qt, N, K, A, B, scaling,
                                    std::optional<Tensor>()});
    const Tensor y = out[0].toTensor(), xa = out[1].toTensor();
    auto g = call_boxed(lora_bwd_op, {dy, W, absmax, na, nc, off, bs, nbs, qt, N, K, A, B, scaling,
                                      std::optional<Tensor>(x), std::optional<Tensor>(xa), false,
                                      std::vector<bool>(mask.begin(), mask.end())});
    return std::vector<Tensor>{y, g[0].toTensor(), g[2].toTensor(), g[3].toTensor()};
  };
  auto lora_typed = [&] {
    auto [y, xa] = fourbit::ops::lora_4bit(x, W, absmax, na, nc, off, opt_bias, bs, nbs, qt, N, K, A, B, scaling,
                                           std::nullopt);
    auto g = fourbit::ops::lora_4bit_backward(dy, W, absmax, na, nc, off, bs, nbs, qt, N, K, A, B, scaling, x, xa,
                                              false, mask);
    return std::vector<Tensor>{y, std::get<0>(g), std::get<2>(g), std::get<3>(g)};
  };

  // Both paths compute the same thing.
  bool same = torch::equal(gemm_boxed(), gemm_typed()) && torch::equal(gemm_typed(), base(x).detach());
  const auto lb = lora_boxed(), lt = lora_typed();
  for (size_t i = 0; i < lb.size(); ++i) same = same && torch::equal(lb[i], lt[i]);
  if (!same) {
    std::fprintf(stderr, "boxed and typed calls disagree\n");
    return 1;
  }

  const Tensor x_grad = x.clone().requires_grad_(true);
  std::vector<Case> cases{
      {"gemm_4bit (Linear4bit forward op), boxed", [&] { gemm_boxed(); }},
      {"gemm_4bit (Linear4bit forward op), typed", [&] { gemm_typed(); }},
      {"lora_4bit + lora_4bit_backward, boxed", [&] { lora_boxed(); }},
      {"lora_4bit + lora_4bit_backward, typed", [&] { lora_typed(); }},
      {"paged_prefetch([x], cpu) (near-empty kernel), boxed",
       [&] { call_boxed(prefetch_op, {prefetch_list, cpu}); }},
      {"paged_prefetch([x], cpu) (near-empty kernel), typed",
       [&] { fourbit::ops::paged_prefetch(prefetch_list, cpu); }},
      {"Linear4bit module forward, no grad (typed)",
       [&] {
         torch::NoGradGuard no_grad;
         base(x);
       }},
      {"LoraLinear4bit module forward + backward (typed)",
       [&] {
         lora->zero_grad();
         x_grad.mutable_grad() = Tensor();
         lora(x_grad).backward(dy);
       }},
  };
  for (auto& c : cases) time_ns(c.fn, std::max(1, iters / 10));  // warm-up
  for (int r = 0; r < reps; ++r) {
    for (size_t i = 0; i < cases.size(); ++i) {
      // The boxed / typed pairs swap places every other repetition (no order bias).
      const size_t j = (r % 2 == 1 && i < 6) ? (i ^ 1) : i;
      cases[j].best = std::min(cases[j].best, time_ns(cases[j].fn, iters));
    }
  }

  std::printf("torch %s, %d thread, %d iterations x %d repetitions (best)\n\n", TORCH_VERSION,
              at::get_num_threads(), iters, reps);
  std::printf("| call | ns / call |\n|---|---:|\n");
  for (const auto& c : cases) std::printf("| %s | %.0f |\n", c.name, c.best);
  std::printf("\n| typed - boxed | ns / call | relative |\n|---|---:|---:|\n");
  const char* pairs[] = {"gemm_4bit", "lora_4bit + backward", "paged_prefetch"};
  for (size_t i = 0; i < 6; i += 2) {
    const double d = cases[i + 1].best - cases[i].best;
    std::printf("| %s | %+.0f | %+.1f%% |\n", pairs[i / 2], d, 100.0 * d / cases[i].best);
  }
  return 0;
}
