// Device-independent halves of the torch ops: argument checks (ValueError naming the
// argument and value), output allocation, and the tensor -> core params translation.
// ops_cpu.cpp and ops_cuda.cpp pass in the core functions for their device.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include <string>
#include <tuple>

#include "fourbit/quantize.h"

namespace fourbit {
namespace binding {

// The core entry points of one device (CPU functions, or CUDA ones bound to the current
// stream).
struct DeviceKernels {
  void (*quantize_4bit)(const Quantize4bitParams&);
  void (*dequantize_4bit)(const Dequantize4bitParams&);
  void (*quantize_blockwise)(const QuantizeBlockwiseParams&);
  void (*dequantize_blockwise)(const DequantizeBlockwiseParams&);
};

std::tuple<at::Tensor, at::Tensor> quantize_4bit(const DeviceKernels& k, const at::Tensor& A,
                                                 int64_t blocksize, const std::string& quant_type,
                                                 at::ScalarType quant_storage);

void dequantize_4bit_out(const DeviceKernels& k, const at::Tensor& A, const at::Tensor& absmax,
                         int64_t blocksize, const std::string& quant_type, at::IntArrayRef shape,
                         at::ScalarType dtype, const at::Tensor& out);

void dequantize_4bit_nested_out(const DeviceKernels& k, const at::Tensor& A,
                                const at::Tensor& absmax, const at::Tensor& nested_absmax,
                                const at::Tensor& nested_code, const at::Tensor& offset,
                                int64_t blocksize, int64_t nested_blocksize,
                                const std::string& quant_type, at::IntArrayRef shape,
                                at::ScalarType dtype, const at::Tensor& out);

std::tuple<at::Tensor, at::Tensor> quantize_blockwise(const DeviceKernels& k, const at::Tensor& A,
                                                      const at::Tensor& code, int64_t blocksize);

at::Tensor dequantize_blockwise(const DeviceKernels& k, const at::Tensor& A,
                                const at::Tensor& absmax, const at::Tensor& code,
                                int64_t blocksize, at::ScalarType dtype);

// Allocates the output of dequantize_4bit(_nested) on A's device.
at::Tensor empty_dequantized(const at::Tensor& A, at::IntArrayRef shape, at::ScalarType dtype);

}  // namespace binding
}  // namespace fourbit

namespace fourbit {
namespace binding {

// Registers every op's impls for one dispatch key, forwarding to the functions above
// with the device's kernels `K`. `Guard` is constructed from A before each call (a CUDA
// device guard, or a no-op on the CPU). Used by ops_cpu.cpp and ops_cuda.cpp.
template <const DeviceKernels& K, typename Guard>
void register_device_impls(torch::Library& m) {
  m.impl("quantize_4bit", [](const at::Tensor& A, int64_t blocksize, std::string quant_type,
                             at::ScalarType quant_storage) {
    Guard guard(A);
    return quantize_4bit(K, A, blocksize, quant_type, quant_storage);
  });
  m.impl("dequantize_4bit", [](const at::Tensor& A, const at::Tensor& absmax, int64_t blocksize,
                               std::string quant_type, at::IntArrayRef shape,
                               at::ScalarType dtype) {
    Guard guard(A);
    at::Tensor out = empty_dequantized(A, shape, dtype);
    dequantize_4bit_out(K, A, absmax, blocksize, quant_type, shape, dtype, out);
    return out;
  });
  m.impl("dequantize_4bit.out", [](const at::Tensor& A, const at::Tensor& absmax,
                                   int64_t blocksize, std::string quant_type,
                                   at::IntArrayRef shape, at::ScalarType dtype,
                                   const at::Tensor& out) {
    Guard guard(A);
    dequantize_4bit_out(K, A, absmax, blocksize, quant_type, shape, dtype, out);
  });
  m.impl("dequantize_4bit_nested",
         [](const at::Tensor& A, const at::Tensor& absmax, const at::Tensor& nested_absmax,
            const at::Tensor& nested_code, const at::Tensor& offset, int64_t blocksize,
            int64_t nested_blocksize, std::string quant_type, at::IntArrayRef shape,
            at::ScalarType dtype) {
           Guard guard(A);
           at::Tensor out = empty_dequantized(A, shape, dtype);
           dequantize_4bit_nested_out(K, A, absmax, nested_absmax, nested_code, offset,
                                      blocksize, nested_blocksize, quant_type, shape, dtype, out);
           return out;
         });
  m.impl("dequantize_4bit_nested.out",
         [](const at::Tensor& A, const at::Tensor& absmax, const at::Tensor& nested_absmax,
            const at::Tensor& nested_code, const at::Tensor& offset, int64_t blocksize,
            int64_t nested_blocksize, std::string quant_type, at::IntArrayRef shape,
            at::ScalarType dtype, const at::Tensor& out) {
           Guard guard(A);
           dequantize_4bit_nested_out(K, A, absmax, nested_absmax, nested_code, offset,
                                      blocksize, nested_blocksize, quant_type, shape, dtype, out);
         });
  m.impl("quantize_blockwise", [](const at::Tensor& A, const at::Tensor& code, int64_t blocksize) {
    Guard guard(A);
    return quantize_blockwise(K, A, code, blocksize);
  });
  m.impl("dequantize_blockwise", [](const at::Tensor& A, const at::Tensor& absmax,
                                    const at::Tensor& code, int64_t blocksize,
                                    at::ScalarType dtype) {
    Guard guard(A);
    return dequantize_blockwise(K, A, absmax, code, blocksize, dtype);
  });
}

}  // namespace binding
}  // namespace fourbit
