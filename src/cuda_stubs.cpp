// CUDA entry points of a CPU-only build: each throws a clear Runtime error.
#include "fourbit/error.h"
#include "fourbit/gemm.h"
#include "fourbit/quantize.h"

namespace fourbit {
namespace {
[[noreturn]] void no_cuda(const char* op) {
  throw Error(Error::Kind::Runtime,
              detail::concat(op, ": libfourbit was built without CUDA (FOURBIT_CUDA=OFF or no "
                             "CUDA compiler found); rebuild with FOURBIT_CUDA=ON"));
}
}  // namespace

bool built_with_cuda() { return false; }
void quantize_4bit_cuda(const Quantize4bitParams&, cudaStream_t) { no_cuda("quantize_4bit_cuda"); }
void dequantize_4bit_cuda(const Dequantize4bitParams&, cudaStream_t) {
  no_cuda("dequantize_4bit_cuda");
}
void quantize_blockwise_cuda(const QuantizeBlockwiseParams&, cudaStream_t) {
  no_cuda("quantize_blockwise_cuda");
}
void dequantize_blockwise_cuda(const DequantizeBlockwiseParams&, cudaStream_t) {
  no_cuda("dequantize_blockwise_cuda");
}
void gemm_4bit_cuda(const Gemm4bitParams&, cudaStream_t, Gemm4bitAlgo) { no_cuda("gemm_4bit_cuda"); }
void gemm_4bit_grad_input_cuda(const Gemm4bitGradInputParams&, cudaStream_t, Gemm4bitAlgo) {
  no_cuda("gemm_4bit_grad_input_cuda");
}
}  // namespace fourbit
