// The safetensors reader (mmap, one tensor copied out at a time) and writer
// (include/fourbit/torch/safetensors.h); the header is parsed and written with nlohmann-json.
#include "fourbit/torch/safetensors.h"

#include <c10/util/Exception.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <vector>

namespace fourbit {
namespace io {
namespace {

using json = nlohmann::json;

struct DtypeName {
  const char* name;
  ::torch::Dtype dtype;
};
constexpr DtypeName kDtypes[] = {
    {"F64", ::torch::kFloat64}, {"F32", ::torch::kFloat32}, {"F16", ::torch::kFloat16},
    {"BF16", ::torch::kBFloat16}, {"I64", ::torch::kInt64}, {"I32", ::torch::kInt32},
    {"I16", ::torch::kInt16}, {"I8", ::torch::kInt8}, {"U8", ::torch::kUInt8}, {"BOOL", ::torch::kBool},
};

// A header larger than this is not a real one (safetensors itself caps it at 100 MB).
constexpr uint64_t kMaxHeaderBytes = 100u << 20;
// A tensor is copied out of the mapping this many bytes at a time.
constexpr uint64_t kCopyChunkBytes = 4u << 20;

}  // namespace

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  TORCH_CHECK_VALUE(fd >= 0, "safetensors: cannot open '", path, "': ", std::strerror(errno));
  struct stat st {};
  const int stat_rc = ::fstat(fd, &st);
  const int stat_errno = errno;
  if (stat_rc != 0 || !S_ISREG(st.st_mode)) ::close(fd);
  TORCH_CHECK_VALUE(stat_rc == 0, "safetensors: cannot stat '", path, "': ", std::strerror(stat_errno));
  TORCH_CHECK_VALUE(S_ISREG(st.st_mode), "safetensors: '", path, "' is not a regular file");
  size_ = static_cast<size_t>(st.st_size);
  if (size_ < 8) ::close(fd);
  TORCH_CHECK_VALUE(size_ >= 8, "safetensors: '", path, "' has ", size_, " bytes, too few for the 8-byte header length");
  map_ = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
  const int map_errno = errno;
  ::close(fd);  // the mapping keeps the file
  if (map_ == MAP_FAILED) map_ = nullptr;
  TORCH_CHECK_VALUE(map_, "safetensors: cannot mmap '", path, "' (", size_, " bytes): ", std::strerror(map_errno));
  try {
    parse_header();
  } catch (...) {
    ::munmap(map_, size_);
    throw;
  }
}

SafetensorsFile::~SafetensorsFile() {
  if (map_) ::munmap(map_, size_);
}

void SafetensorsFile::parse_header() {
  const char* bytes = static_cast<const char*>(map_);
  const std::string& path = path_;
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | static_cast<uint8_t>(bytes[i]);
  TORCH_CHECK_VALUE(header_len <= kMaxHeaderBytes && header_len <= size_ - 8, "safetensors: '", path,
                    "' declares a header of ", header_len, " bytes, but the file has ", size_, " bytes");
  json header;
  try {
    header = json::parse(bytes + 8, bytes + 8 + header_len);
  } catch (const json::exception& e) {
    TORCH_CHECK_VALUE(false, "safetensors: the header of '", path, "' is not valid JSON: ", e.what());
  }
  TORCH_CHECK_VALUE(header.is_object(), "safetensors: the header of '", path, "' must be a JSON object, got ",
                    header.type_name());
  data_start_ = 8 + header_len;
  const uint64_t data_len = size_ - data_start_;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      TORCH_CHECK_VALUE(entry.is_object(), "safetensors: '", path, "': __metadata__ must be an object");
      for (const auto& [k, v] : entry.items()) {
        TORCH_CHECK_VALUE(v.is_string(), "safetensors: '", path, "': __metadata__['", k, "'] must be a string");
        metadata_[k] = v.get<std::string>();
      }
      continue;
    }
    const std::string where = "safetensors: '" + path + "', tensor '" + name + "'";
    TORCH_CHECK_VALUE(entry.is_object() && entry.contains("dtype") && entry.contains("shape") &&
                          entry.contains("data_offsets"),
                      where, ": entry must be an object with dtype, shape and data_offsets, got ", entry.dump());
    TORCH_CHECK_VALUE(entry["dtype"].is_string(), where, ": dtype must be a string, got ", entry["dtype"].dump());
    const std::string dtype_name = entry["dtype"].get<std::string>();
    const DtypeName* dtype = nullptr;
    for (const auto& d : kDtypes) {
      if (dtype_name == d.name) dtype = &d;
    }
    TORCH_CHECK_VALUE(dtype, where, ": unsupported dtype '", dtype_name, "'");
    TORCH_CHECK_VALUE(entry["shape"].is_array(), where, ": shape must be a list, got ", entry["shape"].dump());
    std::vector<int64_t> shape;
    uint64_t numel = 1;
    for (const auto& d : entry["shape"]) {
      TORCH_CHECK_VALUE(d.is_number_unsigned(), where, ": shape must hold non-negative ints, got ",
                        entry["shape"].dump());
      const uint64_t v = d.get<uint64_t>();
      TORCH_CHECK_VALUE(v <= (uint64_t{1} << 40) && (v == 0 || numel <= (uint64_t{1} << 48) / v), where,
                        ": shape ", entry["shape"].dump(), " is too large");
      numel *= v;
      shape.push_back(static_cast<int64_t>(v));
    }
    const auto& offsets = entry["data_offsets"];
    TORCH_CHECK_VALUE(offsets.is_array() && offsets.size() == 2 && offsets[0].is_number_unsigned() &&
                          offsets[1].is_number_unsigned(),
                      where, ": data_offsets must be [begin, end], got ", offsets.dump());
    const uint64_t begin = offsets[0].get<uint64_t>(), end = offsets[1].get<uint64_t>();
    TORCH_CHECK_VALUE(begin <= end && end <= data_len, where, ": data_offsets [", begin, ", ", end,
                      "] fall outside the ", data_len, " data bytes");
    const uint64_t nbytes = numel * c10::elementSize(dtype->dtype);
    TORCH_CHECK_VALUE(end - begin == nbytes, where, ": data_offsets span ", end - begin, " bytes, but ", dtype_name,
                      " ", entry["shape"].dump(), " needs ", nbytes);
    entries_.emplace(name, Entry{dtype->dtype, std::move(shape), begin, end});
  }
}

std::vector<std::string> SafetensorsFile::keys() const {
  std::vector<std::string> out;
  out.reserve(entries_.size());
  for (const auto& [name, entry] : entries_) out.push_back(name);
  return out;
}

::torch::Tensor SafetensorsFile::tensor(const std::string& name) const {
  auto it = entries_.find(name);
  TORCH_CHECK_VALUE(it != entries_.end(), "safetensors: '", path_, "' has no tensor '", name, "'");
  const Entry& e = it->second;
  ::torch::Tensor t = ::torch::empty(e.shape, ::torch::TensorOptions().dtype(e.dtype));
  const uint64_t nbytes = e.end - e.begin;
  if (nbytes == 0) return t;
  // Copied in chunks; after each, the file pages it touched are dropped from the mapping (they
  // stay in the page cache), so the resident set holds the copies plus one chunk of the file.
  const char* base = static_cast<const char*>(map_);
  char* dst = static_cast<char*>(t.data_ptr());
  const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  for (uint64_t done = 0; done < nbytes;) {
    const uint64_t n = std::min(kCopyChunkBytes, nbytes - done);
    const uint64_t from = data_start_ + e.begin + done;
    std::memcpy(dst + done, base + from, n);
    const uint64_t first = from / page * page;
    ::madvise(const_cast<char*>(base) + first, from + n - first, MADV_DONTNEED);
    done += n;
  }
  return t;
}

TensorMap load_safetensors(const std::string& path, std::map<std::string, std::string>* metadata) {
  const SafetensorsFile file(path);
  TensorMap out;
  for (const auto& name : file.keys()) out.emplace(name, file.tensor(name));
  if (metadata) {
    for (const auto& [k, v] : file.metadata()) (*metadata)[k] = v;
  }
  return out;
}

void save_safetensors(const std::string& path, const TensorMap& tensors,
                      const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<::torch::Tensor> blobs;
  uint64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    TORCH_CHECK_VALUE(tensor.defined(), "save_safetensors: tensor '", name, "' is undefined");
    TORCH_CHECK_VALUE(name != "__metadata__", "save_safetensors: '__metadata__' is not a valid tensor name");
    const DtypeName* dtype = nullptr;
    for (const auto& d : kDtypes) {
      if (tensor.scalar_type() == d.dtype) dtype = &d;
    }
    TORCH_CHECK_VALUE(dtype, "save_safetensors: tensor '", name, "' has unsupported dtype ", tensor.scalar_type());
    ::torch::Tensor t = tensor.detach().cpu().contiguous();
    const uint64_t nbytes = t.numel() * t.element_size();
    header[name] = {{"dtype", dtype->name}, {"shape", t.sizes().vec()}, {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
    blobs.push_back(t);
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // the data starts 8-byte aligned
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  TORCH_CHECK_VALUE(out.good(), "save_safetensors: cannot write '", path, "'");
  uint64_t len = text.size();
  char len_bytes[8];
  for (int i = 0; i < 8; ++i) len_bytes[i] = static_cast<char>((len >> (8 * i)) & 0xff);
  out.write(len_bytes, 8);
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  for (const auto& t : blobs) {
    out.write(static_cast<const char*>(t.const_data_ptr()), static_cast<std::streamsize>(t.numel() * t.element_size()));
  }
  TORCH_CHECK(out.good(), "save_safetensors: writing '", path, "' failed");
}

}  // namespace io
}  // namespace fourbit
