// fourbit::io's file reading: SafetensorsFile (mmap) refuses malformed and truncated files and
// copies tensors out; CheckpointReader / load_4bit_checkpoint read transformers' sharded
// checkpoints (tests/fixtures/cpp_torch/sharded_nf4) like the single file, keep at most one
// shard mapped, and refuse bad indexes naming the key and the file; a load's peak memory is
// the copies plus one tensor, not the file too.
#include <gtest/gtest.h>
#include <malloc.h>
#include <torch/torch.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "fourbit/torch/checkpoint.h"
#include "fourbit/torch/nn.h"
#include "fourbit/torch/serialize.h"
#include "torch_fixtures.h"

namespace {

using namespace fourbit_test;
namespace fnn = fourbit::nn;
namespace fio = fourbit::io;
namespace fs = std::filesystem;

const std::string kMlp = "model.layers.0.mlp.";
const std::string kIndex = "model.safetensors.index.json";

fs::path temp_dir(const std::string& name) {
  const auto dir = fs::temp_directory_path() / ("fourbit_test_torch_ckpt_" + std::to_string(::getpid())) / name;
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

void write_bytes(const fs::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string read_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

std::string safetensors_bytes(const std::string& header, const std::string& data) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((header.size() >> (8 * i)) & 0xff);
  return out + header + data;
}

// How many mappings of `path` /proc/self/maps lists.
int mappings_of(const fs::path& path) {
  const std::string real = fs::canonical(path).string();
  std::ifstream maps("/proc/self/maps");
  std::string line;
  int n = 0;
  while (std::getline(maps, line)) {
    if (line.size() >= real.size() && line.compare(line.size() - real.size(), real.size(), real) == 0) ++n;
  }
  return n;
}

// A kB field of /proc/self/status (VmRSS, VmHWM).
int64_t status_kb(const std::string& field) {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(field + ":", 0) == 0) return std::stoll(line.substr(field.size() + 1));
  }
  return -1;
}

// Resets the peak resident set (VmHWM) to the current one and returns that (kB), or -1 where
// /proc/self/clear_refs cannot. Blocks of 256 KiB and more are mmapped from here on, so a
// tensor freed before the measurement is not handed back resident to one allocated during it.
int64_t reset_peak() {
  mallopt(M_MMAP_THRESHOLD, 256 * 1024);
  malloc_trim(0);
  std::ofstream("/proc/self/clear_refs") << "5";
  const int64_t rss = status_kb("VmRSS");
  return status_kb("VmHWM") > rss + 1024 ? -1 : rss;
}

// The MLP of layer 0 of tests/fixtures/bnb_llama_nf4 (hidden 64, intermediate 128, no bias).
struct MlpImpl : torch::nn::Module {
  MlpImpl() {
    gate_proj = register_module("gate_proj", fnn::Linear4bit(fnn::Linear4bitOptions(64, 128).bias(false)));
    up_proj = register_module("up_proj", fnn::Linear4bit(fnn::Linear4bitOptions(64, 128).bias(false)));
    down_proj = register_module("down_proj", fnn::Linear4bit(fnn::Linear4bitOptions(128, 64).bias(false)));
  }
  fnn::Linear4bit gate_proj{nullptr}, up_proj{nullptr}, down_proj{nullptr};
};
TORCH_MODULE(Mlp);

fs::path sharded_fixture() { return fixture_path("cpp_torch/sharded_nf4"); }

// A copy of the sharded fixture whose index is `index`.
fs::path sharded_copy(const std::string& name, const std::string& index) {
  const fs::path dir = temp_dir(name);
  for (const auto& e : fs::directory_iterator(sharded_fixture())) fs::copy_file(e.path(), dir / e.path().filename());
  write_bytes(dir / kIndex, index);
  return dir;
}

std::string index_with(const std::string& key, const std::string& shard) {
  std::ostringstream s;
  s << R"({"metadata": {"total_size": 1}, "weight_map": {")" << key << R"(": ")" << shard << R"("}})";
  return s.str();
}

TEST(SafetensorsFile, MapsTheFileAndCopiesTensorsOut) {
  const fs::path path = temp_dir("file") / "t.safetensors";
  fio::save_safetensors(path.string(), {{"a", torch::arange(6, torch::kFloat32).reshape({2, 3})},
                                        {"b", torch::tensor({7}, torch::kInt64)}}, {{"format", "pt"}});
  torch::Tensor a;
  {
    fio::SafetensorsFile file(path.string());
    EXPECT_EQ(mappings_of(path), 1);
    EXPECT_EQ(file.keys(), (std::vector<std::string>{"a", "b"}));
    EXPECT_TRUE(file.contains("b"));
    EXPECT_FALSE(file.contains("c"));
    EXPECT_EQ(file.metadata().at("format"), "pt");
    a = file.tensor("a");
    a.add_(1);  // a copy: writable, the file unchanged
    EXPECT_TRUE(torch::equal(file.tensor("a"), torch::arange(6, torch::kFloat32).reshape({2, 3})));
    expect_value_error([&] { file.tensor("c"); }, {path.string(), "no tensor 'c'"});
  }
  EXPECT_EQ(mappings_of(path), 0);  // unmapped with the object; the copy lives on
  EXPECT_TRUE(torch::equal(a, torch::arange(1, 7, torch::kFloat32).reshape({2, 3})));
  fio::load_safetensors(path.string());
  EXPECT_EQ(mappings_of(path), 0);
}

TEST(SafetensorsFile, TruncatedAndOutOfRangeFilesFailBeforeAnyRead) {
  const fs::path dir = temp_dir("bad");
  const fs::path path = dir / "t.safetensors";
  fio::save_safetensors(path.string(), {{"w", torch::ones({64, 64})}});
  const std::string good = read_bytes(path);
  // The data region cut short: the last tensor's offsets now pass the end of the file.
  write_bytes(path, good.substr(0, good.size() - 100));
  expect_value_error([&] { fio::SafetensorsFile f(path.string()); },
                     {path.string(), "'w'", "[0, 16384]", "16284 data bytes"});
  expect_value_error([&] { fio::load_safetensors(path.string()); }, {"'w'", "16284 data bytes"});
  // Offsets far beyond the file (and beyond what a page rounding would hide).
  write_bytes(path, safetensors_bytes(R"({"w": {"dtype": "U8", "shape": [8], "data_offsets": [1048576, 1048584]}})",
                                      std::string(8, 'x')));
  expect_value_error([&] { fio::SafetensorsFile f(path.string()); }, {"'w'", "[1048576, 1048584]", "8 data bytes"});
  // A header length past the end of the file, an empty file, a directory, a missing file.
  write_bytes(path, good.substr(0, 40));
  expect_value_error([&] { fio::SafetensorsFile f(path.string()); }, {path.string(), "declares a header of"});
  write_bytes(path, "");
  expect_value_error([&] { fio::SafetensorsFile f(path.string()); }, {path.string(), "0 bytes"});
  expect_value_error([&] { fio::SafetensorsFile f(dir.string()); }, {dir.string(), "not a regular file"});
  expect_value_error([&] { fio::SafetensorsFile f((dir / "none").string()); }, {"cannot open", "none"});
  EXPECT_EQ(mappings_of(path), 0);  // the failed constructors unmapped
}

TEST(SafetensorsFile, EveryTruncationAndHeaderByteFlipFailsCleanly) {
  // Every proper prefix of a valid file is refused with c10::ValueError (the mapping never
  // read past the end: the ASan run of this suite checks that); a flipped header byte either
  // still describes in-range tensors or is refused the same way.
  const fs::path path = temp_dir("cut") / "t.safetensors";
  fio::save_safetensors(path.string(), {{"a", torch::arange(10, torch::kInt16)}, {"b", torch::ones({3, 5})}});
  const std::string good = read_bytes(path);
  for (size_t n = 0; n < good.size(); ++n) {
    write_bytes(path, good.substr(0, n));
    EXPECT_THROW(fio::load_safetensors(path.string()), c10::ValueError) << "prefix of " << n << " bytes";
  }
  const size_t header_end = 8 + static_cast<uint8_t>(good[0]) + 256 * static_cast<uint8_t>(good[1]);
  for (size_t i = 0; i < header_end; ++i) {
    for (char flip : {'\x01', '\x08', '\x40', '\x80'}) {
      std::string bad = good;
      bad[i] = static_cast<char>(bad[i] ^ flip);
      write_bytes(path, bad);
      try {
        for (const auto& [k, t] : fio::load_safetensors(path.string())) EXPECT_GE(t.numel(), 0) << k;
      } catch (const c10::ValueError&) {
      }
    }
  }
}

TEST(SafetensorsFile, LoadPeakIsTheCopiesPlusOneTensor) {
  // 48 tensors of 1 MiB. Reading the whole file and then copying held 2x (96 MiB); mapped and
  // copied one at a time, the peak is the copies (48 MiB) plus one tensor's pages.
  const fs::path path = temp_dir("peak") / "big.safetensors";
  constexpr int kTensors = 48;
  constexpr int64_t kMiB = 1 << 20;
  {
    const torch::Tensor one = torch::full({kMiB / 4}, 3.0f);  // written 48 times: 1 MiB in memory
    fio::TensorMap big;
    for (int i = 0; i < kTensors; ++i) big["t" + std::to_string(i)] = one;
    fio::save_safetensors(path.string(), big);
  }
  const int64_t before = reset_peak();
  if (before < 0) {
    fs::remove(path);
    GTEST_SKIP() << "cannot reset VmHWM here (/proc/self/clear_refs)";
  }
  const auto loaded = fio::load_safetensors(path.string());
  const int64_t peak_mib = (status_kb("VmHWM") - before) / 1024;
  ASSERT_EQ(loaded.size(), size_t{kTensors});
  EXPECT_EQ(loaded.at("t47")[kMiB / 4 - 1].item<float>(), 3.0f);
  RecordProperty("peak_growth_mib", std::to_string(peak_mib));
  EXPECT_GE(peak_mib, kTensors - 1);
  EXPECT_LE(peak_mib, kTensors + 8) << "peak grew " << peak_mib << " MiB for " << kTensors << " MiB of tensors";
  fs::remove(path);
}

TEST(SafetensorsFile, OneLargeTensorIsCopiedInChunks) {
  // A single 32 MiB tensor: the file's pages are released chunk by chunk (4 MiB) while it is
  // copied, so the peak is the copy plus a chunk, not twice the tensor.
  const fs::path path = temp_dir("peak1") / "one.safetensors";
  constexpr int64_t kMiB = 1 << 20, kSize = 32;
  {  // written 1 MiB at a time: no 32 MiB block for the allocator to keep and hand back below
    const std::string header = R"({"w": {"dtype": "F32", "shape": [)" + std::to_string(kSize * kMiB / 4) +
                               R"(], "data_offsets": [0, )" + std::to_string(kSize * kMiB) + "]}}";
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    const std::string head = safetensors_bytes(header, "");
    out.write(head.data(), static_cast<std::streamsize>(head.size()));
    const std::vector<float> chunk(kMiB / 4, 5.0f);
    for (int64_t i = 0; i < kSize; ++i) out.write(reinterpret_cast<const char*>(chunk.data()), kMiB);
  }
  const int64_t before = reset_peak();
  if (before < 0) {
    fs::remove(path);
    GTEST_SKIP() << "cannot reset VmHWM here (/proc/self/clear_refs)";
  }
  const torch::Tensor w = fio::SafetensorsFile(path.string()).tensor("w");
  const int64_t peak_mib = (status_kb("VmHWM") - before) / 1024;
  EXPECT_EQ(w[kSize * kMiB / 4 - 1].item<float>(), 5.0f);
  RecordProperty("peak_growth_mib", std::to_string(peak_mib));
  EXPECT_GE(peak_mib, kSize - 1);
  EXPECT_LE(peak_mib, kSize + 8) << "peak grew " << peak_mib << " MiB for a " << kSize << " MiB tensor";
  fs::remove(path);
}

TEST(ShardedCheckpoint, LoadsTransformersShardsLikeTheSingleFile) {
  Mlp single, sharded, via_index;
  fio::load_4bit_checkpoint(*single, fixture_path("bnb_llama_nf4/model.safetensors"), /*strict=*/false, kMlp);
  fio::load_4bit_checkpoint(*sharded, sharded_fixture().string(), /*strict=*/true, kMlp);
  fio::load_4bit_checkpoint(*via_index, (sharded_fixture() / kIndex).string(), /*strict=*/true, kMlp);
  for (const char* name : {"gate_proj", "up_proj", "down_proj"}) {
    auto* a = single->named_modules()[name]->as<fnn::Linear4bitImpl>();
    for (Mlp* m : {&sharded, &via_index}) {
      auto* b = (*m)->named_modules()[name]->as<fnn::Linear4bitImpl>();
      EXPECT_TRUE(torch::equal(a->dequantize(), b->dequantize())) << name;
      EXPECT_TRUE(torch::equal(a->absmax(), b->absmax())) << name;
    }
  }
  const auto expected = entry(load_fixture("llama.safetensors"), "gate_proj.deq");
  EXPECT_EQ(max_diff(sharded->gate_proj->dequantize(torch::kBFloat16).to(torch::kFloat32), expected), 0.0);
  // The same tensors as the single file, key for key, and nothing left mapped.
  const auto all = fio::load_checkpoint_tensors(sharded_fixture().string());
  const auto ref = fio::load_safetensors(fixture_path("bnb_llama_nf4/model.safetensors"));
  ASSERT_EQ(all.size(), ref.size());
  for (const auto& [k, v] : ref) EXPECT_TRUE(torch::equal(all.at(k), v)) << k;
  for (const auto& e : fs::directory_iterator(sharded_fixture())) EXPECT_EQ(mappings_of(e.path()), 0);
  // strict with a prefix: a key the model does not use is named.
  auto layer = std::make_shared<torch::nn::Module>();
  layer->register_module("mlp", Mlp());
  expect_value_error([&] { fio::load_4bit_checkpoint(*layer, sharded_fixture().string(), true, "model.layers.0."); },
                     {"does not use", "'model.layers.0.input_layernorm.weight'"});
}

TEST(ShardedCheckpoint, MapsOneShardAtATime) {
  const fs::path dir = sharded_fixture();
  const fs::path s1 = dir / "model-00001-of-00003.safetensors", s2 = dir / "model-00002-of-00003.safetensors",
                 s3 = dir / "model-00003-of-00003.safetensors";
  {
    fio::CheckpointReader reader(dir.string());
    EXPECT_EQ(mappings_of(s1) + mappings_of(s2) + mappings_of(s3), 1);  // the last one checked
    // gate_proj straddles shards 1 and 2, up_proj shards 2 and 3 (the fixture's cuts).
    EXPECT_EQ(fs::path(reader.file_of(kMlp + "gate_proj.weight")).filename(), s1.filename());
    EXPECT_EQ(fs::path(reader.file_of(kMlp + "gate_proj.weight.absmax")).filename(), s2.filename());
    reader.tensor(kMlp + "gate_proj.weight");
    EXPECT_EQ(mappings_of(s1), 1);
    EXPECT_EQ(mappings_of(s2) + mappings_of(s3), 0);
    reader.tensor(kMlp + "up_proj.weight.quant_map");
    EXPECT_EQ(mappings_of(s3), 1);
    EXPECT_EQ(mappings_of(s1) + mappings_of(s2), 0);
    expect_value_error([&] { reader.tensor("model.nope"); }, {"no tensor 'model.nope'"});
  }
  EXPECT_EQ(mappings_of(s1) + mappings_of(s2) + mappings_of(s3), 0);
}

TEST(ShardedCheckpoint, BadIndexesNameTheKeyAndTheFile) {
  const std::string key = kMlp + "gate_proj.weight";
  auto refused = [&](const fs::path& dir, std::initializer_list<std::string> parts) {
    expect_value_error([&] { fio::CheckpointReader r(dir.string()); }, parts);
    expect_value_error([&] { Mlp m; fio::load_4bit_checkpoint(*m, dir.string(), false, kMlp); }, parts);
  };
  refused(sharded_copy("up", index_with(key, "../model-00001-of-00003.safetensors")),
          {"'" + key + "'", "'../model-00001-of-00003.safetensors'", "leaves the index's directory"});
  refused(sharded_copy("sub_up", index_with(key, "sub/../../x.safetensors")), {"'" + key + "'", "leaves"});
  const fs::path outside = temp_dir("outside") / "x.safetensors";
  fs::copy_file(sharded_fixture() / "model-00001-of-00003.safetensors", outside);
  refused(sharded_copy("abs", index_with(key, outside.string())),
          {"'" + key + "'", outside.string(), "not a relative path"});
  const fs::path linked = sharded_copy("link", index_with(key, "link.safetensors"));
  fs::create_symlink(outside, linked / "link.safetensors");
  refused(linked, {"'" + key + "'", "link.safetensors", "outside the index's directory"});
  refused(sharded_copy("missing", index_with(key, "model-00009-of-00009.safetensors")),
          {"'" + key + "'", "model-00009-of-00009.safetensors", "does not exist"});
  // Listed in the index, absent from its shard (gate_proj.weight is in shard 1, not 3).
  const fs::path absent = sharded_copy("absent", index_with(key, "model-00003-of-00003.safetensors"));
  refused(absent, {"'" + key + "'", (absent / "model-00003-of-00003.safetensors").string(), "no tensor of that name"});
  refused(sharded_copy("json", "{\"weight_map\": "), {kIndex, "not valid JSON"});
  refused(sharded_copy("no_map", R"({"metadata": {}})"), {kIndex, "'weight_map'"});
  refused(sharded_copy("not_str", R"({"weight_map": {"k": 3}})"), {"'k'", "shard file name", "3"});
  // A shard that is itself malformed is named by its path.
  const fs::path cut = sharded_copy("cut", read_bytes(sharded_fixture() / kIndex));
  const std::string s3 = read_bytes(cut / "model-00003-of-00003.safetensors");
  write_bytes(cut / "model-00003-of-00003.safetensors", s3.substr(0, s3.size() - 10));
  refused(cut, {(cut / "model-00003-of-00003.safetensors").string(), "data bytes"});
  // The intact copy loads.
  const fs::path ok = sharded_copy("ok", read_bytes(sharded_fixture() / kIndex));
  Mlp m;
  EXPECT_NO_THROW(fio::load_4bit_checkpoint(*m, ok.string(), true, kMlp));
  expect_value_error([&] { fio::CheckpointReader r((ok / "none").string()); }, {"cannot open", "none"});
}

}  // namespace
