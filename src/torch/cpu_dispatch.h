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
// FOURBIT_CPU_MATMUL (auto | static | fused | blas; anything else is a ValueError naming
// the variable and the value) on every call; in auto mode a shape class not seen before on this machine is
// measured once on a probe (a few ms), and the choice kept in memory and in the cache file.
bool cpu_forward_uses_blas(const ForwardCall& call);
bool cpu_grad_input_uses_blas(const GradInputCall& call);

// The dispatch state as JSON (ISA class, CPU model, threads, mode, cache file, the choices
// this process made with their source and timings, the path of the last call of each op):
// torch.ops.fourbit.cpu_matmul_info().
std::string cpu_matmul_info_json();

}  // namespace binding
}  // namespace fourbit
