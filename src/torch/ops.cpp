// libfourbit_torch: the schemas of the quantization ops (TORCH_LIBRARY, registered when the
// library loads). Device impls live in ops_cpu.cpp / ops_cuda.cpp; the matmul ops (schemas and
// impls) in gemm_ops*.cpp; fake (meta) kernels and autograd for Python in
// python/fourbit/_ops.py, for C++ in nn.cpp.
#include <torch/library.h>

TORCH_LIBRARY(fourbit, m) {
  // 4-bit blockwise: returns (packed [(n+1)//(2*itemsize), 1] of quant_storage, absmax fp32).
  m.def("quantize_4bit(Tensor A, int blocksize, str quant_type, ScalarType quant_storage)"
        " -> (Tensor, Tensor)");
  m.def("dequantize_4bit(Tensor A, Tensor absmax, int blocksize, str quant_type, SymInt[] shape,"
        " ScalarType dtype) -> Tensor");
  m.def("dequantize_4bit.out(Tensor A, Tensor absmax, int blocksize, str quant_type,"
        " SymInt[] shape, ScalarType dtype, *, Tensor(a!) out) -> ()");
  // Double-quantized absmax (uint8 + nested fp32 absmax + 256-entry code + offset),
  // decoded inside the same kernel.
  m.def("dequantize_4bit_nested(Tensor A, Tensor absmax, Tensor nested_absmax,"
        " Tensor nested_code, Tensor offset, int blocksize, int nested_blocksize,"
        " str quant_type, SymInt[] shape, ScalarType dtype) -> Tensor");
  m.def("dequantize_4bit_nested.out(Tensor A, Tensor absmax, Tensor nested_absmax,"
        " Tensor nested_code, Tensor offset, int blocksize, int nested_blocksize,"
        " str quant_type, SymInt[] shape, ScalarType dtype, *, Tensor(a!) out) -> ()");
  // 8-bit blockwise with a 256-entry sorted code: returns (codes uint8 like A, absmax fp32).
  m.def("quantize_blockwise(Tensor A, Tensor code, int blocksize) -> (Tensor, Tensor)");
  m.def("dequantize_blockwise(Tensor A, Tensor absmax, Tensor code, int blocksize,"
        " ScalarType dtype) -> Tensor");
}
