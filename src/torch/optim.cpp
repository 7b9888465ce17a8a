// fourbit::optim (include/fourbit/torch/optim.h): AdamW / AdamW8bit / PagedAdamW8bit as
// torch::optim::Optimizers over torch.ops.fourbit.adamw_step, the same state layout and update
// as python/fourbit/optim/adamw.py, with save/load through torch::serialize archives.
#include "fourbit/torch/optim.h"

#include <c10/util/Exception.h>
#include <torch/utils.h>

#include <cmath>
#include <map>
#include <string>
#include <utility>

#include "fourbit/codebook.h"
#include "ops.h"

namespace fourbit {
namespace optim {
namespace {

using ::torch::Tensor;

constexpr int64_t kBlocksize = 256;          // elements per absmax of the 8-bit states
constexpr int64_t kPagedMinNumel = 100000;   // bitsandbytes pages only states this large
constexpr int64_t kArchiveVersion = 1;

int64_t num_blocks(int64_t n) { return (n + kBlocksize - 1) / kBlocksize; }

Tensor map_tensor(bool is_signed) {
  const auto values = create_dynamic_map(is_signed, 7, 8);
  return ::torch::tensor(std::vector<float>(values.begin(), values.end()), ::torch::kFloat32);
}

std::string key(const std::string& a, size_t g, const std::string& b) { return a + "_" + std::to_string(g) + "_" + b; }
std::string key(size_t g, size_t i, const std::string& b) {
  return "state_" + std::to_string(g) + "_" + std::to_string(i) + "_" + b;
}

AdamWOptions& options_of(::torch::optim::OptimizerParamGroup& group) {
  return static_cast<AdamWOptions&>(group.options());
}

}  // namespace

void AdamWOptions::check() const {
  auto finite = [](const char* name, double v) {
    TORCH_CHECK_VALUE(std::isfinite(v), "AdamW: ", name, " must be finite, got ", v);
  };
  finite("lr", lr());
  finite("beta1", beta1());
  finite("beta2", beta2());
  finite("eps", eps());
  finite("weight_decay", weight_decay());
  TORCH_CHECK_VALUE(lr() >= 0.0, "AdamW: invalid learning rate: lr = ", lr(), " (must be >= 0)");
  TORCH_CHECK_VALUE(beta1() >= 0.0 && beta1() < 1.0, "AdamW: invalid beta1 = ", beta1(), " (must be in [0, 1))");
  TORCH_CHECK_VALUE(beta2() >= 0.0 && beta2() < 1.0, "AdamW: invalid beta2 = ", beta2(), " (must be in [0, 1))");
  TORCH_CHECK_VALUE(eps() > 0.0, "AdamW: invalid eps = ", eps(), " (must be > 0)");
  TORCH_CHECK_VALUE(weight_decay() >= 0.0, "AdamW: invalid weight_decay = ", weight_decay(), " (must be >= 0)");
}

void AdamWOptions::serialize(::torch::serialize::OutputArchive& archive) const {
  archive.write("lr", c10::IValue(lr()));
  archive.write("beta1", c10::IValue(beta1()));
  archive.write("beta2", c10::IValue(beta2()));
  archive.write("eps", c10::IValue(eps()));
  archive.write("weight_decay", c10::IValue(weight_decay()));
}

void AdamWOptions::serialize(::torch::serialize::InputArchive& archive) {
  for (const char* name : {"lr", "beta1", "beta2", "eps", "weight_decay"}) {
    c10::IValue v;
    TORCH_CHECK_VALUE(archive.try_read(name, v) && v.isDouble(), "AdamW options: archive lacks float '", name, "'");
    const double d = v.toDouble();
    const std::string n = name;
    if (n == "lr") lr(d);
    else if (n == "beta1") beta1(d);
    else if (n == "beta2") beta2(d);
    else if (n == "eps") eps(d);
    else weight_decay(d);
  }
  check();
}

AdamW::AdamW(const std::vector<::torch::optim::OptimizerParamGroup>& param_groups, AdamWOptions defaults,
             int optim_bits, int64_t min_8bit_size, bool is_paged)
    : Optimizer(param_groups, std::make_unique<AdamWOptions>(defaults)),
      optim_bits_(optim_bits),
      min_8bit_size_(min_8bit_size),
      is_paged_(is_paged) {
  TORCH_CHECK_VALUE(optim_bits == 8 || optim_bits == 32, "AdamW: optim_bits must be 8 or 32, got ", optim_bits);
  TORCH_CHECK_VALUE(min_8bit_size >= 0, "AdamW: min_8bit_size must be >= 0, got ", min_8bit_size);
  defaults.check();
  for (auto& group : param_groups_) options_of(group).check();
}

bool AdamW::uses_8bit(const Tensor& p) const { return optim_bits_ == 8 && p.numel() >= min_8bit_size_; }

Tensor AdamW::buffer(const Tensor& p, ::torch::Dtype dtype) const {
  if (is_paged_ && p.numel() >= kPagedMinNumel) {
    return ops::paged_zeros(p.sizes(), dtype, p.device());
  }
  return ::torch::zeros(p.sizes(), ::torch::TensorOptions().dtype(dtype).device(p.device()));
}

const std::pair<Tensor, Tensor>& AdamW::qmaps(const ::torch::Device& device) {
  for (const auto& entry : qmaps_) {
    if (entry.first == device) return entry.second;
  }
  qmaps_.emplace_back(device, std::make_pair(map_tensor(true).to(device), map_tensor(false).to(device)));
  return qmaps_.back().second;
}

const AdamWParamState* AdamW::state_of(const Tensor& param) const {
  auto it = state_.find(param.unsafeGetTensorImpl());
  return it == state_.end() ? nullptr : static_cast<const AdamWParamState*>(it->second.get());
}

Tensor AdamW::step(LossClosure closure) {
  ::torch::NoGradGuard no_grad;
  Tensor loss;
  if (closure) {
    at::AutoGradMode enable_grad(true);
    loss = closure();
  }
  struct Lists {
    std::vector<Tensor> ps, gs, s1, s2, a1, a2;
    std::vector<int64_t> steps;
  };
  for (auto& group : param_groups_) {
    const auto& o = options_of(group);
    std::vector<std::pair<::torch::Device, Lists>> by_device;
    for (auto& p : group.params()) {
      if (!p.grad().defined()) continue;
      TORCH_CHECK_VALUE(!p.grad().is_sparse(), "fourbit AdamW does not support sparse gradients");
      auto it = state_.find(p.unsafeGetTensorImpl());
      if (it == state_.end()) {
        if (!p.is_contiguous()) p.set_data(p.contiguous());
        auto st = std::make_unique<AdamWParamState>();
        if (uses_8bit(p)) {
          st->state1(buffer(p, ::torch::kUInt8));
          st->state2(buffer(p, ::torch::kUInt8));
          // All-zero codes with absmax 0 decode to 0, as bitsandbytes initialises them.
          const auto fopts = ::torch::TensorOptions().dtype(::torch::kFloat32).device(p.device());
          st->absmax1(::torch::zeros({num_blocks(p.numel())}, fopts));
          st->absmax2(::torch::zeros({num_blocks(p.numel())}, fopts));
        } else {
          st->state1(buffer(p, ::torch::kFloat32));
          st->state2(buffer(p, ::torch::kFloat32));
        }
        it = state_.emplace(p.unsafeGetTensorImpl(), std::move(st)).first;
      }
      auto& st = static_cast<AdamWParamState&>(*it->second);
      st.step(st.step() + 1);
      Lists* lists = nullptr;
      for (auto& entry : by_device) {
        if (entry.first == p.device()) lists = &entry.second;
      }
      if (!lists) lists = &by_device.emplace_back(p.device(), Lists{}).second;
      lists->ps.push_back(p);
      lists->gs.push_back(p.grad().is_contiguous() ? p.grad() : p.grad().contiguous());
      lists->s1.push_back(st.state1());
      lists->s2.push_back(st.state2());
      if (st.state1().scalar_type() == ::torch::kUInt8) {
        lists->a1.push_back(st.absmax1());
        lists->a2.push_back(st.absmax2());
      }
      lists->steps.push_back(st.step());
    }
    for (auto& [device, l] : by_device) {
      if (is_paged_ && device.is_cuda()) {
        std::vector<Tensor> states(l.s1);
        states.insert(states.end(), l.s2.begin(), l.s2.end());
        ops::paged_prefetch(states, device);
      }
      Tensor q1, q2;
      if (!l.a1.empty()) {
        std::tie(q1, q2) = qmaps(device);
      } else {
        q1 = q2 = ::torch::empty({0}, ::torch::TensorOptions().device(device));
      }
      ops::adamw_step(l.ps, l.gs, l.s1, l.s2, l.a1, l.a2, q1, q2, l.steps, o.lr(), o.beta1(), o.beta2(), o.eps(),
                      o.weight_decay());
    }
  }
  return loss;
}

// Archive layout (flat keys): fourbit_adamw_version, num_groups; per group g: group_g_num_params
// and the options (group_g_lr, ...); per parameter i of group g with a state: state_g_i_step,
// state_g_i_state1, state_g_i_state2 and, for 8-bit states, state_g_i_absmax1 / _absmax2.
void AdamW::save(::torch::serialize::OutputArchive& archive) const {
  archive.write("fourbit_adamw_version", c10::IValue(kArchiveVersion));
  archive.write("num_groups", c10::IValue(static_cast<int64_t>(param_groups_.size())));
  for (size_t g = 0; g < param_groups_.size(); ++g) {
    const auto& group = param_groups_[g];
    const auto& o = static_cast<const AdamWOptions&>(group.options());
    archive.write(key("group", g, "num_params"), c10::IValue(static_cast<int64_t>(group.params().size())));
    archive.write(key("group", g, "lr"), c10::IValue(o.lr()));
    archive.write(key("group", g, "beta1"), c10::IValue(o.beta1()));
    archive.write(key("group", g, "beta2"), c10::IValue(o.beta2()));
    archive.write(key("group", g, "eps"), c10::IValue(o.eps()));
    archive.write(key("group", g, "weight_decay"), c10::IValue(o.weight_decay()));
    for (size_t i = 0; i < group.params().size(); ++i) {
      const AdamWParamState* st = state_of(group.params()[i]);
      if (!st) continue;
      archive.write(key(g, i, "step"), c10::IValue(st->step()));
      archive.write(key(g, i, "state1"), st->state1().cpu());
      archive.write(key(g, i, "state2"), st->state2().cpu());
      if (st->state1().scalar_type() == ::torch::kUInt8) {
        archive.write(key(g, i, "absmax1"), st->absmax1().cpu());
        archive.write(key(g, i, "absmax2"), st->absmax2().cpu());
      }
    }
  }
}

void AdamW::load(::torch::serialize::InputArchive& archive) {
  auto read_int = [&](const std::string& k) {
    c10::IValue v;
    TORCH_CHECK_VALUE(archive.try_read(k, v) && v.isInt(), "AdamW.load: archive lacks int '", k, "'");
    return v.toInt();
  };
  auto read_double = [&](const std::string& k) {
    c10::IValue v;
    TORCH_CHECK_VALUE(archive.try_read(k, v) && v.isDouble(), "AdamW.load: archive lacks float '", k, "'");
    return v.toDouble();
  };
  const int64_t version = read_int("fourbit_adamw_version");
  TORCH_CHECK_VALUE(version == kArchiveVersion, "AdamW.load: fourbit_adamw_version is ", version,
                    ", this library reads ", kArchiveVersion);
  const int64_t groups = read_int("num_groups");
  TORCH_CHECK_VALUE(groups == static_cast<int64_t>(param_groups_.size()), "AdamW.load: the archive has ", groups,
                    " parameter groups, the optimizer has ", param_groups_.size());
  std::vector<AdamWOptions> new_options;
  std::vector<std::pair<void*, std::unique_ptr<AdamWParamState>>> new_state;
  for (size_t g = 0; g < param_groups_.size(); ++g) {
    const auto& params = param_groups_[g].params();
    const int64_t n = read_int(key("group", g, "num_params"));
    TORCH_CHECK_VALUE(n == static_cast<int64_t>(params.size()), "AdamW.load: group ", g, " of the archive has ", n,
                      " parameters, the optimizer's has ", params.size());
    AdamWOptions o;
    o.lr(read_double(key("group", g, "lr")))
        .beta1(read_double(key("group", g, "beta1")))
        .beta2(read_double(key("group", g, "beta2")))
        .eps(read_double(key("group", g, "eps")))
        .weight_decay(read_double(key("group", g, "weight_decay")));
    o.check();
    new_options.push_back(o);
    for (size_t i = 0; i < params.size(); ++i) {
      const Tensor& p = params[i];
      c10::IValue step;
      if (!archive.try_read(key(g, i, "step"), step)) continue;  // no state yet
      TORCH_CHECK_VALUE(step.isInt() && step.toInt() >= 0, "AdamW.load: '", key(g, i, "step"),
                        "' must be a non-negative int");
      auto st = std::make_unique<AdamWParamState>();
      st->step(step.toInt());
      Tensor s[2];
      for (int k = 0; k < 2; ++k) {
        const std::string name = key(g, i, k == 0 ? "state1" : "state2");
        TORCH_CHECK_VALUE(archive.try_read(name, s[k]), "AdamW.load: archive lacks '", name, "'");
        TORCH_CHECK_VALUE(s[k].sizes() == p.sizes(), "AdamW.load: '", name, "' has shape ", s[k].sizes(),
                          " but the parameter has ", p.sizes());
        TORCH_CHECK_VALUE(s[k].scalar_type() == ::torch::kFloat32 || s[k].scalar_type() == ::torch::kUInt8,
                          "AdamW.load: '", name, "' must be float32 or uint8, got ", s[k].scalar_type());
      }
      TORCH_CHECK_VALUE(s[0].scalar_type() == s[1].scalar_type(), "AdamW.load: '", key(g, i, "state2"),
                        "' has dtype ", s[1].scalar_type(), " but state1 has ", s[0].scalar_type());
      const bool eight_bit = s[0].scalar_type() == ::torch::kUInt8;
      st->state1(buffer(p, s[0].scalar_type()).copy_(s[0]));
      st->state2(buffer(p, s[1].scalar_type()).copy_(s[1]));
      if (eight_bit) {
        for (int k = 0; k < 2; ++k) {
          const std::string name = key(g, i, k == 0 ? "absmax1" : "absmax2");
          Tensor a;
          TORCH_CHECK_VALUE(archive.try_read(name, a), "AdamW.load: 8-bit state lacks '", name, "'");
          TORCH_CHECK_VALUE(a.scalar_type() == ::torch::kFloat32 && a.numel() == num_blocks(p.numel()),
                            "AdamW.load: '", name, "' must be float32 with ", num_blocks(p.numel()),
                            " elements, got ", a.scalar_type(), " with ", a.numel());
          TORCH_CHECK_VALUE(::torch::isfinite(a).all().item<bool>() && (a >= 0).all().item<bool>(),
                            "AdamW.load: '", name, "' must hold finite values >= 0 (block scales)");
          Tensor t = a.to(p.device()).reshape({-1}).clone();
          if (k == 0) st->absmax1(t); else st->absmax2(t);
        }
      }
      new_state.emplace_back(p.unsafeGetTensorImpl(), std::move(st));
    }
  }
  // Everything checked: replace.
  for (size_t g = 0; g < param_groups_.size(); ++g) options_of(param_groups_[g]) = new_options[g];
  state_.clear();
  for (auto& [k, st] : new_state) state_[k] = std::move(st);
}

}  // namespace optim
}  // namespace fourbit
