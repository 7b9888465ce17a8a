// Reading and writing safetensors files (https://github.com/huggingface/safetensors): a
// little-endian u64 header length, a JSON header {name: {dtype, shape, data_offsets}, optional
// "__metadata__": {str: str}}, then the raw tensor bytes. Used by the checkpoint and adapter
// I/O of serialize.h; usable on its own.
#pragma once

#include <torch/types.h>

#include <map>
#include <string>

namespace fourbit {
namespace io {

using TensorMap = std::map<std::string, ::torch::Tensor>;

// Every tensor of the file, on the CPU. A malformed file (truncated, a header that is not
// JSON, an entry whose dtype, shape or offsets do not fit) throws c10::ValueError naming the
// file, the entry and the bad value.
TensorMap load_safetensors(const std::string& path, std::map<std::string, std::string>* metadata = nullptr);

// Writes `tensors` (any device; copied to the CPU, contiguous) with optional string metadata.
void save_safetensors(const std::string& path, const TensorMap& tensors,
                      const std::map<std::string, std::string>& metadata = {});

}  // namespace io
}  // namespace fourbit
