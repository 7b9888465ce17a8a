// The CPU 4-bit matmul's kernel choice for algo="auto" (src/torch/cpu_dispatch.cpp):
// the core's fused kernels, or a dequantize into a reused workspace + ATen's GEMM (oneDNN,
// which runs on AMX where the CPU has it), per CPU class and shape class, measured once
// and cached on disk so that a resumed run makes the same choices. The rule:
// docs/kernels.md, "CPU dispatch".
#pragma once

#include <string>

#include "gemm_ops.h"

namespace fourbit {
namespace binding {

// True if the call should take the dequantize + GEMM path (never for fp16). Reads
// FOURBIT_CPU_MATMUL (auto | static | fused | blas | remeasure; anything else is a ValueError naming
// the variable and the value) on every call; in auto mode a shape class not seen before on this machine is
// measured once on a probe (a few ms), and the choice kept in memory and in the cache file.
bool cpu_forward_uses_blas(const ForwardCall& call);
bool cpu_grad_input_uses_blas(const GradInputCall& call);

// The LoRA op's base product (lora_ops.cpp) is the same 4-bit matmul, so it takes the same
// choice: the same modes, shape classes ("fwd/..." for Y = X deq(W)^T, "grad/..." for
// dX = dY deq(W)), measurement and cache entries as gemm_4bit / gemm_4bit_grad_input of
// that shape. The whole op follows it (blas: lora_forward_dense / lora_backward_dense).
// `scalar` is the activation's dtype; M, N, K > 0.
bool cpu_lora_forward_uses_blas(DType dtype, at::ScalarType scalar, int64_t M, const Weight4bit& weight);
bool cpu_lora_backward_uses_blas(DType dtype, at::ScalarType scalar, int64_t M, const Weight4bit& weight);
// A LoRA backward with no base product to choose for (dX not wanted, or an empty
// dimension): the fixed rule (static mode's, or the forced path), never a measurement, so
// every process takes the same path for the adapter gradients.
bool cpu_lora_backward_without_base_uses_blas(DType dtype, int64_t M);

// Drops this machine's entries (this CPU model and ISA class, any thread count or torch
// version) from the cache file, rewritten atomically with the other machines' entries kept,
// and this process's choices, so each class is measured again at its next use. Returns the
// number of cache entries dropped; a file that cannot be rewritten is a ValueError.
// torch.ops.fourbit.cpu_matmul_cache_clear(), fourbit.cpu_matmul_cache_clear().
int64_t cpu_matmul_cache_clear();

// The dispatch state as JSON (ISA class, CPU model, threads, mode, cache file, the choices
// this process made with their source and timings, the path of the last call of each op):
// torch.ops.fourbit.cpu_matmul_info().
std::string cpu_matmul_info_json();

}  // namespace binding
}  // namespace fourbit
