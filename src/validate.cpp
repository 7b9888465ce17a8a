// Argument checks shared by the CPU and CUDA entry points of include/fourbit/quantize.h.
#include "fourbit/codebook.h"
#include "fourbit/error.h"
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

}  // namespace

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
  const BlockScales& s = p.scales;
  if (s.nested()) {
    FOURBIT_CHECK_ARG(s.absmax == nullptr, op,
                      ": pass either absmax (plain) or absmax_q (nested), not both");
    FOURBIT_CHECK_ARG(s.nested_blocksize > 0, op, ": nested_blocksize must be > 0, got ",
                      s.nested_blocksize);
    check_ptr(s.nested_code, p.numel, op, "nested_code");
    check_ptr(s.nested_absmax, p.numel, op, "nested_absmax");
    check_ptr(s.offset, p.numel, op, "offset");
  } else {
    check_ptr(s.absmax, p.numel, op, "absmax");
  }
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
