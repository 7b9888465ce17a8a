// The 4-bit matmul ops: schemas, argument checks and the CPU impl.
//
//   gemm_4bit(X, W, ...) -> Y = X @ deq(W)^T (+ bias), Y of shape X.shape[:-1] + [N]
//   gemm_4bit_grad_input(dY, W, ...) -> dX = dY @ deq(W), dX of shape dY.shape[:-1] + [K]
//
// W is the packed weight (bitsandbytes' bytes, any quant_storage view) of an [N, K] matrix;
// its scales are `absmax` (fp32), or, when `nested_absmax` is given, the double-quantized
// form (uint8 absmax, nested fp32 absmax, the 256-entry nested code and the fp32 offset).
// `algo` picks the kernel: "auto", the core's CUDA kernels "gemv", "tensor_core",
// "cuda_core" (see gemm_ops_cuda.cpp; on the CPU any of them means the core's fused
// kernels), or "dequant_blas" (alias "dequant_cublas"): dequantize once, then the vendor
// BLAS (cuBLAS / oneDNN through ATen).
//
// CPU choice for algo="auto" (cpu_dispatch.cpp, per CPU class and shape class, measured
// once and cached; FOURBIT_CPU_MATMUL overrides): the core's tile-decoding kernels, or a
// dequantize into a per-thread workspace + ATen's matmul (oneDNN; AMX where present). The
// workspace is reused because a fresh CPU allocation of a full weight costs page faults
// worth several dequantize passes. fp16 stays on the core: ATen has no fast fp16 CPU GEMM.
// Autograd (register_autograd) and fake kernels are in python/fourbit/_ops.py.
#include "gemm_ops.h"

#include "checks.h"
#include "cpu_dispatch.h"

TORCH_LIBRARY_FRAGMENT(fourbit, m) {
  m.def("gemm_4bit(Tensor X, Tensor W, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code,"
        " Tensor? offset, Tensor? bias, int blocksize, int nested_blocksize, str quant_type,"
        " int N, int K, str algo=\"auto\") -> Tensor");
  m.def("gemm_4bit_grad_input(Tensor grad_output, Tensor W, Tensor absmax,"
        " Tensor? nested_absmax, Tensor? nested_code, Tensor? offset, int blocksize,"
        " int nested_blocksize, str quant_type, int N, int K, str algo=\"auto\") -> Tensor");
}

namespace fourbit {
namespace binding {

Weight4bit weight_arg(const WeightArgs& a, const at::Tensor& act, const char* act_name) {
  CHECK_ARG(a.N >= 0, "N (out_features) must be >= 0, got ", a.N);
  CHECK_ARG(a.K >= 0, "K (in_features) must be >= 0, got ", a.K);
  CHECK_ARG(a.K == 0 || a.N <= INT64_MAX / a.K, "N * K overflows int64 (N=", a.N, ", K=", a.K, ")");
  check_blocksize(a.blocksize);
  Weight4bit w;
  w.quant_type = quant_type_arg(a.quant_type);
  w.N = a.N;
  w.K = a.K;
  w.blocksize = a.blocksize;
  const int64_t numel = a.N * a.K;
  const int64_t shape[] = {a.N, a.K};
  check_on_device_of(a.W, "W", act, act_name);
  check_packed(a.W, numel, shape, "W");
  w.packed = static_cast<const uint8_t*>(a.W.const_data_ptr());

  const int64_t blocks = num_blocks(numel, a.blocksize);
  const int given = a.nested_absmax.has_value() + a.nested_code.has_value() + a.offset.has_value();
  CHECK_ARG(given == 0 || given == 3, "nested_absmax, nested_code and offset must be given "
            "together (double-quantized absmax) or not at all, got ", given, " of them");
  struct Arg {
    const at::Tensor& t;
    const char* name;
    at::ScalarType dtype;
    int64_t numel;
    const char* why;
  };
  auto check = [&](const Arg& x) {
    check_on_device_of(x.t, x.name, act, act_name);
    check_dtype(x.t, x.name, x.dtype);
    check_contiguous(x.t, x.name);
    check_numel(x.t, x.name, x.numel, x.why);
  };
  if (given == 0) {
    check({a.absmax, "absmax", at::kFloat, blocks, "one fp32 scale per block"});
    w.scales.absmax = a.absmax.const_data_ptr<float>();
    return w;
  }
  check_blocksize(a.nested_blocksize, "nested_blocksize");
  check({a.absmax, "absmax", at::kByte, blocks, "one uint8 per block when nested"});
  check({*a.nested_absmax, "nested_absmax", at::kFloat, num_blocks(blocks, a.nested_blocksize),
         "one per nested block"});
  check({*a.nested_code, "nested_code", at::kFloat, kDynamicMapSize, "the 8-bit dynamic map"});
  check({*a.offset, "offset", at::kFloat, 1, "the mean subtracted from absmax"});
  w.scales.absmax_q = a.absmax.const_data_ptr<uint8_t>();
  w.scales.nested_absmax = a.nested_absmax->const_data_ptr<float>();
  w.scales.nested_code = a.nested_code->const_data_ptr<float>();
  w.scales.offset = a.offset->const_data_ptr<float>();
  w.scales.nested_blocksize = a.nested_blocksize;
  return w;
}

int64_t activation_rows(const at::Tensor& t, const char* name, int64_t cols, const char* what) {
  CHECK_ARG(t.dim() >= 1, name, " must have at least one dimension, got a scalar");
  CHECK_ARG(t.size(-1) == cols, name, "'s last dimension must equal ", what, "=", cols,
            ", got shape ", t.sizes());
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) rows *= t.size(d);
  return rows;
}

std::vector<int64_t> with_last_dim(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> out(sizes.begin(), sizes.end());
  out.back() = last;
  return out;
}

ForwardCall prepare_forward(const at::Tensor& X, const WeightArgs& a,
                            const std::optional<at::Tensor>& bias) {
  ForwardCall call;
  Gemm4bitParams& p = call.params;
  p.dtype = to_core_dtype(X.scalar_type(), "X.dtype");
  p.weight = weight_arg(a, X, "X");
  p.M = activation_rows(X, "X", a.K, "in_features K");
  call.x = X.contiguous();
  if (bias.has_value()) {
    check_on_device_of(*bias, "bias", X, "X");
    CHECK_ARG(bias->scalar_type() == X.scalar_type(), "bias must have X's dtype ",
              X.scalar_type(), ", got ", bias->scalar_type());
    CHECK_ARG(bias->dim() == 1 && bias->size(0) == a.N, "bias must have shape [", a.N,
              "] (out_features), got ", bias->sizes());
    call.bias = bias->contiguous();
    p.bias = call.bias.const_data_ptr();
  }
  call.y = at::empty(with_last_dim(X.sizes(), a.N), X.options());
  p.x = call.x.const_data_ptr();
  p.y = call.y.mutable_data_ptr();
  call.W = a.W;
  call.absmax = a.absmax;
  return call;
}

GradInputCall prepare_grad_input(const at::Tensor& grad_output, const WeightArgs& a) {
  GradInputCall call;
  Gemm4bitGradInputParams& p = call.params;
  p.dtype = to_core_dtype(grad_output.scalar_type(), "grad_output.dtype");
  p.weight = weight_arg(a, grad_output, "grad_output");
  p.M = activation_rows(grad_output, "grad_output", a.N, "out_features N");
  call.grad_output = grad_output.contiguous();
  call.grad_input = at::empty(with_last_dim(grad_output.sizes(), a.K), grad_output.options());
  p.grad_output = call.grad_output.const_data_ptr();
  p.grad_input = call.grad_input.mutable_data_ptr();
  call.W = a.W;
  call.absmax = a.absmax;
  return call;
}

GemmAlgo parse_gemm_algo(const std::string& name) {
  if (name == "auto") return GemmAlgo::Auto;
  if (name == "gemv") return GemmAlgo::Gemv;
  if (name == "tensor_core") return GemmAlgo::TensorCore;
  if (name == "cuda_core") return GemmAlgo::CudaCore;
  if (name == "dequant_blas" || name == "dequant_cublas") return GemmAlgo::DequantBlas;
  if (name == "fused") return GemmAlgo::Fused;
  if (name == "fused_sm90") return GemmAlgo::FusedSm90;
  CHECK_ARG(false, "algo must be one of 'auto', 'gemv', 'tensor_core', 'cuda_core', "
            "'dequant_blas', 'dequant_cublas', 'fused', 'fused_sm90', got '", name, "'");
}

void gemm_forward_dense(const ForwardCall& call, const at::Tensor& w) {
  const at::Tensor x2 = call.x.view({call.params.M, call.params.weight.K});
  at::Tensor y2 = call.y.view({call.params.M, call.params.weight.N});
  if (call.bias.defined()) {
    at::addmm_out(y2, call.bias, x2, w.t());
  } else {
    at::mm_out(y2, x2, w.t());
  }
}

void gemm_grad_input_dense(const GradInputCall& call, const at::Tensor& w) {
  const int64_t M = call.params.M;
  at::Tensor dx = call.grad_input.view({M, call.params.weight.K});
  at::mm_out(dx, call.grad_output.view({M, call.params.weight.N}), w);
}

Dequantize4bitParams whole_weight_dequantize(const Weight4bit& w, DType dtype, void* out) {
  Dequantize4bitParams d;
  d.packed = w.packed;
  d.scales = w.scales;
  d.numel = w.N * w.K;
  d.blocksize = w.blocksize;
  d.quant_type = w.quant_type;
  d.out = out;
  d.out_dtype = dtype;
  return d;
}

at::Tensor dequantized_weight_cpu(const Weight4bit& w, DType dtype, at::ScalarType scalar) {
  thread_local at::Tensor workspace;
  const int64_t numel = w.N * w.K;
  const int64_t bytes = numel * static_cast<int64_t>(c10::elementSize(scalar));
  if (!workspace.defined() || workspace.numel() < bytes) workspace = at::empty({bytes}, at::kByte);
  at::Tensor out = workspace.narrow(0, 0, bytes).view(scalar).view({w.N, w.K});
  run_core([&] { dequantize_4bit(whole_weight_dequantize(w, dtype, out.mutable_data_ptr())); });
  return out;
}

}  // namespace binding
}  // namespace fourbit

namespace {

using fourbit::binding::ForwardCall;
using fourbit::binding::GemmAlgo;
using fourbit::binding::GradInputCall;

struct NoGuard {
  explicit NoGuard(const at::Tensor&) {}
};

template <typename Call>
bool use_blas(GemmAlgo algo, const Call& call, bool (*auto_choice)(const Call&)) {
  if (algo != GemmAlgo::Auto) return algo == GemmAlgo::DequantBlas;
  return auto_choice(call);
}

void cpu_forward(const ForwardCall& call) {
  const fourbit::Gemm4bitParams& p = call.params;
  const GemmAlgo algo = fourbit::binding::parse_gemm_algo(call.algo);
  if (p.M > 0 && p.weight.N > 0 && p.weight.K > 0 && use_blas(algo, call, fourbit::binding::cpu_forward_uses_blas)) {
    fourbit::binding::gemm_forward_dense(
        call, fourbit::binding::dequantized_weight_cpu(p.weight, p.dtype, call.x.scalar_type()));
    return;
  }
  fourbit::binding::run_core([&] { fourbit::gemm_4bit(p); });
}

void cpu_grad_input(const GradInputCall& call) {
  const fourbit::Gemm4bitGradInputParams& p = call.params;
  const GemmAlgo algo = fourbit::binding::parse_gemm_algo(call.algo);
  if (p.M > 0 && p.weight.N > 0 && p.weight.K > 0 && use_blas(algo, call, fourbit::binding::cpu_grad_input_uses_blas)) {
    fourbit::binding::gemm_grad_input_dense(
        call, fourbit::binding::dequantized_weight_cpu(p.weight, p.dtype, call.grad_output.scalar_type()));
    return;
  }
  fourbit::binding::run_core([&] { fourbit::gemm_4bit_grad_input(p); });
}

}  // namespace

TORCH_LIBRARY_IMPL(fourbit, CPU, m) {
  fourbit::binding::register_gemm_impls<NoGuard, &cpu_forward, &cpu_grad_input>(m);
}
