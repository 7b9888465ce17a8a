// A checkpoint's tensors by name, read one at a time: a single .safetensors file, or a
// transformers sharded checkpoint, whose model.safetensors.index.json maps each tensor to its
// shard file ({"metadata": {...}, "weight_map": {name: "model-00001-of-00003.safetensors"}}).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "fourbit/torch/safetensors.h"

namespace fourbit {
namespace io {

class CheckpointReader {
 public:
  // `path`: a .safetensors file, an index .json file, or a directory holding
  // model.safetensors.index.json or model.safetensors. An index is checked up front: every
  // shard must be a relative path inside the index's directory (no "..", not absolute, no
  // symlink out), exist, be a valid safetensors file and hold every tensor the index puts in
  // it; the shards are mapped and checked one after another (the last stays mapped until
  // another is needed). Errors (c10::ValueError) name the index, the key and the shard file.
  explicit CheckpointReader(const std::string& path);

  const std::vector<std::string>& keys() const { return keys_; }  // sorted
  bool contains(const std::string& key) const;
  const std::string& file_of(const std::string& key) const;  // the shard holding `key`
  // A CPU copy of one tensor. Maps the key's shard if it is not the one mapped now (unmapping
  // that one first): at most one shard is mapped at any time.
  ::torch::Tensor tensor(const std::string& key);

 private:
  std::vector<std::string> keys_;
  std::vector<std::string> files_;   // distinct shard paths
  std::vector<size_t> file_index_;   // per key (in keys_ order), into files_
  std::unique_ptr<SafetensorsFile> open_;
  size_t open_index_ = 0;
};

// Every tensor of a checkpoint (file, index or directory, as CheckpointReader takes), on the CPU.
TensorMap load_checkpoint_tensors(const std::string& path);

}  // namespace io
}  // namespace fourbit
