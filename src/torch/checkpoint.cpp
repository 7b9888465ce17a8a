// Single-file and sharded (transformers' model.safetensors.index.json) checkpoint reading
// (include/fourbit/torch/checkpoint.h): resolves and checks the index, then maps one shard at
// a time through SafetensorsFile.
#include "fourbit/torch/checkpoint.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <nlohmann/json.hpp>

namespace fourbit {
namespace io {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

const char* const kIndexName = "model.safetensors.index.json";
const char* const kSingleName = "model.safetensors";

bool ends_with(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

// `shard` resolved against `dir`; refuses anything that leaves it.
fs::path shard_path(const fs::path& dir, const std::string& shard, const std::string& index, const std::string& key) {
  const fs::path rel(shard);
  TORCH_CHECK_VALUE(!shard.empty() && !rel.is_absolute() && !rel.has_root_name() && !rel.has_root_directory(),
                    "checkpoint index '", index, "': key '", key, "' names shard file '", shard,
                    "', which is not a relative path in the index's directory");
  for (const auto& part : rel) {
    TORCH_CHECK_VALUE(part != "..", "checkpoint index '", index, "': key '", key, "' names shard file '", shard,
                      "', which leaves the index's directory");
  }
  const fs::path full = dir / rel;
  std::error_code ec;
  TORCH_CHECK_VALUE(fs::is_regular_file(full, ec), "checkpoint index '", index, "': key '", key,
                    "' is in shard file '", full.string(), "', which does not exist");
  // A symlink inside the directory may still point out of it.
  const fs::path real_dir = fs::canonical(dir, ec);
  const fs::path real = fs::canonical(full, ec);
  const auto rel_real = real.lexically_relative(real_dir);
  TORCH_CHECK_VALUE(!ec && !rel_real.empty() && *rel_real.begin() != "..", "checkpoint index '", index, "': key '",
                    key, "' names shard file '", shard, "', which resolves to '", real.string(),
                    "' outside the index's directory");
  return full;
}

}  // namespace

CheckpointReader::CheckpointReader(const std::string& path) {
  std::error_code ec;
  std::string file = path;
  if (fs::is_directory(path, ec)) {
    const fs::path dir(path);
    if (fs::exists(dir / kIndexName, ec)) {
      file = (dir / kIndexName).string();
    } else {
      TORCH_CHECK_VALUE(fs::exists(dir / kSingleName, ec), "checkpoint directory '", path, "' has neither ",
                        kIndexName, " nor ", kSingleName);
      file = (dir / kSingleName).string();
    }
  }
  if (!ends_with(file, ".json")) {
    open_ = std::make_unique<SafetensorsFile>(file);
    keys_ = open_->keys();
    files_ = {file};
    file_index_.assign(keys_.size(), 0);
    return;
  }

  std::ifstream in(file);
  TORCH_CHECK_VALUE(in.good(), "cannot open checkpoint index '", file, "'");
  json index;
  try {
    index = json::parse(std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>()));
  } catch (const json::exception& e) {
    TORCH_CHECK_VALUE(false, "checkpoint index '", file, "' is not valid JSON: ", e.what());
  }
  TORCH_CHECK_VALUE(index.is_object() && index.contains("weight_map") && index["weight_map"].is_object(),
                    "checkpoint index '", file, "' must be a JSON object with a 'weight_map' object");
  const fs::path dir = fs::path(file).parent_path().empty() ? fs::path(".") : fs::path(file).parent_path();
  std::map<std::string, size_t> file_ids;  // shard name as written -> files_ index
  std::map<std::string, size_t> key_file;
  for (const auto& [key, shard] : index["weight_map"].items()) {
    TORCH_CHECK_VALUE(shard.is_string(), "checkpoint index '", file, "': key '", key,
                      "' must map to a shard file name, got ", shard.dump());
    const std::string name = shard.get<std::string>();
    auto it = file_ids.find(name);
    if (it == file_ids.end()) {
      files_.push_back(shard_path(dir, name, file, key).string());
      it = file_ids.emplace(name, files_.size() - 1).first;
    }
    key_file.emplace(key, it->second);
  }
  TORCH_CHECK_VALUE(!key_file.empty(), "checkpoint index '", file, "' has an empty weight_map");
  for (const auto& [key, id] : key_file) {
    keys_.push_back(key);
    file_index_.push_back(id);
  }
  // Each shard in turn: a valid file holding every tensor the index puts in it.
  for (size_t id = 0; id < files_.size(); ++id) {
    open_.reset();
    open_ = std::make_unique<SafetensorsFile>(files_[id]);
    open_index_ = id;
    for (size_t i = 0; i < keys_.size(); ++i) {
      TORCH_CHECK_VALUE(file_index_[i] != id || open_->contains(keys_[i]), "checkpoint index '", file,
                        "' puts tensor '", keys_[i], "' in shard file '", files_[id],
                        "', which has no tensor of that name");
    }
  }
}

bool CheckpointReader::contains(const std::string& key) const {
  return std::binary_search(keys_.begin(), keys_.end(), key);
}

const std::string& CheckpointReader::file_of(const std::string& key) const {
  auto it = std::lower_bound(keys_.begin(), keys_.end(), key);
  TORCH_CHECK_VALUE(it != keys_.end() && *it == key, "checkpoint has no tensor '", key, "'");
  return files_[file_index_[it - keys_.begin()]];
}

::torch::Tensor CheckpointReader::tensor(const std::string& key) {
  auto it = std::lower_bound(keys_.begin(), keys_.end(), key);
  TORCH_CHECK_VALUE(it != keys_.end() && *it == key, "checkpoint has no tensor '", key, "'");
  const size_t id = file_index_[it - keys_.begin()];
  if (!open_ || open_index_ != id) {
    open_.reset();  // unmap before mapping the next shard
    open_ = std::make_unique<SafetensorsFile>(files_[id]);
    open_index_ = id;
  }
  return open_->tensor(key);
}

TensorMap load_checkpoint_tensors(const std::string& path) {
  CheckpointReader reader(path);
  TensorMap out;
  for (const auto& key : reader.keys()) out.emplace(key, reader.tensor(key));
  return out;
}

}  // namespace io
}  // namespace fourbit
