// Argument checks shared by the CPU and CUDA entry points of include/fourbit/quantize.h
// and include/fourbit/gemm.h.
#include <cstdint>

#include "fourbit/codebook.h"
#include "fourbit/error.h"
#include "fourbit/gemm.h"
#include "fourbit/quantize.h"

namespace fourbit {
namespace {

void check_blocksize(int64_t blocksize, const char* op) {
  FOURBIT_CHECK_ARG(is_valid_blocksize(blocksize), op,
                    ": blocksize must be a power of two in [32, 4096], got ", blocksize);
}

void check_numel(int64_t numel, const char* op) {
  FOURBIT_CHECK_ARG(numel >= 0, op, ": numel must be >= 0, got ", numel);
}

void check_ptr(const void* ptr, int64_t numel, const char* op, const char* name) {
  FOURBIT_CHECK_ARG(numel == 0 || ptr != nullptr, op, ": ", name,
                    " is null but numel is ", numel);
}

void check_dtype(DType dtype, const char* op, const char* name) {
  const int v = static_cast<int>(dtype);
  FOURBIT_CHECK_ARG(v >= 0 && v <= 2, op, ": ", name,
                    " must be float32, float16 or bfloat16, got enum value ", v);
}

void check_quant_type(QuantType q, const char* op) {
  const int v = static_cast<int>(q);
  FOURBIT_CHECK_ARG(v == 0 || v == 1, op, ": quant_type must be NF4 or FP4, got enum value ", v);
}

void check_scales(const BlockScales& s, int64_t numel, const char* op) {
  if (s.nested()) {
    FOURBIT_CHECK_ARG(s.absmax == nullptr, op,
                      ": pass either absmax (plain) or absmax_q (nested), not both");
    // A power of two: kernels find a block's nested scale by a shift (element_math.h).
    FOURBIT_CHECK_ARG(s.nested_blocksize > 0 && (s.nested_blocksize & (s.nested_blocksize - 1)) == 0,
                      op, ": nested_blocksize must be a power of two, got ", s.nested_blocksize);
    check_ptr(s.nested_code, numel, op, "nested_code");
    check_ptr(s.nested_absmax, numel, op, "nested_absmax");
    check_ptr(s.offset, numel, op, "offset");
  } else {
    check_ptr(s.absmax, numel, op, "absmax");
  }
}

// The weight of a 4-bit product: sizes, format and pointers.
void check_weight(const Weight4bit& w, const char* op) {
  FOURBIT_CHECK_ARG(w.N >= 0, op, ": weight N (out_features) must be >= 0, got ", w.N);
  FOURBIT_CHECK_ARG(w.K >= 0, op, ": weight K (in_features) must be >= 0, got ", w.K);
  FOURBIT_CHECK_ARG(w.K == 0 || w.N <= INT64_MAX / w.K, op, ": weight N * K overflows int64 (N=",
                    w.N, ", K=", w.K, ")");
  check_blocksize(w.blocksize, op);
  check_quant_type(w.quant_type, op);
  const int64_t numel = w.N * w.K;
  check_ptr(w.packed, numel, op, "weight.packed");
  check_scales(w.scales, numel, op);
}

void check_rows(int64_t M, const char* op) {
  FOURBIT_CHECK_ARG(M >= 0, op, ": M (rows of the activation) must be >= 0, got ", M);
}

}  // namespace

void validate(const Gemm4bitParams& p) {
  const char* op = "gemm_4bit";
  check_weight(p.weight, op);
  check_rows(p.M, op);
  check_dtype(p.dtype, op, "dtype");
  check_ptr(p.x, p.M * p.weight.K, op, "x");
  check_ptr(p.y, p.M * p.weight.N, op, "y");
}

void validate(const Gemm4bitGradInputParams& p) {
  const char* op = "gemm_4bit_grad_input";
  check_weight(p.weight, op);
  check_rows(p.M, op);
  check_dtype(p.dtype, op, "dtype");
  check_ptr(p.grad_output, p.M * p.weight.N, op, "grad_output");
  check_ptr(p.grad_input, p.M * p.weight.K, op, "grad_input");
}

void validate(const Quantize4bitParams& p) {
  const char* op = "quantize_4bit";
  check_numel(p.numel, op);
  check_blocksize(p.blocksize, op);
  check_dtype(p.dtype, op, "dtype");
  check_quant_type(p.quant_type, op);
  check_ptr(p.input, p.numel, op, "input");
  check_ptr(p.packed, p.numel, op, "packed");
  check_ptr(p.absmax, p.numel, op, "absmax");
}

void validate(const Dequantize4bitParams& p) {
  const char* op = "dequantize_4bit";
  check_numel(p.numel, op);
  check_blocksize(p.blocksize, op);
  check_dtype(p.out_dtype, op, "out_dtype");
  check_quant_type(p.quant_type, op);
  check_ptr(p.packed, p.numel, op, "packed");
  check_ptr(p.out, p.numel, op, "out");
  check_scales(p.scales, p.numel, op);
}

void validate(const QuantizeBlockwiseParams& p) {
  const char* op = "quantize_blockwise";
  check_numel(p.numel, op);
  check_blocksize(p.blocksize, op);
  check_dtype(p.dtype, op, "dtype");
  check_ptr(p.input, p.numel, op, "input");
  check_ptr(p.code, p.numel, op, "code");
  check_ptr(p.out, p.numel, op, "out");
  check_ptr(p.absmax, p.numel, op, "absmax");
}

void validate(const DequantizeBlockwiseParams& p) {
  const char* op = "dequantize_blockwise";
  check_numel(p.numel, op);
  check_blocksize(p.blocksize, op);
  check_dtype(p.out_dtype, op, "out_dtype");
  check_ptr(p.input, p.numel, op, "input");
  check_ptr(p.code, p.numel, op, "code");
  check_ptr(p.absmax, p.numel, op, "absmax");
  check_ptr(p.out, p.numel, op, "out");
}

}  // namespace fourbit
