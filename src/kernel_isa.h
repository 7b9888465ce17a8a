// Which vector flavour the CPU 4-bit kernels (matmul, LoRA products, dequantize) run:
// the machine's ISA class, lowered only by a test's KernelIsaCap. Internal header.
//
// The kernels pick their flavour per call from kernel_isa():
//   Portable             scalar loops (no AVX2, or FOURBIT_DISABLE_AVX2=1)
//   Avx2                 the AVX2 + FMA fp32 kernels (src/gemm_4bit_avx2.cpp,
//                        src/dequantize_4bit_avx2.cpp); bf16/fp16 activations are
//                        converted to fp32 and take them too
//   Avx512, Avx512Bf16   the AVX-512 kernels (src/gemm_4bit_avx512.cpp), bf16 dot products
//   Amx                  + the AMX tile micro-kernel for bf16 blocked products
#pragma once

#include "fourbit/cpu_features.h"

namespace fourbit {
namespace detail {

// cpu_isa(), or the cap of the innermost live KernelIsaCap if that is lower.
CpuIsa kernel_isa();

// Test hook: while alive, kernel_isa() is at most `cap`, so one process can run the AVX2
// and the portable kernels side by side and compare them. Process-wide (OpenMP workers
// see it too); not for concurrent use: create and destroy it on one thread, between calls.
class KernelIsaCap {
 public:
  explicit KernelIsaCap(CpuIsa cap);
  ~KernelIsaCap();
  KernelIsaCap(const KernelIsaCap&) = delete;
  KernelIsaCap& operator=(const KernelIsaCap&) = delete;

 private:
  int previous_;
};

// Reads a FOURBIT_DISABLE_* switch: unset, empty or "0" is false, "1" is true, anything else
// an InvalidArgument Error naming the variable and the value.
bool disable_switch(const char* name);

}  // namespace detail
}  // namespace fourbit
