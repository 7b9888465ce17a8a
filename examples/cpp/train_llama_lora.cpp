// QLoRA on a transformers Llama from C++: loads a 4-bit checkpoint that transformers +
// bitsandbytes saved (examples/cpp/tiny_llama.py save, or any Llama directory: config.json +
// model.safetensors or a sharded index), records its base logits on fixed probe ids, puts LoRA
// adapters on the chosen projections, trains them with fourbit's AdamW on a small fixed token
// dataset (a repeating sequence: next-token prediction a model can learn in a few dozen
// steps), and saves a PEFT adapter plus probe.safetensors (probe ids, base and tuned logits, the
// losses), which `tiny_llama.py check` compares with transformers + PEFT.
//
//   train_llama_lora CHECKPOINT_DIR ADAPTER_DIR [STEPS] [TARGETS] [LR]
// TARGETS: comma-separated projection names (default q_proj,v_proj) or all-linear; LR: AdamW's
// learning rate (default 1e-2).
// Exits 1 if the loss does not fall to under half its first value.
#include <torch/torch.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <sstream>
#include <string>
#include <vector>

#include "fourbit/torch/llama.h"
#include "fourbit/torch/optim.h"
#include "fourbit/torch/serialize.h"

namespace fm = fourbit::models;
namespace fnn = fourbit::nn;

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream in(s);
  for (std::string item; std::getline(in, item, ',');) {
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

int main(int argc, char** argv) try {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s CHECKPOINT_DIR ADAPTER_DIR [STEPS] [TARGETS] [LR]\n", argv[0]);
    return 2;
  }
  const std::string checkpoint = argv[1], adapter_dir = argv[2];
  const int steps = argc > 3 ? std::atoi(argv[3]) : 40;
  const auto targets = split(argc > 4 ? argv[4] : "q_proj,v_proj");
  const double lr = argc > 5 ? std::atof(argv[5]) : 1e-2;
  torch::manual_seed(0);

  auto t0 = std::chrono::steady_clock::now();
  fm::LlamaForCausalLM model = fm::load_llama_4bit(checkpoint);
  const auto& config = model->config();
  std::printf("loaded %s: %lld layers, hidden %lld, heads %lld/%lld kv, vocab %lld (%.3f s)\n", checkpoint.c_str(),
              static_cast<long long>(config.num_hidden_layers), static_cast<long long>(config.hidden_size),
              static_cast<long long>(config.num_attention_heads), static_cast<long long>(config.num_key_value_heads),
              static_cast<long long>(config.vocab_size),
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());

  // Probe ids (fixed) and the base model's logits on them, before any adapter.
  const auto probe = torch::randint(0, config.vocab_size, {2, 12});
  model->eval();
  torch::Tensor base_logits;
  {
    torch::NoGradGuard no_grad;
    base_logits = model->forward(probe).logits;
  }

  // The dataset: 8 sequences of 16 tokens, each a window of one fixed random cycle of 24 tokens.
  const int64_t seq = 16, period = 24;
  const auto cycle = torch::randint(0, config.vocab_size, {period});
  std::vector<torch::Tensor> rows;
  for (int64_t i = 0; i < 8; ++i) rows.push_back(cycle.index({torch::arange(i * 3, i * 3 + seq) % period}));
  const auto ids = torch::stack(rows);

  auto params = model->add_lora(targets, fnn::LoraOptions(8).lora_alpha(16));
  fourbit::optim::AdamW optimizer(params, fourbit::optim::AdamWOptions(lr).weight_decay(0.0));
  std::vector<float> losses;
  model->train();
  t0 = std::chrono::steady_clock::now();
  for (int step = 0; step < steps; ++step) {
    optimizer.zero_grad();
    auto loss = model->forward(ids, ids).loss;  // labels = ids: transformers shifts them
    loss.backward();
    optimizer.step();
    losses.push_back(loss.item<float>());
    if (step % 10 == 0 || step == steps - 1) std::printf("step %4d  loss %.4f\n", step, losses.back());
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("trained %zu LoRA tensors for %d steps in %.3f s (%.1f ms/step)\n", params.size(), steps, seconds,
              1e3 * seconds / std::max(steps, 1));
  fourbit::io::save_peft_adapter(*model, adapter_dir, checkpoint);

  model->eval();
  torch::NoGradGuard no_grad;
  fourbit::io::save_safetensors(adapter_dir + "/probe.safetensors", {{"input_ids", probe},
                                                                     {"base_logits", base_logits},
                                                                     {"logits", model->forward(probe).logits},
                                                                     {"losses", torch::tensor(losses)}});
  const bool fell = !losses.empty() && losses.back() < 0.5f * losses.front();
  std::printf("loss %.4f -> %.4f (%s); adapter saved to %s\n", losses.empty() ? 0.f : losses.front(),
              losses.empty() ? 0.f : losses.back(), fell ? "fell" : "did NOT fall by half", adapter_dir.c_str());
  return fell ? 0 : 1;
} catch (const std::exception& e) {
  std::fprintf(stderr, "train_llama_lora: %s\n", e.what());
  return 1;
}
