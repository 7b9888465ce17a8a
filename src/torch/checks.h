// Argument checks shared by every op impl of the binding: each failure is a ValueError
// (TORCH_CHECK_VALUE) whose message names the argument and the bad value; run_core turns
// the core's fourbit::Error into ValueError or RuntimeError.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <string>

#include "fourbit/codebook.h"
#include "fourbit/error.h"
#include "fourbit/types.h"

namespace fourbit {
namespace binding {

#define CHECK_ARG(cond, ...) TORCH_CHECK_VALUE(cond, __VA_ARGS__)

inline DType to_core_dtype(at::ScalarType t, const char* name) {
  switch (t) {
    case at::kFloat: return DType::Float32;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    default: break;
  }
  TORCH_CHECK_VALUE(false, name, " must be torch.float32, torch.float16 or torch.bfloat16, got ",
                    t);
}

inline void check_on_device_of(const at::Tensor& t, const char* name, const at::Tensor& ref,
                               const char* ref_name = "A") {
  CHECK_ARG(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ",
            ref.device());
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  CHECK_ARG(t.is_contiguous(), name, " must be contiguous, got strides ", t.strides(),
            " for shape ", t.sizes());
}

inline void check_dtype(const at::Tensor& t, const char* name, at::ScalarType expected) {
  CHECK_ARG(t.scalar_type() == expected, name, " must have dtype ", expected, ", got ",
            t.scalar_type());
}

inline void check_numel(const at::Tensor& t, const char* name, int64_t expected, const char* why) {
  CHECK_ARG(t.numel() == expected, name, " must have ", expected, " elements (", why, "), got ",
            t.numel(), " (shape ", t.sizes(), ")");
}

inline void check_blocksize(int64_t blocksize, const char* name = "blocksize") {
  CHECK_ARG(is_valid_blocksize(blocksize), name, " must be one of 32, 64, 128, 256, 512, 1024, "
            "2048, 4096, got ", blocksize);
}

// Number of elements of `shape` (named `name`), rejecting negative sizes and element or
// byte counts (at `itemsize` bytes each) that overflow int64.
inline int64_t checked_numel(at::IntArrayRef shape, const char* name = "shape", int64_t itemsize = 4) {
  int64_t n = 1;
  for (int64_t d : shape) {
    CHECK_ARG(d >= 0, name, " must have non-negative sizes, got ", shape);
  }
  for (int64_t d : shape) {
    int64_t bytes = 0;
    CHECK_ARG(!__builtin_mul_overflow(n, d, &n) && !__builtin_mul_overflow(n, itemsize, &bytes),
              name, " ", shape, " has too many elements: their count or their bytes (", itemsize,
              " each) overflow int64");
  }
  return n;
}

inline void check_packed(const at::Tensor& A, int64_t numel, at::IntArrayRef shape,
                         const char* name = "A") {
  check_contiguous(A, name);
  // quant_storage wider than a byte pads the codes to whole elements: allow that slack only.
  const int64_t itemsize = static_cast<int64_t>(A.element_size());
  const int64_t have = A.numel() * itemsize;
  const int64_t need = (numel + 1) / 2;
  CHECK_ARG(have >= need && have - need < itemsize, name, " holds ", have,
            " bytes of packed 4-bit codes, but shape ", shape, " (", numel, " elements) needs ",
            need);
}

// Runs a core call, turning fourbit::Error into ValueError (argument) or RuntimeError.
template <typename Fn>
void run_core(Fn&& fn) {
  try {
    fn();
  } catch (const Error& e) {
    if (e.kind() == Error::Kind::InvalidArgument) TORCH_CHECK_VALUE(false, e.what());
    TORCH_CHECK(false, e.what());
  }
}

// The core's parser, with its InvalidArgument surfaced as ValueError like every other check.
inline QuantType quant_type_arg(const std::string& name) {
  QuantType q{};
  run_core([&] { q = parse_quant_type(name); });
  return q;
}

}  // namespace binding
}  // namespace fourbit
