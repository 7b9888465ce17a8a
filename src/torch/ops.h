// Typed calls of the torch.ops.fourbit.* operators from C++, for the modules and optimizers of
// the C++ API: one function per op, named like the op, that goes through the dispatcher (the
// same registration, device dispatch and argument checks as a Python call) without boxing.
// Each op's handle is looked up once (a function-local static) and checked against the C++
// signature of its registered kernels; the signatures below must therefore match the kernel
// functions exactly (gemm_ops.h, lora_ops.h, op_impl.h, optim_ops*.cpp: `str` arguments are
// `std::string` by value there, `SymInt[]` / `int[]` ones `at::IntArrayRef`), else the first
// call throws. Schemas: ops.cpp, gemm_ops.cpp, lora_ops.cpp, optim_ops.cpp.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <utility>

namespace fourbit {
namespace ops {

// The handle of fourbit::<name> (`qualified` = "fourbit::<name>"), checked against `Signature`.
template <class Signature>
c10::TypedOperatorHandle<Signature> typed_op(const char* qualified) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(qualified, "").typed<Signature>();
}

using OptTensor = std::optional<at::Tensor>;

// The kernels' signatures (one per op).
namespace sig {
using quantize_4bit = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t, std::string, at::ScalarType);
using dequantize_4bit = at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, std::string, at::IntArrayRef,
                                   at::ScalarType);
using dequantize_4bit_nested = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const at::Tensor&, int64_t, int64_t, std::string, at::IntArrayRef,
                                          at::ScalarType);
using quantize_blockwise = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t);
using gemm_4bit = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                             const OptTensor&, const OptTensor&, const OptTensor&, int64_t, int64_t, std::string,
                             int64_t, int64_t, std::string);
using gemm_4bit_grad_input = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                                        const OptTensor&, const OptTensor&, int64_t, int64_t, std::string, int64_t,
                                        int64_t, std::string);
using lora_4bit = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                     const OptTensor&, const OptTensor&, const OptTensor&,
                                                     const OptTensor&, int64_t, int64_t, std::string, int64_t,
                                                     int64_t, const at::Tensor&, const at::Tensor&, double,
                                                     const OptTensor&);
using lora_4bit_backward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
    int64_t, int64_t, std::string, int64_t, int64_t, const at::Tensor&, const at::Tensor&, double, const OptTensor&,
    const OptTensor&, bool, std::array<bool, 4>);
using adamw_step = void(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                        at::TensorList, const at::Tensor&, const at::Tensor&, at::IntArrayRef, double, double,
                        double, double, double);
using paged_zeros = at::Tensor(at::IntArrayRef, at::ScalarType, c10::Device);
using paged_prefetch = void(at::TensorList, c10::Device);
}  // namespace sig

// quantize_4bit(A, blocksize, quant_type, quant_storage) -> (packed, absmax)
inline std::tuple<at::Tensor, at::Tensor> quantize_4bit(const at::Tensor& A, int64_t blocksize,
                                                        std::string quant_type, at::ScalarType quant_storage) {
  static const auto op = typed_op<sig::quantize_4bit>("fourbit::quantize_4bit");
  return op.call(A, blocksize, std::move(quant_type), quant_storage);
}

// dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype) -> out
inline at::Tensor dequantize_4bit(const at::Tensor& A, const at::Tensor& absmax, int64_t blocksize,
                                  std::string quant_type, at::IntArrayRef shape, at::ScalarType dtype) {
  static const auto op = typed_op<sig::dequantize_4bit>("fourbit::dequantize_4bit");
  return op.call(A, absmax, blocksize, std::move(quant_type), shape, dtype);
}

// dequantize_4bit_nested(A, absmax, nested_absmax, nested_code, offset, blocksize,
//                        nested_blocksize, quant_type, shape, dtype) -> out
inline at::Tensor dequantize_4bit_nested(const at::Tensor& A, const at::Tensor& absmax,
                                         const at::Tensor& nested_absmax, const at::Tensor& nested_code,
                                         const at::Tensor& offset, int64_t blocksize, int64_t nested_blocksize,
                                         std::string quant_type, at::IntArrayRef shape, at::ScalarType dtype) {
  static const auto op = typed_op<sig::dequantize_4bit_nested>("fourbit::dequantize_4bit_nested");
  return op.call(A, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, std::move(quant_type),
                 shape, dtype);
}

// quantize_blockwise(A, code, blocksize) -> (codes, absmax)
inline std::tuple<at::Tensor, at::Tensor> quantize_blockwise(const at::Tensor& A, const at::Tensor& code,
                                                             int64_t blocksize) {
  static const auto op = typed_op<sig::quantize_blockwise>("fourbit::quantize_blockwise");
  return op.call(A, code, blocksize);
}

// gemm_4bit(X, W, absmax, nested_absmax, nested_code, offset, bias, blocksize,
//           nested_blocksize, quant_type, N, K, algo) -> Y
inline at::Tensor gemm_4bit(const at::Tensor& X, const at::Tensor& W, const at::Tensor& absmax,
                            const OptTensor& nested_absmax, const OptTensor& nested_code, const OptTensor& offset,
                            const OptTensor& bias, int64_t blocksize, int64_t nested_blocksize,
                            std::string quant_type, int64_t N, int64_t K, std::string algo = "auto") {
  static const auto op = typed_op<sig::gemm_4bit>("fourbit::gemm_4bit");
  return op.call(X, W, absmax, nested_absmax, nested_code, offset, bias, blocksize, nested_blocksize,
                 std::move(quant_type), N, K, std::move(algo));
}

// gemm_4bit_grad_input(grad_output, W, absmax, nested_absmax, nested_code, offset, blocksize,
//                      nested_blocksize, quant_type, N, K, algo) -> dX
inline at::Tensor gemm_4bit_grad_input(const at::Tensor& grad_output, const at::Tensor& W, const at::Tensor& absmax,
                                       const OptTensor& nested_absmax, const OptTensor& nested_code,
                                       const OptTensor& offset, int64_t blocksize, int64_t nested_blocksize,
                                       std::string quant_type, int64_t N, int64_t K, std::string algo = "auto") {
  static const auto op = typed_op<sig::gemm_4bit_grad_input>("fourbit::gemm_4bit_grad_input");
  return op.call(grad_output, W, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
                 std::move(quant_type), N, K, std::move(algo));
}

// lora_4bit(X, W, absmax, nested_absmax, nested_code, offset, bias, blocksize, nested_blocksize,
//           quant_type, N, K, lora_A, lora_B, scaling, X_lora) -> (Y, XA)
inline std::tuple<at::Tensor, at::Tensor> lora_4bit(const at::Tensor& X, const at::Tensor& W,
                                                    const at::Tensor& absmax, const OptTensor& nested_absmax,
                                                    const OptTensor& nested_code, const OptTensor& offset,
                                                    const OptTensor& bias, int64_t blocksize,
                                                    int64_t nested_blocksize, std::string quant_type, int64_t N,
                                                    int64_t K, const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                    double scaling, const OptTensor& X_lora) {
  static const auto op = typed_op<sig::lora_4bit>("fourbit::lora_4bit");
  return op.call(X, W, absmax, nested_absmax, nested_code, offset, bias, blocksize, nested_blocksize,
                 std::move(quant_type), N, K, lora_A, lora_B, scaling, X_lora);
}

// lora_4bit_backward(grad_output, W, absmax, nested_absmax, nested_code, offset, blocksize,
//                    nested_blocksize, quant_type, N, K, lora_A, lora_B, scaling, X_lora, XA,
//                    separate_x_lora, output_mask) -> (dX, dX_lora, dA, dB)
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_4bit_backward(
    const at::Tensor& grad_output, const at::Tensor& W, const at::Tensor& absmax, const OptTensor& nested_absmax,
    const OptTensor& nested_code, const OptTensor& offset, int64_t blocksize, int64_t nested_blocksize,
    std::string quant_type, int64_t N, int64_t K, const at::Tensor& lora_A, const at::Tensor& lora_B,
    double scaling, const OptTensor& X_lora, const OptTensor& XA, bool separate_x_lora,
    std::array<bool, 4> output_mask) {
  static const auto op = typed_op<sig::lora_4bit_backward>("fourbit::lora_4bit_backward");
  return op.call(grad_output, W, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
                 std::move(quant_type), N, K, lora_A, lora_B, scaling, X_lora, XA, separate_x_lora, output_mask);
}

// adamw_step(params, grads, state1, state2, absmax1, absmax2, qmap1, qmap2, steps, lr, beta1,
//            beta2, eps, weight_decay): updates params and the states in place.
inline void adamw_step(at::TensorList params, at::TensorList grads, at::TensorList state1, at::TensorList state2,
                       at::TensorList absmax1, at::TensorList absmax2, const at::Tensor& qmap1,
                       const at::Tensor& qmap2, at::IntArrayRef steps, double lr, double beta1, double beta2,
                       double eps, double weight_decay) {
  static const auto op = typed_op<sig::adamw_step>("fourbit::adamw_step");
  op.call(params, grads, state1, state2, absmax1, absmax2, qmap1, qmap2, steps, lr, beta1, beta2, eps,
          weight_decay);
}

// paged_zeros(size, dtype, device) -> zero-filled tensor on a page-manager buffer
inline at::Tensor paged_zeros(at::IntArrayRef size, at::ScalarType dtype, c10::Device device) {
  static const auto op = typed_op<sig::paged_zeros>("fourbit::paged_zeros");
  return op.call(size, dtype, device);
}

// paged_prefetch(tensors, device): moves the paged tensors' pages to `device` ("cpu": the host)
inline void paged_prefetch(at::TensorList tensors, c10::Device device) {
  static const auto op = typed_op<sig::paged_prefetch>("fourbit::paged_prefetch");
  op.call(tensors, device);
}

}  // namespace ops
}  // namespace fourbit
