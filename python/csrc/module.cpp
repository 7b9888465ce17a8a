// fourbit._C: the pybind11 module and nothing else. The ops (torch.ops.fourbit.*) are
// registered by libfourbit_torch (src/torch/), which this module links and so loads.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "fourbit/codebook.h"
#include "fourbit/error.h"
#include "fourbit/quantize.h"
#include "fourbit/torch/library.h"

PYBIND11_MODULE(_C, module) {
  module.doc() = "fourbit native extension: loads libfourbit_torch (torch.ops.fourbit.*) and small helpers";
  // Referencing the library makes the link keep it (and so its op registration).
  module.attr("torch_library_version") = fourbit::torch_library_version();
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
