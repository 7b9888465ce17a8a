// What the CPU kernels can use on this machine, detected at run time.
//
// The ISA class orders the CPU's matrix units from weakest to strongest; the 4-bit matmul's
// kernels and the torch binding's dispatch (src/torch/cpu_dispatch.cpp) key on it.
// FOURBIT_DISABLE_AVX2=1 lowers it to Portable, FOURBIT_DISABLE_AVX512 (set at all) to at
// most Avx2, FOURBIT_DISABLE_AMX=1 to at most Avx512Bf16 (the tests force each path that
// way). For FOURBIT_DISABLE_AVX2 and FOURBIT_DISABLE_AMX any other value than "0", "1" or
// empty is an InvalidArgument Error naming the variable and the value.
#pragma once

#include <string>

namespace fourbit {

enum class CpuIsa : int {
  Portable = 0,    // no AVX2 (or FOURBIT_DISABLE_AVX2=1): scalar kernels
  Avx2 = 1,        // AVX2 + FMA + F16C: the core's fp32 AVX2 kernels (src/gemm_4bit_avx2.cpp)
  Avx512 = 2,      // AVX-512 F + BW: the core's fp32 vector kernels
  Avx512Bf16 = 3,  // + AVX512_BF16: bf16 dot products (vdpbf16ps)
  Amx = 4,         // + AMX-TILE and AMX-BF16, with the OS's permission to use tile data
};

// The best class the kernels use here, after the FOURBIT_DISABLE_* switches (checked once).
CpuIsa cpu_isa();
// "portable", "avx2", "avx512", "avx512_bf16", "amx".
const char* to_string(CpuIsa isa);
// True if the CPU has AMX-TILE + AMX-BF16 (whether or not the OS or a switch allows it).
bool cpu_has_amx_hardware();
// The "model name" of /proc/cpuinfo, or "unknown".
std::string cpu_model_name();

}  // namespace fourbit
