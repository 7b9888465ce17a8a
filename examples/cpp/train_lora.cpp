// QLoRA from C++: loads a 4-bit checkpoint that Python saved (examples/cpp/tiny_mlp.py save),
// adds LoRA adapters to its two Linear4bit layers, trains them with AdamW on a small synthetic
// classification task, and saves a PEFT adapter (plus probe inputs and logits) that
// `tiny_mlp.py check` loads with peft.PeftModel.from_pretrained and compares.
//
//   train_lora CHECKPOINT_DIR ADAPTER_DIR [STEPS]
// Exits 1 if the loss does not fall.
#include <torch/torch.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>

#include "fourbit/torch/nn.h"
#include "fourbit/torch/optim.h"
#include "fourbit/torch/serialize.h"

namespace fnn = fourbit::nn;

// The model of tiny_mlp.py: fc1 (32 -> 64), ReLU, fc2 (64 -> 4), both 4-bit.
struct TinyMLPImpl : torch::nn::Module {
  TinyMLPImpl() {
    fc1 = register_module("fc1", fnn::Linear4bit(fnn::Linear4bitOptions(32, 64)));
    fc2 = register_module("fc2", fnn::Linear4bit(fnn::Linear4bitOptions(64, 4)));
  }
  // Puts a LoRA adapter on each layer (PEFT's module paths stay fc1, fc2).
  void add_lora(const fnn::LoraOptions& options) {
    lora1 = replace_module("fc1", fnn::LoraLinear4bit(fc1, options));
    lora2 = replace_module("fc2", fnn::LoraLinear4bit(fc2, options));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto h = torch::relu(lora1 ? lora1(x) : fc1(x));
    return lora2 ? lora2(h) : fc2(h);
  }
  fnn::Linear4bit fc1{nullptr}, fc2{nullptr};
  fnn::LoraLinear4bit lora1{nullptr}, lora2{nullptr};
};
TORCH_MODULE(TinyMLP);

int main(int argc, char** argv) try {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s CHECKPOINT_DIR ADAPTER_DIR [STEPS]\n", argv[0]);
    return 2;
  }
  const std::string checkpoint = std::string(argv[1]) + "/model.safetensors";
  const std::string adapter_dir = argv[2];
  const int steps = argc > 3 ? std::atoi(argv[3]) : 200;
  torch::manual_seed(0);

  TinyMLP model;
  fourbit::io::load_4bit_checkpoint(*model, checkpoint);
  model->add_lora(fnn::LoraOptions(8).lora_alpha(16));

  // The task: 4 classes, the argmax of a fixed random projection of the input.
  const auto x = torch::randn({512, 32});
  const auto labels = torch::matmul(x, torch::randn({32, 4})).argmax(1);

  fourbit::optim::AdamW optimizer(fnn::lora_parameters(*model), fourbit::optim::AdamWOptions(1e-2).weight_decay(0.0));
  std::vector<float> losses;
  model->train();
  const auto start = std::chrono::steady_clock::now();
  for (int step = 0; step < steps; ++step) {
    optimizer.zero_grad();
    auto loss = torch::nn::functional::cross_entropy(model->forward(x), labels);
    loss.backward();
    optimizer.step();
    losses.push_back(loss.item<float>());
    if (step % 50 == 0 || step == steps - 1) std::printf("step %4d  loss %.4f\n", step, losses.back());
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("trained %d steps in %.3f s\n", steps, seconds);
  fourbit::io::save_peft_adapter(*model, adapter_dir);

  model->eval();
  torch::NoGradGuard no_grad;
  const auto probe = torch::randn({16, 32});
  fourbit::io::save_safetensors(adapter_dir + "/probe.safetensors",
                                {{"x", probe}, {"logits", model->forward(probe)}, {"losses", torch::tensor(losses)}});
  const bool fell = losses.back() < 0.5f * losses.front();
  std::printf("loss %.4f -> %.4f (%s); adapter saved to %s\n", losses.front(), losses.back(),
              fell ? "fell" : "did NOT fall by half", adapter_dir.c_str());
  return fell ? 0 : 1;
} catch (const std::exception& e) {
  std::fprintf(stderr, "train_lora: %s\n", e.what());
  return 1;
}
