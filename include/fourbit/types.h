// Enumerations shared by every core entry point: element dtypes and 4-bit formats.
#pragma once

#include <cstdint>
#include <string>

namespace fourbit {

// Floating-point element types the kernels read and write.
enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

// The two 4-bit codebooks of bitsandbytes.
enum class QuantType : int { NF4 = 0, FP4 = 1 };

inline const char* to_string(DType d) {
  switch (d) {
    case DType::Float32: return "float32";
    case DType::Float16: return "float16";
    case DType::BFloat16: return "bfloat16";
  }
  return "unknown";
}

inline const char* to_string(QuantType q) {
  switch (q) {
    case QuantType::NF4: return "nf4";
    case QuantType::FP4: return "fp4";
  }
  return "unknown";
}

inline int64_t element_size(DType d) { return d == DType::Float32 ? 4 : 2; }

// Parses "nf4" / "fp4"; throws an InvalidArgument Error naming `arg_name` otherwise.
QuantType parse_quant_type(const std::string& name, const char* arg_name = "quant_type");

}  // namespace fourbit
