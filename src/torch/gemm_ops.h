// The 4-bit matmul ops (gemm_4bit, gemm_4bit_grad_input): argument checks and the tensor ->
// core params translation, shared by the CPU impl (gemm_ops.cpp) and the CUDA impl
// (gemm_ops_cuda.cpp). Every user error is a ValueError naming the argument and value.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <vector>

#include "fourbit/gemm.h"

namespace fourbit {
namespace binding {

// The weight arguments every 4-bit matmul op takes, in schema order.
struct WeightArgs {
  const at::Tensor& W;  // packed codes, any quant_storage dtype
  const at::Tensor& absmax;
  const std::optional<at::Tensor>& nested_absmax;
  const std::optional<at::Tensor>& nested_code;
  const std::optional<at::Tensor>& offset;
  int64_t blocksize;
  int64_t nested_blocksize;
  const std::string& quant_type;
  int64_t N;
  int64_t K;
};

// Checks the weight tensors against the activation `act` (named `act_name`) and returns
// the core's view of the weight.
Weight4bit weight_arg(const WeightArgs& a, const at::Tensor& act, const char* act_name);

// Rows of an activation `t` (named `name`) whose last dimension must be `cols` (`what`).
int64_t activation_rows(const at::Tensor& t, const char* name, int64_t cols, const char* what);

// `sizes` with its last entry replaced by `last`.
std::vector<int64_t> with_last_dim(at::IntArrayRef sizes, int64_t last);

// A checked forward call: Y = X @ deq(W)^T + bias. `x` is X made contiguous; `y` is the
// freshly allocated output of shape X.shape[:-1] + [N]; `params` points into both.
struct ForwardCall {
  std::string algo;
  at::Tensor x;
  at::Tensor bias;
  at::Tensor y;
  Gemm4bitParams params;
  at::Tensor W, absmax;  // the weight's code and scale tensors (algo "fused" keys its cache on them)
};
ForwardCall prepare_forward(const at::Tensor& X, const WeightArgs& w,
                            const std::optional<at::Tensor>& bias);

// A checked input-gradient call: dX = dY @ deq(W), dX of shape dY.shape[:-1] + [K].
struct GradInputCall {
  std::string algo;
  at::Tensor grad_output;
  at::Tensor grad_input;
  Gemm4bitGradInputParams params;
  at::Tensor W, absmax;  // as ForwardCall
};
GradInputCall prepare_grad_input(const at::Tensor& grad_output, const WeightArgs& w);

// The kernel choice of the `algo` argument: the core's Gemm4bitAlgo plus the binding's
// own dequantize + vendor-BLAS path ("dequant_blas"; "dequant_cublas" is its older CUDA
// name and means the same on either device). "fused": the fragment-layout kernels
// (cuda/gemm_4bit_fused.cu; CUDA only, explicit: auto never picks them yet). "fused_sm90":
// the forward by the Hopper wgmma kernel (cuda/gemm_4bit_fused_sm90.cu; sm90 with sm_90a code
// only, meant for M >= 1024, explicit and unmeasured like "fused"), the input gradient by
// "fused"'s kernel. On the CPU both name the CPU's own kernels, as "fused" does.
enum class GemmAlgo { Auto, Gemv, TensorCore, CudaCore, DequantBlas, Fused, FusedSm90 };
GemmAlgo parse_gemm_algo(const std::string& name);

// The CPU's large-M path: from kCpuBlasMinRows rows, bf16/fp32 products run as a
// dequantize into this thread's reused workspace + ATen's matmul (oneDNN). Below it the
// gemm and LoRA ops choose per CPU and shape class (cpu_dispatch.h).
constexpr int64_t kCpuBlasMinRows = 1024;
// The large-M products on the dequantized weight `w` ([N, K], the activation dtype), by
// ATen's matmul on either device (cuBLAS / oneDNN): Y = X w^T (+ bias) and dX = dY w.
void gemm_forward_dense(const ForwardCall& call, const at::Tensor& w);
void gemm_grad_input_dense(const GradInputCall& call, const at::Tensor& w);
// The core's dequantize arguments for the whole weight `w` into `out` ([N, K] of `dtype`).
Dequantize4bitParams whole_weight_dequantize(const Weight4bit& w, DType dtype, void* out);
// The weight dequantized to `dtype` in this thread's workspace (grown to the largest
// weight it has held, reused); valid until the thread's next call.
at::Tensor dequantized_weight_cpu(const Weight4bit& w, DType dtype, at::ScalarType scalar);

// Registers both ops for one dispatch key: checks, then `run_forward` / `run_grad_input`
// (the device's kernel choice), then returns the output. `Guard` is constructed from the
// activation first (a CUDA device guard, or a no-op on the CPU).
template <typename Guard, void (*run_forward)(const ForwardCall&),
          void (*run_grad_input)(const GradInputCall&)>
void register_gemm_impls(torch::Library& m) {
  m.impl("gemm_4bit", [](const at::Tensor& X, const at::Tensor& W, const at::Tensor& absmax,
                         const std::optional<at::Tensor>& nested_absmax,
                         const std::optional<at::Tensor>& nested_code,
                         const std::optional<at::Tensor>& offset,
                         const std::optional<at::Tensor>& bias, int64_t blocksize,
                         int64_t nested_blocksize, std::string quant_type, int64_t N, int64_t K,
                         std::string algo) {
    Guard guard(X);
    const WeightArgs w{W, absmax, nested_absmax, nested_code, offset,
                       blocksize, nested_blocksize, quant_type, N, K};
    ForwardCall call = prepare_forward(X, w, bias);
    call.algo = std::move(algo);
    run_forward(call);
    return call.y;
  });
  m.impl("gemm_4bit_grad_input",
         [](const at::Tensor& grad_output, const at::Tensor& W, const at::Tensor& absmax,
            const std::optional<at::Tensor>& nested_absmax,
            const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
            int64_t blocksize, int64_t nested_blocksize, std::string quant_type, int64_t N,
            int64_t K, std::string algo) {
           Guard guard(grad_output);
           const WeightArgs w{W, absmax, nested_absmax, nested_code, offset,
                              blocksize, nested_blocksize, quant_type, N, K};
           GradInputCall call = prepare_grad_input(grad_output, w);
           call.algo = std::move(algo);
           run_grad_input(call);
           return call.grad_input;
         });
}

}  // namespace binding
}  // namespace fourbit

