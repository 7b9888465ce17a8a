// Reading and writing safetensors files (https://github.com/huggingface/safetensors): a
// little-endian u64 header length, a JSON header {name: {dtype, shape, data_offsets}, optional
// "__metadata__": {str: str}}, then the raw tensor bytes. Files are read through a read-only
// mmap, one tensor copied out at a time. Used by the checkpoint and adapter I/O of
// serialize.h (and checkpoint.h for sharded checkpoints); usable on its own. POSIX only.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace fourbit {
namespace io {

using TensorMap = std::map<std::string, ::torch::Tensor>;

// One safetensors file, mapped read-only for the object's lifetime. The constructor checks the
// whole header against the file's size (a malformed file throws c10::ValueError naming the
// file, the entry and the bad value), so tensor() never reads outside the file. tensor()
// copies one tensor out to the CPU in 4 MiB chunks, releasing each chunk's pages from the
// mapping after it, so a load holds the copies plus at most one chunk of the file.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  std::vector<std::string> keys() const;  // sorted
  bool contains(const std::string& name) const { return entries_.count(name) != 0; }
  ::torch::Tensor tensor(const std::string& name) const;  // throws c10::ValueError if absent
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  void parse_header();
  struct Entry {
    ::torch::Dtype dtype;
    std::vector<int64_t> shape;
    uint64_t begin, end;  // within the data region
  };
  std::string path_;
  void* map_ = nullptr;
  size_t size_ = 0;
  uint64_t data_start_ = 0;
  std::map<std::string, Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

// Every tensor of the file, on the CPU (copies; the mapping is gone when this returns).
TensorMap load_safetensors(const std::string& path, std::map<std::string, std::string>* metadata = nullptr);

// Writes `tensors` (any device; copied to the CPU, contiguous) with optional string metadata.
void save_safetensors(const std::string& path, const TensorMap& tensors,
                      const std::map<std::string, std::string>& metadata = {});

}  // namespace io
}  // namespace fourbit
