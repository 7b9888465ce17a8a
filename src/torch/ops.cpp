// fourbit._C: the schemas of the quantization ops and the small pybind11 module.
// Device impls live in ops_cpu.cpp / ops_cuda.cpp; the matmul ops (schemas and impls) in
// gemm_ops*.cpp; fake (meta) kernels and autograd in python/fourbit/_ops.py.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>

#include "fourbit/codebook.h"
#include "fourbit/error.h"
#include "fourbit/quantize.h"

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

PYBIND11_MODULE(_C, module) {
  module.doc() = "fourbit native extension: registers torch.ops.fourbit.* and small helpers";
  module.def("built_with_cuda", &fourbit::built_with_cuda,
             "True if the native library contains the CUDA kernels");
  module.def(
      "create_dynamic_map",
      [](bool is_signed, int max_exponent_bits, int total_bits) {
        try {
          const auto values = fourbit::create_dynamic_map(is_signed, max_exponent_bits, total_bits);
          return std::vector<float>(values.begin(), values.end());
        } catch (const fourbit::Error& e) {
          if (e.kind() == fourbit::Error::Kind::InvalidArgument) throw pybind11::value_error(e.what());
          throw;
        }
      },
      pybind11::arg("signed") = true, pybind11::arg("max_exponent_bits") = 7,
      pybind11::arg("total_bits") = 8,
      "bitsandbytes' 8-bit dynamic map as a list of 256 floats, sorted ascending");
  module.def("codebook_4bit", [](const std::string& quant_type) {
    try {
      const auto& values = fourbit::codebook_4bit(fourbit::parse_quant_type(quant_type));
      return std::vector<float>(values.begin(), values.end());
    } catch (const fourbit::Error& e) {
      throw pybind11::value_error(e.what());
    }
  }, pybind11::arg("quant_type"), "The 16 values of the NF4 or FP4 codebook in code order");
}
