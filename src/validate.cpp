// Argument checks shared by the CPU and CUDA entry points of include/fourbit/quantize.h
// and include/fourbit/gemm.h: sizes (every derived element and byte count overflow-checked),
// formats, pointers, and that no output overlaps an input.
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

// numel >= 0, and its bytes in the widest element type it is read or written as fit
// int64 (so that numel + 1, numel * 4 and the packed byte count cannot overflow).
void check_numel(int64_t numel, const char* op) {
  FOURBIT_CHECK_ARG(numel >= 0, op, ": numel must be >= 0, got ", numel);
  checked_mul(numel, 4, op, "numel * 4 (bytes of numel fp32 values)");
}

// Fails when the byte ranges [a, a + a_bytes) and [b, b + b_bytes) overlap: an output that
// aliases an input would be read after it is written.
void check_disjoint(const char* op, const void* a, int64_t a_bytes, const char* a_name,
                    const void* b, int64_t b_bytes, const char* b_name) {
  if (a == nullptr || b == nullptr || a_bytes <= 0 || b_bytes <= 0) return;
  const uintptr_t a0 = reinterpret_cast<uintptr_t>(a), b0 = reinterpret_cast<uintptr_t>(b);
  const bool overlap = a0 < b0 + static_cast<uintptr_t>(b_bytes) &&
                       b0 < a0 + static_cast<uintptr_t>(a_bytes);
  FOURBIT_CHECK_ARG(!overlap, op, ": ", a_name, " (", a_bytes, " bytes at ", a, ") overlaps ",
                    b_name, " (", b_bytes, " bytes at ", b, "); outputs must not alias inputs");
}

// Fails when `out` overlaps any buffer of the block scales of `numel` elements.
void check_disjoint_scales(const char* op, const void* out, int64_t out_bytes, const char* out_name,
                           const BlockScales& s, int64_t numel, int64_t blocksize) {
  const int64_t blocks = num_blocks(numel, blocksize);
  if (s.nested()) {
    check_disjoint(op, out, out_bytes, out_name, s.absmax_q, blocks, "absmax_q");
    if (s.nested_blocksize > 0) {
      check_disjoint(op, out, out_bytes, out_name, s.nested_absmax,
                     num_blocks(blocks, s.nested_blocksize) * 4, "nested_absmax");
    }
    check_disjoint(op, out, out_bytes, out_name, s.nested_code, kDynamicMapSize * 4, "nested_code");
    check_disjoint(op, out, out_bytes, out_name, s.offset, 4, "offset");
  } else {
    check_disjoint(op, out, out_bytes, out_name, s.absmax, blocks * 4, "absmax");
  }
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
  const int64_t numel = checked_mul(w.N, w.K, op, "weight N * K");
  check_numel(numel, op);
  check_blocksize(w.blocksize, op);
  check_quant_type(w.quant_type, op);
  check_ptr(w.packed, numel, op, "weight.packed");
  check_scales(w.scales, numel, op);
}

void check_rows(int64_t M, const char* op) {
  FOURBIT_CHECK_ARG(M >= 0, op, ": M (rows of the activation) must be >= 0, got ", M);
}

// Elements of an [M, cols] activation, with its bytes and the product's work M * N * K
// (the kernels' flop counter) overflow-checked.
int64_t activation_numel(int64_t M, int64_t cols, const Weight4bit& w, const char* op,
                         const char* what) {
  const int64_t numel = checked_mul(M, cols, op, what);
  check_numel(numel, op);
  checked_mul(M, checked_mul(w.N, w.K, op, "weight N * K"), op, "M * N * K (the product's work)");
  return numel;
}

// An output of the 4-bit product must not alias its weight.
void check_disjoint_weight(const char* op, const void* out, int64_t out_bytes, const char* out_name,
                           const Weight4bit& w) {
  const int64_t numel = w.N * w.K;  // checked by check_weight
  check_disjoint(op, out, out_bytes, out_name, w.packed, numel / 2 + numel % 2, "weight.packed");
  check_disjoint_scales(op, out, out_bytes, out_name, w.scales, numel, w.blocksize);
}

}  // namespace

void validate(const Gemm4bitParams& p) {
  const char* op = "gemm_4bit";
  check_weight(p.weight, op);
  check_rows(p.M, op);
  check_dtype(p.dtype, op, "dtype");
  const int64_t x_numel = activation_numel(p.M, p.weight.K, p.weight, op, "M * K");
  const int64_t y_numel = activation_numel(p.M, p.weight.N, p.weight, op, "M * N");
  check_ptr(p.x, x_numel, op, "x");
  check_ptr(p.y, y_numel, op, "y");
  const int64_t esize = element_size(p.dtype);
  check_disjoint(op, p.y, y_numel * esize, "y", p.x, x_numel * esize, "x");
  check_disjoint(op, p.y, y_numel * esize, "y", p.bias, checked_mul(p.weight.N, esize, op, "N * itemsize"),
                 "bias");
  check_disjoint_weight(op, p.y, y_numel * esize, "y", p.weight);
}

void validate(const Gemm4bitGradInputParams& p) {
  const char* op = "gemm_4bit_grad_input";
  check_weight(p.weight, op);
  check_rows(p.M, op);
  check_dtype(p.dtype, op, "dtype");
  const int64_t dy_numel = activation_numel(p.M, p.weight.N, p.weight, op, "M * N");
  const int64_t dx_numel = activation_numel(p.M, p.weight.K, p.weight, op, "M * K");
  check_ptr(p.grad_output, dy_numel, op, "grad_output");
  check_ptr(p.grad_input, dx_numel, op, "grad_input");
  const int64_t esize = element_size(p.dtype);
  check_disjoint(op, p.grad_input, dx_numel * esize, "grad_input", p.grad_output, dy_numel * esize,
                 "grad_output");
  check_disjoint_weight(op, p.grad_input, dx_numel * esize, "grad_input", p.weight);
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
  const int64_t in_bytes = p.numel * element_size(p.dtype);
  const int64_t packed_bytes = p.numel / 2 + p.numel % 2;
  const int64_t absmax_bytes = num_blocks(p.numel, p.blocksize) * 4;
  check_disjoint(op, p.packed, packed_bytes, "packed", p.input, in_bytes, "input");
  check_disjoint(op, p.absmax, absmax_bytes, "absmax", p.input, in_bytes, "input");
  check_disjoint(op, p.absmax, absmax_bytes, "absmax", p.packed, packed_bytes, "packed");
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
  const int64_t out_bytes = p.numel * element_size(p.out_dtype);
  check_disjoint(op, p.out, out_bytes, "out", p.packed, p.numel / 2 + p.numel % 2, "packed");
  check_disjoint_scales(op, p.out, out_bytes, "out", p.scales, p.numel, p.blocksize);
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
  const int64_t in_bytes = p.numel * element_size(p.dtype);
  const int64_t absmax_bytes = num_blocks(p.numel, p.blocksize) * 4;
  check_disjoint(op, p.out, p.numel, "out", p.input, in_bytes, "input");
  check_disjoint(op, p.absmax, absmax_bytes, "absmax", p.input, in_bytes, "input");
  check_disjoint(op, p.absmax, absmax_bytes, "absmax", p.out, p.numel, "out");
  check_disjoint(op, p.out, p.numel, "out", p.code, kDynamicMapSize * 4, "code");
  check_disjoint(op, p.absmax, absmax_bytes, "absmax", p.code, kDynamicMapSize * 4, "code");
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
  const int64_t out_bytes = p.numel * element_size(p.out_dtype);
  check_disjoint(op, p.out, out_bytes, "out", p.input, p.numel, "input");
  check_disjoint(op, p.out, out_bytes, "out", p.absmax, num_blocks(p.numel, p.blocksize) * 4, "absmax");
  check_disjoint(op, p.out, out_bytes, "out", p.code, kDynamicMapSize * 4, "code");
}

}  // namespace fourbit
