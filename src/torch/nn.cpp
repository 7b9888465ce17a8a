// fourbit::nn (include/fourbit/torch/nn.h): Linear4bit and LoraLinear4bit over the
// torch.ops.fourbit ops, with their autograd as torch::autograd::Function (the C++ twin of
// python/fourbit/_ops.py's registered autograd: the weight is frozen; x, bias and the adapter
// get gradients, each only when it requires one).
#include "fourbit/torch/nn.h"

#include <torch/autograd.h>
#include <torch/nn/init.h>

#include <cmath>
#include <ostream>
#include <utility>

#include "fourbit/codebook.h"
#include "fourbit/lora.h"
#include "fourbit/types.h"
#include "ops.h"

namespace fourbit {
namespace nn {
namespace {

using ::torch::Tensor;
using ::torch::autograd::AutogradContext;
using ::torch::autograd::variable_list;

constexpr int64_t kNestedBlocksize = 256;  // bitsandbytes' blocksize of the absmax's own quantization

// The weight arguments every matmul op takes after its activation (gemm_ops.cpp's order).
struct WeightArgs {
  Tensor W, absmax;
  std::optional<Tensor> nested_absmax, nested_code, offset;
  int64_t blocksize, nested_blocksize;
  std::string quant_type;
  int64_t N, K;

  void save(AutogradContext* ctx) const {
    ctx->saved_data["W"] = W;
    ctx->saved_data["absmax"] = absmax;
    ctx->saved_data["nested_absmax"] = nested_absmax;
    ctx->saved_data["nested_code"] = nested_code;
    ctx->saved_data["offset"] = offset;
    ctx->saved_data["config"] = std::vector<int64_t>{blocksize, nested_blocksize, N, K};
    ctx->saved_data["quant_type"] = quant_type;
  }
  static WeightArgs load(AutogradContext* ctx) {
    auto opt = [&](const char* key) -> std::optional<Tensor> {
      const auto& v = ctx->saved_data[key];
      return v.isNone() ? std::nullopt : std::optional<Tensor>(v.toTensor());
    };
    const auto config = ctx->saved_data["config"].toIntVector();
    return {ctx->saved_data["W"].toTensor(), ctx->saved_data["absmax"].toTensor(), opt("nested_absmax"),
            opt("nested_code"), opt("offset"), config[0], config[1],
            ctx->saved_data["quant_type"].toStringRef(), config[2], config[3]};
  }
};

Tensor bias_grad(const Tensor& grad_output, int64_t N) { return grad_output.reshape({-1, N}).sum(0); }

// y = x @ deq(W)^T + bias. Inputs: x, bias, weight (not differentiable).
class Gemm4bitFunction : public ::torch::autograd::Function<Gemm4bitFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const std::optional<Tensor>& bias,
                        const WeightArgs& w) {
    w.save(ctx);
    ctx->saved_data["x_grad"] = x.requires_grad();
    ctx->saved_data["bias_grad"] = bias.has_value() && bias->requires_grad();
    return ops::gemm_4bit(x, w.W, w.absmax, w.nested_absmax, w.nested_code, w.offset, bias, w.blocksize,
                          w.nested_blocksize, w.quant_type, w.N, w.K);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const WeightArgs w = WeightArgs::load(ctx);
    const Tensor& dy = grads[0];
    Tensor dx, dbias;
    if (ctx->saved_data["x_grad"].toBool()) {
      dx = ops::gemm_4bit_grad_input(dy, w.W, w.absmax, w.nested_absmax, w.nested_code, w.offset, w.blocksize,
                                     w.nested_blocksize, w.quant_type, w.N, w.K);
    }
    if (ctx->saved_data["bias_grad"].toBool()) dbias = bias_grad(dy, w.N);
    return {dx, dbias, Tensor()};
  }
};

// y = x @ deq(W)^T + bias + scaling * (x_l @ A^T) @ B^T, x_l = x_lora or x.
// Inputs: x, bias, lora_A, lora_B, x_lora, weight, scaling.
class Lora4bitFunction : public ::torch::autograd::Function<Lora4bitFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const std::optional<Tensor>& bias,
                        const Tensor& lora_A, const Tensor& lora_B, const std::optional<Tensor>& x_lora,
                        const WeightArgs& w, double scaling) {
    auto [y, xa] = ops::lora_4bit(x, w.W, w.absmax, w.nested_absmax, w.nested_code, w.offset, bias, w.blocksize,
                                  w.nested_blocksize, w.quant_type, w.N, w.K, lora_A, lora_B, scaling, x_lora);
    w.save(ctx);
    const bool separate = x_lora.has_value();
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["separate"] = separate;
    ctx->saved_data["needs"] = std::vector<bool>{
        x.requires_grad(), separate && x_lora->requires_grad(), lora_A.requires_grad(),
        lora_B.requires_grad(), bias.has_value() && bias->requires_grad()};
    ctx->save_for_backward({lora_A, lora_B, separate ? *x_lora : x, xa});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const WeightArgs w = WeightArgs::load(ctx);
    const auto saved = ctx->get_saved_variables();
    const auto needs = ctx->saved_data["needs"].toBoolList();
    const bool separate = ctx->saved_data["separate"].toBool();
    const Tensor& dy = grads[0];
    Tensor dx, dx_lora, da, db, dbias;
    std::array<bool, 4> mask{needs[0], needs[1], needs[2], needs[3]};
    if (mask[0] || mask[1] || mask[2] || mask[3]) {
      auto out = ops::lora_4bit_backward(dy, w.W, w.absmax, w.nested_absmax, w.nested_code, w.offset, w.blocksize,
                                         w.nested_blocksize, w.quant_type, w.N, w.K, saved[0], saved[1],
                                         ctx->saved_data["scaling"].toDouble(), saved[2], saved[3], separate, mask);
      if (mask[0]) dx = std::get<0>(out);
      if (mask[1]) dx_lora = std::get<1>(out);
      if (mask[2]) da = std::get<2>(out);
      if (mask[3]) db = std::get<3>(out);
    }
    if (needs[4]) dbias = bias_grad(dy, w.N);
    return {dx, dbias, da, db, dx_lora, Tensor(), Tensor()};
  }
};

bool is_float_dtype(::torch::Dtype d) {
  return d == ::torch::kFloat32 || d == ::torch::kFloat16 || d == ::torch::kBFloat16;
}

Tensor codebook_tensor(const std::string& quant_type) {
  const auto& values = codebook_4bit(parse_quant_type(quant_type));
  return ::torch::tensor(std::vector<float>(values.begin(), values.end()), ::torch::kFloat32);
}

Tensor dynamic_map_tensor() {
  const auto values = create_dynamic_map(true, 7, 8);
  return ::torch::tensor(std::vector<float>(values.begin(), values.end()), ::torch::kFloat32);
}

WeightArgs weight_args(const Linear4bitImpl& l, const Tensor& W, const Tensor& absmax, const Tensor& nested_absmax,
                       const Tensor& nested_code, const Tensor& offset) {
  const auto& s = l.quant_state();
  WeightArgs w{W, absmax, std::nullopt, std::nullopt, std::nullopt, s.blocksize, kNestedBlocksize,
               s.quant_type, l.options().out_features(), l.options().in_features()};
  if (s.nested) {
    w.nested_absmax = nested_absmax;
    w.nested_code = nested_code;
    w.offset = offset;
    w.nested_blocksize = s.nested_blocksize;
  }
  return w;
}

}  // namespace

// ---------------------------------------------------------------------------- Linear4bit

Linear4bitImpl::Linear4bitImpl(const Linear4bitOptions& options) : options_(options) {
  TORCH_CHECK_VALUE(options.in_features() > 0, "Linear4bit: in_features must be > 0, got ",
                    options.in_features());
  TORCH_CHECK_VALUE(options.out_features() > 0, "Linear4bit: out_features must be > 0, got ",
                    options.out_features());
  TORCH_CHECK_VALUE(options.quant_type() == "nf4" || options.quant_type() == "fp4",
                    "Linear4bit: quant_type must be 'nf4' or 'fp4', got '", options.quant_type(), "'");
  const int64_t b = options.blocksize();
  TORCH_CHECK_VALUE(b >= 32 && b <= 4096 && (b & (b - 1)) == 0,
                    "Linear4bit: blocksize must be one of 32, 64, ..., 4096, got ", b);
  if (options.compute_dtype()) {
    TORCH_CHECK_VALUE(is_float_dtype(*options.compute_dtype()),
                      "Linear4bit: compute_dtype must be float32, float16 or bfloat16, got ",
                      *options.compute_dtype());
  }
  if (!options.init_weight()) {
    // Zero codes and scales in the options' format, shaped as load_quantized checks them.
    const int64_t numel = options.out_features() * options.in_features();
    const int64_t blocks = (numel + b - 1) / b;
    QuantState4bit state;
    state.quant_type = options.quant_type();
    state.blocksize = b;
    state.nested = options.compress_statistics();
    const auto bytes = ::torch::TensorOptions().dtype(::torch::kUInt8);
    const auto floats = ::torch::TensorOptions().dtype(::torch::kFloat32);
    std::optional<Tensor> nested_absmax, nested_code;
    if (state.nested) {
      nested_absmax = ::torch::zeros({(blocks + state.nested_blocksize - 1) / state.nested_blocksize}, floats);
      nested_code = ::torch::zeros({256}, floats);
    }
    load_quantized(::torch::zeros({(numel + 1) / 2, 1}, bytes),
                   ::torch::zeros({blocks}, state.nested ? bytes : floats), state, nested_absmax, nested_code);
    if (options.bias()) bias_ = register_parameter("bias", ::torch::zeros({options.out_features()}), false);
    return;
  }
  // torch::nn::Linear's initialisation: Kaiming-uniform weight, bias in +-1/sqrt(in).
  Tensor weight = ::torch::empty({options.out_features(), options.in_features()});
  ::torch::nn::init::kaiming_uniform_(weight, std::sqrt(5.0));
  std::optional<Tensor> bias;
  if (options.bias()) {
    const double bound = 1.0 / std::sqrt(static_cast<double>(options.in_features()));
    bias = ::torch::empty({options.out_features()}).uniform_(-bound, bound);
  }
  quantize_(weight, bias);
}

void Linear4bitImpl::set_buffers(const Tensor& packed, const Tensor& absmax,
                                 const std::optional<Tensor>& nested_absmax,
                                 const std::optional<Tensor>& nested_code) {
  // Registered once, then replaced in place (set_data): a name cannot be registered twice,
  // and handles to the buffers stay valid. Without double quantization the nested buffers
  // hold empty tensors.
  const auto device = packed.device();
  const Tensor none = ::torch::empty({0}, ::torch::TensorOptions().dtype(::torch::kFloat32).device(device));
  auto assign = [&](Tensor& member, const char* name, const Tensor& value) {
    if (member.defined()) {
      member.set_data(value);
    } else {
      member = register_buffer(name, value);
    }
  };
  assign(weight_, "weight", packed);
  assign(absmax_, "absmax", absmax);
  assign(quant_map_, "quant_map", codebook_tensor(state_.quant_type).to(device));
  assign(nested_absmax_, "nested_absmax", state_.nested ? *nested_absmax : none);
  assign(nested_quant_map_, "nested_quant_map", state_.nested ? *nested_code : none);
  assign(offset_, "nested_offset",
         ::torch::tensor(static_cast<float>(state_.nested_offset), ::torch::kFloat32).to(device));
}

void Linear4bitImpl::quantize_(const Tensor& weight, const std::optional<Tensor>& bias) {
  const int64_t N = options_.out_features(), K = options_.in_features();
  TORCH_CHECK_VALUE(weight.defined() && weight.dim() == 2 && weight.size(0) == N && weight.size(1) == K,
                    "Linear4bit.quantize_: weight must have shape [out_features=", N, ", in_features=", K,
                    "], got ", weight.defined() ? weight.sizes() : ::torch::IntArrayRef{});
  TORCH_CHECK_VALUE(is_float_dtype(weight.scalar_type()),
                    "Linear4bit.quantize_: weight must be float32, float16 or bfloat16, got ", weight.scalar_type());
  ::torch::NoGradGuard no_grad;
  auto [packed, absmax] =
      ops::quantize_4bit(weight.contiguous(), options_.blocksize(), options_.quant_type(), ::torch::kUInt8);
  state_ = QuantState4bit{options_.quant_type(), options_.blocksize(), weight.scalar_type(),
                          options_.compress_statistics(), kNestedBlocksize, 0.0};
  std::optional<Tensor> nested_absmax, nested_code;
  if (state_.nested) {
    // bitsandbytes' double quantization: absmax - mean(absmax), 8-bit blockwise (256).
    const Tensor offset = absmax.mean();
    nested_code = dynamic_map_tensor().to(weight.device());
    std::tie(absmax, nested_absmax) = ops::quantize_blockwise(absmax - offset, *nested_code, kNestedBlocksize);
    state_.nested_offset = offset.item<double>();
  }
  set_buffers(packed, absmax, nested_absmax, nested_code);
  if (options_.bias()) {
    Tensor b = bias ? bias->detach().to(weight.scalar_type()).clone()
                    : ::torch::zeros({N}, weight.options());
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == N, "Linear4bit.quantize_: bias must have shape [", N,
                      "], got ", b.sizes());
    if (bias_.defined()) {
      bias_.set_data(b);
    } else {
      bias_ = register_parameter("bias", b, /*requires_grad=*/false);
    }
  } else {
    TORCH_CHECK_VALUE(!bias, "Linear4bit.quantize_: a bias was given but the layer has bias=false");
  }
}

void Linear4bitImpl::load_quantized(const Tensor& packed, const Tensor& absmax, const QuantState4bit& state,
                                    const std::optional<Tensor>& nested_absmax,
                                    const std::optional<Tensor>& nested_code) {
  const int64_t N = options_.out_features(), K = options_.in_features();
  const int64_t numel = N * K;
  TORCH_CHECK_VALUE(state.quant_type == "nf4" || state.quant_type == "fp4",
                    "quant_type must be 'nf4' or 'fp4', got '", state.quant_type, "'");
  const int64_t b = state.blocksize;
  TORCH_CHECK_VALUE(b >= 32 && b <= 4096 && (b & (b - 1)) == 0,
                    "blocksize must be one of 32, 64, ..., 4096, got ", b);
  TORCH_CHECK_VALUE(packed.scalar_type() == ::torch::kUInt8, "weight must be uint8 (packed 4-bit codes), got ",
                    packed.scalar_type());
  TORCH_CHECK_VALUE(packed.numel() == (numel + 1) / 2, "weight has ", packed.numel(),
                    " bytes, but a [", N, ", ", K, "] weight packs into ", (numel + 1) / 2);
  const int64_t blocks = (numel + b - 1) / b;
  TORCH_CHECK_VALUE(absmax.numel() == blocks, "absmax has ", absmax.numel(), " elements, but shape [", N, ", ",
                    K, "] with blocksize ", b, " needs ", blocks);
  if (state.nested) {
    TORCH_CHECK_VALUE(absmax.scalar_type() == ::torch::kUInt8, "absmax must be uint8 when nested, got ",
                      absmax.scalar_type());
    TORCH_CHECK_VALUE(nested_absmax && nested_code, "a nested quant state needs nested_absmax and nested_quant_map");
    const int64_t nb = state.nested_blocksize;
    TORCH_CHECK_VALUE(nb >= 32 && nb <= 4096 && (nb & (nb - 1)) == 0,
                      "nested_blocksize must be one of 32, 64, ..., 4096, got ", nb);
    const int64_t nested_blocks = (blocks + nb - 1) / nb;
    TORCH_CHECK_VALUE(nested_absmax->scalar_type() == ::torch::kFloat32 && nested_absmax->numel() == nested_blocks,
                      "nested_absmax must be float32 with ", nested_blocks, " elements, got ",
                      nested_absmax->scalar_type(), " with ", nested_absmax->numel());
    TORCH_CHECK_VALUE(nested_code->scalar_type() == ::torch::kFloat32 && nested_code->numel() == 256,
                      "nested_quant_map must be float32 with 256 elements, got ", nested_code->scalar_type(),
                      " with ", nested_code->numel());
    TORCH_CHECK_VALUE(std::isfinite(state.nested_offset), "nested_offset must be finite, got ",
                      state.nested_offset);
  } else {
    TORCH_CHECK_VALUE(absmax.scalar_type() == ::torch::kFloat32, "absmax must be float32, got ",
                      absmax.scalar_type());
  }
  TORCH_CHECK_VALUE(is_float_dtype(state.dtype), "dtype must be float32, float16 or bfloat16, got ", state.dtype);
  const auto device = weight_.defined() ? weight_.device() : packed.device();
  state_ = state;
  auto to_dev = [&](const Tensor& t) { return t.detach().to(device).contiguous().clone(); };
  std::optional<Tensor> na, nc;
  if (state.nested) {
    na = to_dev(*nested_absmax);
    nc = to_dev(*nested_code);
  }
  set_buffers(to_dev(packed).reshape({-1, 1}), to_dev(absmax).reshape({-1}), na, nc);
}

Linear4bitImpl::Prepared Linear4bitImpl::prepare(const Tensor& x) const {
  TORCH_CHECK_VALUE(x.defined() && x.dim() >= 1 && x.size(-1) == options_.in_features(),
                    "Linear4bit: x's last dimension must be in_features=", options_.in_features(), ", got shape ",
                    x.defined() ? x.sizes() : ::torch::IntArrayRef{});
  TORCH_CHECK_VALUE(is_float_dtype(x.scalar_type()), "Linear4bit: x must be float32, float16 or bfloat16, got ",
                    x.scalar_type());
  Prepared p{x, std::nullopt, x.scalar_type()};
  if (options_.compute_dtype() && *options_.compute_dtype() != x.scalar_type()) p.x = x.to(*options_.compute_dtype());
  if (bias_.defined()) p.bias = bias_.scalar_type() == p.x.scalar_type() ? bias_ : bias_.to(p.x.scalar_type());
  return p;
}

Tensor Linear4bitImpl::forward(const Tensor& x) {
  Prepared p = prepare(x);
  Tensor y = Gemm4bitFunction::apply(p.x, p.bias,
                                     weight_args(*this, weight_, absmax_, nested_absmax_, nested_quant_map_, offset_));
  return y.scalar_type() == p.input_dtype ? y : y.to(p.input_dtype);
}

Tensor Linear4bitImpl::dequantize(::torch::Dtype dtype) const {
  ::torch::NoGradGuard no_grad;
  const std::vector<int64_t> shape{options_.out_features(), options_.in_features()};
  if (state_.nested) {
    return ops::dequantize_4bit_nested(weight_, absmax_, nested_absmax_, nested_quant_map_, offset_, state_.blocksize,
                                       state_.nested_blocksize, state_.quant_type, shape, dtype);
  }
  return ops::dequantize_4bit(weight_, absmax_, state_.blocksize, state_.quant_type, shape, dtype);
}

void Linear4bitImpl::pretty_print(std::ostream& stream) const {
  stream << "fourbit::nn::Linear4bit(in_features=" << options_.in_features()
         << ", out_features=" << options_.out_features() << ", bias=" << (bias_.defined() ? "true" : "false")
         << ", quant_type=" << state_.quant_type << ", blocksize=" << state_.blocksize
         << ", nested=" << (state_.nested ? "true" : "false") << ")";
}

// ---------------------------------------------------------------------------- LoraLinear4bit

LoraLinear4bitImpl::LoraLinear4bitImpl(Linear4bit base, const LoraOptions& options)
    : options_(options), base_(std::move(base)) {
  TORCH_CHECK_VALUE(!base_.is_empty(), "LoraLinear4bit: base must be a Linear4bit, got an empty holder");
  TORCH_CHECK_VALUE(options.r() >= 1 && options.r() <= kLoraMaxRank, "LoraLinear4bit: r must be in [1, ",
                    kLoraMaxRank, "], got ", options.r());
  TORCH_CHECK_VALUE(std::isfinite(options.lora_alpha()), "LoraLinear4bit: lora_alpha must be finite, got ",
                    options.lora_alpha());
  TORCH_CHECK_VALUE(options.lora_dropout() >= 0.0 && options.lora_dropout() < 1.0,
                    "LoraLinear4bit: lora_dropout must be in [0, 1), got ", options.lora_dropout());
  TORCH_CHECK_VALUE(is_float_dtype(options.dtype()), "LoraLinear4bit: dtype must be float32, float16 or bfloat16, got ",
                    options.dtype());
  const double r = static_cast<double>(options.r());
  scaling_ = options.lora_alpha() / (options.use_rslora() ? std::sqrt(r) : r);
  register_module("base_layer", base_);
  for (auto& p : base_->parameters()) p.set_requires_grad(false);
  const int64_t K = base_->options().in_features(), N = base_->options().out_features();
  const auto topts = ::torch::TensorOptions().dtype(options.dtype()).device(base_->weight().device());
  Tensor a = ::torch::empty({options.r(), K}, topts), b = ::torch::empty({N, options.r()}, topts);
  {
    ::torch::NoGradGuard no_grad;
    // PEFT's init: lora_A as nn.Linear's weight (Kaiming-uniform, a = sqrt(5)), lora_B zero.
    ::torch::nn::init::kaiming_uniform_(a, std::sqrt(5.0));
    if (options.init_lora_weights()) {
      b.zero_();
    } else {
      ::torch::nn::init::kaiming_uniform_(b, std::sqrt(5.0));
    }
  }
  lora_A_ = register_parameter("lora_A", a);
  lora_B_ = register_parameter("lora_B", b);
}

Tensor LoraLinear4bitImpl::forward(const Tensor& x) {
  const auto p = base_->prepare(x);
  const auto dtype = p.x.scalar_type();
  std::optional<Tensor> x_lora;
  if (is_training() && options_.lora_dropout() > 0.0) {
    x_lora = ::torch::dropout(x, options_.lora_dropout(), /*train=*/true).to(dtype);
  }
  const auto& l = *base_;
  Tensor y = Lora4bitFunction::apply(
      p.x, p.bias, lora_A_.to(dtype), lora_B_.to(dtype), x_lora,
      weight_args(l, l.weight(), l.absmax(), l.nested_absmax(), l.nested_quant_map(), l.nested_offset()),
      scaling_);
  return y.scalar_type() == p.input_dtype ? y : y.to(p.input_dtype);
}

Tensor LoraLinear4bitImpl::merged_weight(::torch::Dtype dtype) const {
  ::torch::NoGradGuard no_grad;
  Tensor w = base_->dequantize(::torch::kFloat32);
  w.add_(::torch::matmul(lora_B_.to(::torch::kFloat32), lora_A_.to(::torch::kFloat32)), scaling_);
  return w.to(dtype);
}

void LoraLinear4bitImpl::pretty_print(std::ostream& stream) const {
  stream << "fourbit::nn::LoraLinear4bit(r=" << options_.r() << ", lora_alpha=" << options_.lora_alpha()
         << ", scaling=" << scaling_ << ")";
}

std::vector<Tensor> lora_parameters(const ::torch::nn::Module& module) {
  std::vector<Tensor> out;
  for (const auto& m : module.modules(/*include_self=*/true)) {
    if (auto* lora = dynamic_cast<LoraLinear4bitImpl*>(m.get())) {
      out.push_back(lora->lora_A());
      out.push_back(lora->lora_B());
    }
  }
  return out;
}

}  // namespace nn
}  // namespace fourbit
