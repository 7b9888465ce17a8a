// The LoRA ops on a 4-bit weight: schemas, argument checks and the CPU impl.
//
//   lora_4bit(X, W, ..., lora_A, lora_B, scaling, X_lora) -> (Y, XA)
//       Y = X @ deq(W)^T + bias + scaling * (X_l @ lora_A^T) @ lora_B^T, X_l = X_lora or X;
//       XA = X_l @ lora_A^T (saved by autograd for the lora_B gradient).
//   lora_4bit_backward(dY, W, ..., lora_A, lora_B, scaling, X_lora, XA, separate_x_lora,
//                      output_mask) -> (dX, dX_l, dA, dB)
//       with G = scaling * dY @ lora_B: dX = dY @ deq(W) (+ G @ lora_A unless separate_x_lora),
//       dX_l = G @ lora_A, dA = G^T @ X_l, dB = scaling * dY^T @ XA; the outputs not in
//       output_mask are empty tensors.
//
// The weight arguments are gemm_4bit's (gemm_ops.cpp). lora_A [r, K], lora_B [N, r], bias,
// X_lora and XA have X's dtype and device; 1 <= r <= fourbit::kLoraMaxRank. Autograd and
// fake kernels: python/fourbit/_ops.py. The math: include/fourbit/lora.h.
//
// CPU choice: the base product's, as gemm_4bit's (cpu_dispatch.h: FOURBIT_CPU_MATMUL, per
// CPU and shape class, measured once and cached; fp16 always fused). blas ->
// lora_forward_dense / lora_backward_dense on the weight dequantized into the thread's
// workspace; fused -> the core's fused kernels (src/lora_4bit.cpp). A backward without a
// base product (dX not wanted) takes the fixed rule's path.
#include "lora_ops.h"

#include <cmath>

#include "checks.h"
#include "cpu_dispatch.h"

TORCH_LIBRARY_FRAGMENT(fourbit, m) {
  m.def("lora_4bit(Tensor X, Tensor W, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code,"
        " Tensor? offset, Tensor? bias, int blocksize, int nested_blocksize, str quant_type,"
        " int N, int K, Tensor lora_A, Tensor lora_B, float scaling, Tensor? X_lora)"
        " -> (Tensor, Tensor)");
  m.def("lora_4bit_backward(Tensor grad_output, Tensor W, Tensor absmax, Tensor? nested_absmax,"
        " Tensor? nested_code, Tensor? offset, int blocksize, int nested_blocksize,"
        " str quant_type, int N, int K, Tensor lora_A, Tensor lora_B, float scaling,"
        " Tensor? X_lora, Tensor? XA, bool separate_x_lora, bool[4] output_mask)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
}

namespace fourbit {
namespace binding {
namespace {

// Checks `t` (named `name`) has `ref`'s device and dtype.
void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  check_on_device_of(t, name, ref, ref_name);
  CHECK_ARG(t.scalar_type() == ref.scalar_type(), name, " must have ", ref_name, "'s dtype ",
            ref.scalar_type(), ", got ", t.scalar_type());
}

// Checks lora_A [r, K] and lora_B [N, r] against the activation `act`; returns r.
int64_t check_adapter(const at::Tensor& A, const at::Tensor& B, int64_t N, int64_t K,
                      const at::Tensor& act, const char* act_name) {
  check_like(A, "lora_A", act, act_name);
  check_like(B, "lora_B", act, act_name);
  CHECK_ARG(A.dim() == 2 && A.size(1) == K, "lora_A must have shape [r, in_features K=", K,
            "], got ", A.sizes());
  const int64_t r = A.size(0);
  CHECK_ARG(r >= 1 && r <= kLoraMaxRank, "lora_A's rank r (its first dimension) must be in [1, ",
            kLoraMaxRank, "], got ", r);
  CHECK_ARG(B.dim() == 2 && B.size(0) == N && B.size(1) == r, "lora_B must have shape [N=", N,
            ", r=", r, "], got ", B.sizes());
  return r;
}

void check_scaling(double scaling) {
  CHECK_ARG(std::isfinite(scaling), "scaling must be a finite number, got ", scaling);
}

}  // namespace

LoraForwardCall prepare_lora_forward(const at::Tensor& X, const WeightArgs& w,
                                     const std::optional<at::Tensor>& bias,
                                     const at::Tensor& lora_A, const at::Tensor& lora_B,
                                     double scaling, const std::optional<at::Tensor>& X_lora) {
  ForwardCall base = prepare_forward(X, w, bias);  // weight, X, bias; allocates Y
  const int64_t r = check_adapter(lora_A, lora_B, w.N, w.K, X, "X");
  check_scaling(scaling);
  LoraForwardCall call;
  call.x = base.x;
  call.bias = base.bias;
  call.y = base.y;
  call.lora_a = lora_A.contiguous();
  call.lora_b = lora_B.contiguous();
  Lora4bitForwardParams& p = call.params;
  p.weight = base.params.weight;
  p.x = base.params.x;
  p.bias = base.params.bias;
  p.y = base.params.y;
  p.M = base.params.M;
  p.dtype = base.params.dtype;
  p.r = r;
  p.scaling = scaling;
  p.lora_a = call.lora_a.const_data_ptr();
  p.lora_b = call.lora_b.const_data_ptr();
  if (X_lora.has_value()) {
    check_like(*X_lora, "X_lora", X, "X");
    CHECK_ARG(X_lora->sizes() == X.sizes(), "X_lora must have X's shape ", X.sizes(), ", got ",
              X_lora->sizes());
    call.x_lora = X_lora->contiguous();
    p.x_lora = call.x_lora.const_data_ptr();
  }
  call.xa = at::empty(with_last_dim(X.sizes(), r), X.options());
  p.xa = call.xa.mutable_data_ptr();
  return call;
}

LoraBackwardCall prepare_lora_backward(const at::Tensor& grad_output, const WeightArgs& w,
                                       const at::Tensor& lora_A, const at::Tensor& lora_B,
                                       double scaling, const std::optional<at::Tensor>& X_lora,
                                       const std::optional<at::Tensor>& XA, bool separate_x_lora,
                                       std::array<bool, 4> output_mask) {
  LoraBackwardCall call;
  Lora4bitBackwardParams& p = call.params;
  p.dtype = to_core_dtype(grad_output.scalar_type(), "grad_output.dtype");
  p.weight = weight_arg(w, grad_output, "grad_output");
  p.M = activation_rows(grad_output, "grad_output", w.N, "out_features N");
  p.r = check_adapter(lora_A, lora_B, w.N, w.K, grad_output, "grad_output");
  check_scaling(scaling);
  p.scaling = scaling;
  p.separate_lora_input = separate_x_lora;
  CHECK_ARG(separate_x_lora || !output_mask[1], "output_mask[1] (the X_lora gradient) needs "
            "separate_x_lora=True; without a separate X_lora that gradient is part of dX");
  const auto x_shape = with_last_dim(grad_output.sizes(), w.K);
  const auto xa_shape = with_last_dim(grad_output.sizes(), p.r);
  call.grad_output = grad_output.contiguous();
  call.lora_a = lora_A.contiguous();
  call.lora_b = lora_B.contiguous();
  p.grad_output = call.grad_output.const_data_ptr();
  p.lora_a = call.lora_a.const_data_ptr();
  p.lora_b = call.lora_b.const_data_ptr();
  if (output_mask[2]) {
    CHECK_ARG(X_lora.has_value(), "X_lora (the adapter's input) is required for the lora_A "
              "gradient (output_mask[2]), got None");
  }
  if (X_lora.has_value()) {
    check_like(*X_lora, "X_lora", grad_output, "grad_output");
    CHECK_ARG(X_lora->sizes() == at::IntArrayRef(x_shape), "X_lora must have shape ",
              at::IntArrayRef(x_shape), " (grad_output's rows, in_features K), got ",
              X_lora->sizes());
    call.x_lora = X_lora->contiguous();
    p.x_lora = call.x_lora.const_data_ptr();
  }
  if (output_mask[3]) {
    CHECK_ARG(XA.has_value(), "XA (the forward's X_lora @ lora_A^T) is required for the lora_B "
              "gradient (output_mask[3]), got None");
  }
  if (XA.has_value()) {
    check_like(*XA, "XA", grad_output, "grad_output");
    CHECK_ARG(XA->sizes() == at::IntArrayRef(xa_shape), "XA must have shape ",
              at::IntArrayRef(xa_shape), " (grad_output's rows, r), got ", XA->sizes());
    call.xa = XA->contiguous();
    p.xa = call.xa.const_data_ptr();
  }
  const auto opts = grad_output.options();
  auto output = [&](bool wanted, at::IntArrayRef shape, void** ptr) {
    if (!wanted) return at::empty({0}, opts);
    at::Tensor t = at::empty(shape, opts);
    *ptr = t.mutable_data_ptr();
    return t;
  };
  call.grad_input = output(output_mask[0], x_shape, &p.grad_input);
  call.grad_input_lora = output(output_mask[1], x_shape, &p.grad_input_lora);
  call.grad_a = output(output_mask[2], lora_A.sizes(), &p.grad_a);
  call.grad_b = output(output_mask[3], lora_B.sizes(), &p.grad_b);
  return call;
}

void lora_forward_dense(const LoraForwardCall& call, const std::function<at::Tensor()>& dequantize) {
  const Lora4bitForwardParams& p = call.params;
  const int64_t M = p.M, N = p.weight.N, K = p.weight.K;
  const at::Tensor x = call.x.view({M, K});
  const at::Tensor x_lora = call.x_lora.defined() ? call.x_lora.view({M, K}) : x;
  at::Tensor xa = call.xa.view({M, p.r});
  at::mm_out(xa, x_lora, call.lora_a.t());
  if (N == 0) return;
  const at::Tensor w = dequantize();
  at::Tensor y = call.y.view({M, N});
  if (call.bias.defined()) {
    at::addmm_out(y, call.bias, x, w.t());
  } else {
    at::mm_out(y, x, w.t());
  }
  y.addmm_(xa, call.lora_b.t(), 1.0, p.scaling);
}

void lora_backward_dense(const LoraBackwardCall& call, const std::function<at::Tensor()>& dequantize) {
  const Lora4bitBackwardParams& p = call.params;
  const int64_t M = p.M, N = p.weight.N, K = p.weight.K, r = p.r;
  const at::Tensor dy = call.grad_output.view({M, N});
  const bool adapter_into_dx = p.grad_input && !p.separate_lora_input;
  // The scaling goes in as the GEMM's alpha (applied before the one rounding to the dtype;
  // beta = 0 ignores the uninitialised input).
  at::Tensor g;  // scaling * dY @ lora_B, [M, r]
  if (adapter_into_dx || p.grad_input_lora || p.grad_a) {
    g = at::empty({M, r}, dy.options());
    at::addmm_out(g, g, dy, call.lora_b, /*beta=*/0, /*alpha=*/p.scaling);
  }
  if (p.grad_input && K > 0) {
    at::Tensor dx = call.grad_input.view({M, K});
    const at::Tensor w = dequantize();
    at::mm_out(dx, dy, w);
    if (adapter_into_dx) dx.addmm_(g, call.lora_a);
  }
  if (p.grad_input_lora) {
    at::Tensor dxl = call.grad_input_lora.view({M, K});
    at::mm_out(dxl, g, call.lora_a);
  }
  if (p.grad_a) {
    at::Tensor da = call.grad_a;
    at::mm_out(da, g.t(), call.x_lora.view({M, K}));
  }
  if (p.grad_b) {
    at::Tensor db = call.grad_b;
    at::addmm_out(db, db, dy.t(), call.xa.view({M, r}), /*beta=*/0, /*alpha=*/p.scaling);
  }
}

}  // namespace binding
}  // namespace fourbit

namespace {

struct NoGuard {
  explicit NoGuard(const at::Tensor&) {}
};

// The dense path on the weight dequantized into this thread's workspace, as gemm_4bit's
// blas path, or the core's fused kernels: the base product's choice (cpu_dispatch.h).
void cpu_forward(const fourbit::binding::LoraForwardCall& call) {
  const fourbit::Lora4bitForwardParams& p = call.params;
  const at::ScalarType scalar = call.x.scalar_type();
  if (p.M > 0 && p.weight.N > 0 && p.weight.K > 0 &&
      fourbit::binding::cpu_lora_forward_uses_blas(p.dtype, scalar, p.M, p.weight)) {
    fourbit::binding::lora_forward_dense(call, [&] {
      return fourbit::binding::dequantized_weight_cpu(p.weight, p.dtype, scalar);
    });
    return;
  }
  fourbit::binding::run_core([&] { fourbit::lora_4bit_forward(p); });
}

void cpu_backward(const fourbit::binding::LoraBackwardCall& call) {
  const fourbit::Lora4bitBackwardParams& p = call.params;
  const at::ScalarType scalar = call.grad_output.scalar_type();
  const bool base_product = p.grad_input != nullptr && p.M > 0 && p.weight.N > 0 && p.weight.K > 0;
  const bool blas =
      base_product ? fourbit::binding::cpu_lora_backward_uses_blas(p.dtype, scalar, p.M, p.weight)
                   : fourbit::binding::cpu_lora_backward_without_base_uses_blas(p.dtype, p.M);
  if (blas) {
    fourbit::binding::lora_backward_dense(call, [&] {
      return fourbit::binding::dequantized_weight_cpu(p.weight, p.dtype, scalar);
    });
    return;
  }
  fourbit::binding::run_core([&] { fourbit::lora_4bit_backward(p); });
}

}  // namespace

TORCH_LIBRARY_IMPL(fourbit, CPU, m) {
  fourbit::binding::register_lora_impls<NoGuard, &cpu_forward, &cpu_backward>(m);
}
