// The CPU 4-bit matmul's kernel choice for algo="auto": fused (the core's kernels, the
// weight decoded tile by tile) or blas (the whole weight dequantized into this thread's
// reused workspace, then ATen's GEMM: oneDNN, on AMX tiles where the CPU has them).
//
// Which one wins depends on the CPU (how fast oneDNN's GEMM is next to the core's
// micro-kernels: about level on AVX512_BF16, several times faster on AMX) and on the shape
// (small M: the fused kernel reads a quarter of the bytes; large M: the one dequantize is
// amortized). So no threshold is fixed for all CPUs:
//
//   shape class  = (op, dtype, M, N, K each rounded up to a power of two; M capped at 4096)
//   machine key  = CPU model, ISA class (fourbit::cpu_isa), threads, torch version
//   FOURBIT_CPU_MATMUL=auto (default): fp16 -> fused (ATen has no fast fp16 CPU GEMM);
//       M >= kCpuBlasMinRows -> blas (the dequantize is amortized); otherwise the class is
//       measured the first time it is used: both paths run on a probe (the weight's first
//       rows, min(M class, kProbeMaxRows) activation rows, capped at kProbeFlops and
//       kProbeWeightElems), best of kProbeRuns after a warm-up, and the faster one is kept.
//   static: the fixed rule (blas from kCpuBlasMinRows rows; bf16 on AMX from
//       kCpuBlasMinRowsAmx).
//   fused / blas: always that path (bf16 and fp32; fp16 is fused in every mode).
//   remeasure: auto, but this machine key's cached entries are ignored: each class is
//       measured again at its first use in this process and a trusted result overwrites
//       the entry.
//
// A measurement taken while other processes hold the cores can pick the wrong path, so
// each one is judged (judge_measurement, cpu_dispatch_trust.h: load average above the
// online cores, threads waiting for a core over a quarter of wall x threads, or a path's
// repetitions spread more than 1.25x). An untrusted one is used by this process only
// ("provisional") and never written: the next process measures that class again.
// fourbit.cpu_matmul_cache_clear() (torch.ops.fourbit.cpu_matmul_cache_clear) drops this
// machine's entries.
//
// The LoRA op (lora_ops.cpp) asks for its base product under the same shape classes, so a
// LoRA layer and a plain 4-bit linear of one shape share one measurement and one entry.
//
// Reproducibility: the two paths round differently, so a training run resumed in another
// process must make the choices the first process made. Every measured choice is written
// to $XDG_CACHE_HOME/fourbit/cpu_matmul.json (default ~/.cache/...), keyed by machine key
// and shape class, and read before measuring; a choice already on disk wins over a new
// measurement (two processes racing keep the first). A corrupt file is reported, ignored
// and rewritten. Where no cache can be written, FOURBIT_CPU_MATMUL=static gives the same
// choices in every process without one.
//
// Measurement happens inside the real CPU kernel only: torch.compile's tracing runs the
// fake (meta) kernels, which never get here. FOURBIT_CPU_MATMUL_LOG=1 prints every choice
// to stderr when first made or loaded.
#include "cpu_dispatch.h"

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/version.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>

#include "checks.h"
#include "cpu_dispatch_trust.h"
#include "fourbit/cpu_features.h"

namespace fourbit {
namespace binding {

namespace {

// From this many rows on, every M is one shape class (large-M costs scale alike).
constexpr int64_t kMaxRowClass = 4096;
// The fixed rule's threshold on AMX machines: from M = 128 the AVX-512 fused kernel lost
// to dequantize + oneDNN's AMX GEMM on a Sapphire Rapids class Xeon (issue 18's table);
// the AMX fused kernel there is unmeasured, so auto mode measures these classes instead.
constexpr int64_t kCpuBlasMinRowsAmx = 128;
// Probe activation rows at most: beyond this the fused kernel's cost per row is flat (one
// task's row chunk, kRowChunkBf16 = 512).
constexpr int64_t kProbeMaxRows = 512;
// Probe work caps: 2^30 flops (2^29 multiply-adds) and 2^21 weight elements (4 MiB in
// bf16: more than a core's L2 on current x86 CPUs, so the probe pays memory traffic as the
// real weight's pieces do).
constexpr int64_t kProbeFlops = int64_t{1} << 30;
constexpr int64_t kProbeWeightElems = int64_t{1} << 21;
// Weight rows per thread at least, so the fused kernel's column tiles fill every thread.
constexpr int64_t kProbeRowsPerThread = 128;
// Timed runs per path after one warm-up, alternated; the best is kept (a shared CPU adds
// noise).
constexpr int kProbeRuns = 3;
// A measurement moves a class off the fixed rule's path only when the other path is this
// much faster: closer than that, run-to-run spread on a shared CPU (about 5%,
// docs/BENCHMARKS.md) could flip it either way.
constexpr double kSwitchMargin = 0.05;
// The cache file's format version (a file with another version is ignored and rewritten).
constexpr int kCacheVersion = 1;

enum class Mode { Auto, Static, Fused, Blas, Remeasure };

const char* mode_name(Mode m) {
  switch (m) {
    case Mode::Auto: return "auto";
    case Mode::Static: return "static";
    case Mode::Fused: return "fused";
    case Mode::Blas: return "blas";
    case Mode::Remeasure: return "remeasure";
  }
  return "auto";
}

Mode read_mode() {
  const char* v = std::getenv("FOURBIT_CPU_MATMUL");
  if (v == nullptr || v[0] == '\0' || std::strcmp(v, "auto") == 0) return Mode::Auto;
  if (std::strcmp(v, "static") == 0) return Mode::Static;
  if (std::strcmp(v, "fused") == 0) return Mode::Fused;
  if (std::strcmp(v, "blas") == 0) return Mode::Blas;
  if (std::strcmp(v, "remeasure") == 0) return Mode::Remeasure;
  CHECK_ARG(false,
            "FOURBIT_CPU_MATMUL must be one of 'auto', 'static', 'fused', 'blas', 'remeasure', "
            "got '", v, "'");
  return Mode::Auto;
}

bool read_log() {
  const char* v = std::getenv("FOURBIT_CPU_MATMUL_LOG");
  if (v == nullptr || v[0] == '\0' || std::strcmp(v, "0") == 0) return false;
  CHECK_ARG(std::strcmp(v, "1") == 0, "FOURBIT_CPU_MATMUL_LOG must be 0 or 1, got '", v, "'");
  return true;
}

// Test-only (tests/python/test_cpu_dispatch.py): FOURBIT_CPU_MATMUL_TEST_FORCE=noisy judges
// every measurement untrusted, =trusted every one trusted (so cache tests do not depend on
// the test machine's load); unset or empty: judged on what the measurement saw.
enum class ForceTrust { None, Noisy, Trusted };

ForceTrust read_force_trust() {
  const char* v = std::getenv("FOURBIT_CPU_MATMUL_TEST_FORCE");
  if (v == nullptr || v[0] == '\0') return ForceTrust::None;
  if (std::strcmp(v, "noisy") == 0) return ForceTrust::Noisy;
  CHECK_ARG(std::strcmp(v, "trusted") == 0,
            "FOURBIT_CPU_MATMUL_TEST_FORCE must be 'noisy' or 'trusted' (test-only), got '", v,
            "'");
  return ForceTrust::Trusted;
}

int64_t pow2_class(int64_t x) {
  int64_t b = 1;
  while (b < x) b <<= 1;
  return b;
}

std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (const char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\u%04x", c);
      out += buf;
    } else {
      out += c;
    }
  }
  return out + "\"";
}

// A strict reader for the cache's one shape: {"version": <int>, "entries": {"k": "v", ...}}.
// Any other text is `ok = false` with a reason.
struct CacheReader {
  const std::string& s;
  size_t i = 0;
  std::string error;

  void ws() {
    while (i < s.size() && std::isspace(static_cast<unsigned char>(s[i]))) ++i;
  }
  bool expect(char c) {
    ws();
    if (i < s.size() && s[i] == c) {
      ++i;
      return true;
    }
    if (error.empty()) error = std::string("expected '") + c + "' at byte " + std::to_string(i);
    return false;
  }
  bool string(std::string& out) {
    if (!expect('"')) return false;
    out.clear();
    while (i < s.size() && s[i] != '"') {
      char c = s[i++];
      if (c == '\\') {
        if (i >= s.size() || (s[i] != '"' && s[i] != '\\')) {
          error = "unsupported escape at byte " + std::to_string(i);
          return false;
        }
        c = s[i++];
      }
      out += c;
    }
    return expect('"');
  }
  bool integer(int64_t& out) {
    ws();
    const size_t start = i;
    while (i < s.size() && std::isdigit(static_cast<unsigned char>(s[i]))) ++i;
    if (i == start || i - start > 9) {
      error = "expected a small integer at byte " + std::to_string(start);
      return false;
    }
    out = std::stoll(s.substr(start, i - start));
    return true;
  }
  bool read(int64_t& version, std::map<std::string, std::string>& entries) {
    std::string key;
    if (!expect('{') || !string(key) || key != "version" || !expect(':') || !integer(version) ||
        !expect(',') || !string(key) || key != "entries" || !expect(':') || !expect('{')) {
      if (error.empty()) error = "not {\"version\": ..., \"entries\": {...}}";
      return false;
    }
    ws();
    if (i < s.size() && s[i] == '}') {
      ++i;
    } else {
      for (;;) {
        std::string k, v;
        if (!string(k) || !expect(':') || !string(v)) return false;
        if (v != "fused" && v != "blas") {
          error = "entry '" + k + "' is '" + v + "', not 'fused' or 'blas'";
          return false;
        }
        entries[k] = v;
        ws();
        if (i < s.size() && s[i] == ',') {
          ++i;
          continue;
        }
        if (!expect('}')) return false;
        break;
      }
    }
    if (!expect('}')) return false;
    ws();
    if (i != s.size()) {
      error = "trailing text at byte " + std::to_string(i);
      return false;
    }
    return true;
  }
};

struct Choice {
  bool blas = false;
  std::string source;  // "measured", "cache", "rule"
  double fused_ms = -1, blas_ms = -1;
  double probe_ms = -1;  // wall time of the whole measurement (probe set-up included)
  bool provisional = false;  // measured but not trusted: used by this process, not cached
  std::string untrusted;     // why not trusted (judge_measurement's reason)
  // What the judgement saw: run-queue wait / (wall x threads) (-1: unknown), each path's
  // max/min of its runs.
  double wait_share = -1, fused_spread = -1, blas_spread = -1;
};

struct State {
  std::mutex mu;
  std::map<std::string, Choice> choices;  // machine key || shape class -> this process's choice
  // The path of the last call of each op: gemm_4bit, gemm_4bit_grad_input, lora_4bit,
  // lora_4bit_backward.
  std::string last_forward = "none", last_grad_input = "none";
  std::string last_lora_forward = "none", last_lora_backward = "none";
  int64_t measurements = 0;
  int64_t provisional = 0;  // measurements not trusted, hence not cached
  bool warned_write = false;
};

State& state() {
  static State s;
  return s;
}

std::string cache_path() {
  const char* xdg = std::getenv("XDG_CACHE_HOME");
  if (xdg != nullptr && xdg[0] == '/') return std::string(xdg) + "/fourbit/cpu_matmul.json";
  const char* home = std::getenv("HOME");
  if (home != nullptr && home[0] == '/') return std::string(home) + "/.cache/fourbit/cpu_matmul.json";
  return "";
}

// This CPU (model and ISA class): the start of every machine key of this machine, whatever
// its thread count or torch version.
std::string machine_prefix() {
  static const std::string model = cpu_model_name();
  return model + "|" + to_string(cpu_isa()) + "|";
}

std::string machine_key() {
  std::ostringstream os;
  os << machine_prefix() << "threads=" << at::get_num_threads() << "|torch=" << TORCH_VERSION;
  return os.str();
}

// The 1-minute load average, or -1 where /proc/loadavg cannot be read.
double read_loadavg() {
  std::ifstream in("/proc/loadavg");
  double load = -1;
  if (!(in >> load)) return -1;
  return load;
}

int online_cores() {
  const long n = sysconf(_SC_NPROCESSORS_ONLN);
  return n > 0 ? static_cast<int>(n) : 1;
}

// Seconds this process's threads have spent runnable but waiting for a core (the second
// field of /proc/self/task/<tid>/schedstat, nanoseconds), or -1 where it cannot be read.
double process_run_queue_wait_seconds() {
  std::error_code ec;
  std::filesystem::directory_iterator it("/proc/self/task", ec);
  if (ec) return -1;
  double total = 0;
  bool any = false;
  for (const auto& task : it) {
    std::ifstream in(task.path() / "schedstat");
    uint64_t run_ns = 0, wait_ns = 0;
    if (in >> run_ns >> wait_ns) {
      total += 1e-9 * static_cast<double>(wait_ns);
      any = true;
    }
  }
  return any ? total : -1;
}

// The cache file's entries; a missing file is empty, a corrupt one is reported and empty.
std::map<std::string, std::string> read_cache(const std::string& path) {
  std::map<std::string, std::string> entries;
  if (path.empty()) return entries;
  std::ifstream in(path, std::ios::binary);
  if (!in) return entries;
  std::stringstream buf;
  buf << in.rdbuf();
  const std::string text = buf.str();
  CacheReader reader{text};
  int64_t version = 0;
  if (!reader.read(version, entries)) {
    TORCH_WARN("fourbit: ignoring the corrupt CPU matmul cache ", path, " (", reader.error,
               "); its choices are measured again and the file rewritten");
    entries.clear();
  } else if (version != kCacheVersion) {
    entries.clear();
  }
  return entries;
}

void write_cache(const std::string& path, const std::map<std::string, std::string>& entries,
                 State& st) {
  if (path.empty()) return;
  std::error_code ec;
  std::filesystem::create_directories(std::filesystem::path(path).parent_path(), ec);
  const std::string tmp = path + ".tmp." + std::to_string(getpid());
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out << "{\"version\": " << kCacheVersion << ", \"entries\": {";
    bool first = true;
    for (const auto& [k, v] : entries) {
      out << (first ? "\n  " : ",\n  ") << json_string(k) << ": " << json_string(v);
      first = false;
    }
    out << "\n}}\n";
    out.flush();
    if (!out) ec = std::make_error_code(std::errc::io_error);
  }
  if (!ec) std::filesystem::rename(tmp, path, ec);
  if (ec) {
    std::filesystem::remove(tmp, ec);
    if (!st.warned_write) {
      TORCH_WARN("fourbit: could not write the CPU matmul cache ", path,
                 "; this process's measured choices are not kept, so a resumed run may choose "
                 "differently (FOURBIT_CPU_MATMUL=static chooses the same everywhere)");
      st.warned_write = true;
    }
  }
}

// The fixed rule's threshold: AMX speeds up oneDNN's bf16 GEMM only (fp32 stays on AVX-512).
int64_t static_min_rows(DType dtype) {
  return cpu_isa() == CpuIsa::Amx && dtype == DType::BFloat16 ? kCpuBlasMinRowsAmx
                                                                : kCpuBlasMinRows;
}

bool static_rule(int64_t M, DType dtype) {
  return dtype != DType::Float16 && M >= static_min_rows(dtype);
}

// Each timed run's seconds of two paths, alternated (fused, blas, fused, ...) after one
// warm-up each, so a burst of load from another process hits both alike; plus the
// process's run-queue wait and the wall time over the timed runs (judge_measurement's inputs).
MeasurementStats time_both(const std::function<void()>& a, const std::function<void()>& b) {
  a();  // warm-up: workspaces, pooled threads, the probe's pages
  b();
  MeasurementStats s;
  const double wait0 = process_run_queue_wait_seconds();
  const auto start = std::chrono::steady_clock::now();
  for (int r = 0; r < kProbeRuns; ++r) {
    for (int which = 0; which < 2; ++which) {
      const auto t0 = std::chrono::steady_clock::now();
      (which == 0 ? a : b)();
      const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      (which == 0 ? s.fused_s : s.blas_s).push_back(t);
    }
  }
  s.wall_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const double wait1 = process_run_queue_wait_seconds();
  s.wait_s = wait0 >= 0 && wait1 >= 0 ? std::max(0.0, wait1 - wait0) : -1;
  s.threads = at::get_num_threads();
  s.loadavg = read_loadavg();
  s.cores = online_cores();
  return s;
}

// Which op asked (the "last" entries of cpu_matmul_info).
enum class Caller { Gemm, GemmGradInput, LoraForward, LoraBackward };

std::string& last_slot(State& st, Caller caller) {
  switch (caller) {
    case Caller::Gemm: return st.last_forward;
    case Caller::GemmGradInput: return st.last_grad_input;
    case Caller::LoraForward: return st.last_lora_forward;
    case Caller::LoraBackward: return st.last_lora_backward;
  }
  return st.last_forward;
}

struct ShapeClass {
  bool forward;
  DType dtype;
  at::ScalarType scalar;
  int64_t M, N, K;  // the call's sizes
  std::string key() const {
    std::ostringstream os;
    os << (forward ? "fwd" : "grad") << "/" << to_string(dtype) << "/m"
       << std::min(pow2_class(M), kMaxRowClass) << "/n" << pow2_class(N) << "/k" << pow2_class(K);
    return os.str();
  }
};

// Times both paths on the probe: the first `rows` weight rows (a valid weight: the
// flattened prefix) and `pm` activation rows of a constant.
Choice measure(const ShapeClass& c, const Weight4bit& weight) {
  const auto start = std::chrono::steady_clock::now();
  const int64_t pm = std::min({std::min(pow2_class(c.M), kMaxRowClass), kProbeMaxRows});
  const int64_t span = c.K;  // reduction (forward) or output (input gradient) width
  int64_t rows = std::min(kProbeWeightElems / std::max<int64_t>(span, 1),
                          kProbeFlops / std::max<int64_t>(2 * pm * span, 1));
  rows = std::max(rows, kProbeRowsPerThread * at::get_num_threads());
  rows = std::min(rows, c.N);
  Weight4bit w = weight;
  w.N = rows;
  const auto opts = at::TensorOptions().dtype(c.scalar);
  Choice ch;
  MeasurementStats stats;
  if (c.forward) {
    const at::Tensor x = at::full({pm, c.K}, 0.5, opts);
    at::Tensor y = at::empty({pm, rows}, opts);
    Gemm4bitParams p;
    p.weight = w;
    p.x = x.const_data_ptr();
    p.y = y.mutable_data_ptr();
    p.M = pm;
    p.dtype = c.dtype;
    stats = time_both(
        [&] { run_core([&] { gemm_4bit(p); }); },
        [&] { at::mm_out(y, x, dequantized_weight_cpu(w, c.dtype, c.scalar).t()); });
  } else {
    const at::Tensor dy = at::full({pm, rows}, 0.5, opts);
    at::Tensor dx = at::empty({pm, c.K}, opts);
    Gemm4bitGradInputParams p;
    p.weight = w;
    p.grad_output = dy.const_data_ptr();
    p.grad_input = dx.mutable_data_ptr();
    p.M = pm;
    p.dtype = c.dtype;
    stats = time_both(
        [&] { run_core([&] { gemm_4bit_grad_input(p); }); },
        [&] { at::mm_out(dx, dy, dequantized_weight_cpu(w, c.dtype, c.scalar)); });
  }
  ch.fused_ms = 1e3 * *std::min_element(stats.fused_s.begin(), stats.fused_s.end());
  ch.blas_ms = 1e3 * *std::min_element(stats.blas_s.begin(), stats.blas_s.end());
  Trust trust = judge_measurement(stats);
  switch (read_force_trust()) {
    case ForceTrust::Noisy:
      trust = {false, "forced by FOURBIT_CPU_MATMUL_TEST_FORCE=noisy (test-only)"};
      break;
    case ForceTrust::Trusted: trust = {true, ""}; break;
    case ForceTrust::None: break;
  }
  ch.provisional = !trust.trusted;
  ch.wait_share = stats.wait_s >= 0 && stats.wall_s > 0
                      ? stats.wait_s / (stats.wall_s * stats.threads)
                      : -1;
  const auto spread = [](const std::vector<double>& v) {
    const auto [lo, hi] = std::minmax_element(v.begin(), v.end());
    return *lo > 0 ? *hi / *lo : -1.0;
  };
  ch.fused_spread = spread(stats.fused_s);
  ch.blas_spread = spread(stats.blas_s);
  ch.untrusted = trust.reason;
  // The fixed rule's path unless the other one is clearly faster (noise does not flip it).
  const bool rule_blas = static_rule(c.M, c.dtype);
  ch.blas = rule_blas ? ch.blas_ms * (1.0 - kSwitchMargin) <= ch.fused_ms
                      : ch.blas_ms < ch.fused_ms * (1.0 - kSwitchMargin);
  ch.probe_ms = 1e3 * std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ch.source = "measured on a " + std::to_string(rows) + "x" + std::to_string(c.K) +
              " probe weight at M=" + std::to_string(pm);
  return ch;
}

void log_choice(const std::string& key, const Choice& ch) {
  std::ostringstream os;
  os << "fourbit: CPU matmul " << key << " -> " << (ch.blas ? "blas" : "fused") << " ("
     << ch.source;
  if (ch.fused_ms >= 0) {
    os << ": fused " << ch.fused_ms << " ms, blas " << ch.blas_ms << " ms; the measurement took "
       << ch.probe_ms << " ms; run-queue wait share " << ch.wait_share << ", spread fused "
       << ch.fused_spread << "x, blas " << ch.blas_spread << "x";
  }
  if (ch.provisional) os << "; provisional, not cached: " << ch.untrusted;
  os << ")\n";
  std::fputs(os.str().c_str(), stderr);
}

bool choose(const ShapeClass& c, const Weight4bit& weight, Caller caller) {
  run_core([] { (void)cpu_isa(); });  // a bad FOURBIT_DISABLE_AMX/_AVX2 is a ValueError here
  const Mode mode = read_mode();
  const bool log = read_log();
  (void)read_force_trust();  // a bad test switch is a ValueError at every call, not the first
  State& st = state();
  bool blas = false;
  if (c.dtype == DType::Float16) {
    blas = false;  // every mode: ATen's fp16 CPU GEMM is slow, and its fp16 weight less exact
  } else if (mode == Mode::Fused || mode == Mode::Blas) {
    blas = mode == Mode::Blas;
  } else if (mode == Mode::Static || c.M >= kCpuBlasMinRows) {
    blas = mode == Mode::Static ? static_rule(c.M, c.dtype) : true;
  } else {
    const std::string key = machine_key() + "||" + c.key();
    std::lock_guard<std::mutex> lock(st.mu);
    auto it = st.choices.find(key);
    if (it == st.choices.end()) {
      // Not chosen in this process: take the cache's choice (not in remeasure mode), else
      // measure; a trusted measurement is recorded, an untrusted one used here only.
      const bool remeasure = mode == Mode::Remeasure;
      const std::string path = cache_path();
      auto entries = read_cache(path);
      Choice ch;
      auto hit = entries.find(key);
      if (hit != entries.end() && !remeasure) {
        ch.blas = hit->second == "blas";
        ch.source = "cache " + path;
      } else {
        ch = measure(c, weight);
        ++st.measurements;
        if (ch.provisional) {
          ++st.provisional;
        } else {
          entries = read_cache(path);  // another process may have written it meanwhile
          hit = entries.find(key);
          if (hit != entries.end() && !remeasure) {
            ch.blas = hit->second == "blas";
            ch.source = "cache " + path + " (written by another process while measuring)";
          } else {
            entries[key] = ch.blas ? "blas" : "fused";
            write_cache(path, entries, st);
          }
        }
      }
      it = st.choices.emplace(key, ch).first;
      if (log) log_choice(c.key(), ch);
    }
    blas = it->second.blas;
  }
  std::lock_guard<std::mutex> lock(st.mu);
  last_slot(st, caller) = blas ? "blas" : "fused";
  return blas;
}

}  // namespace

bool cpu_forward_uses_blas(const ForwardCall& call) {
  const Gemm4bitParams& p = call.params;
  return choose({true, p.dtype, call.x.scalar_type(), p.M, p.weight.N, p.weight.K}, p.weight,
                Caller::Gemm);
}

bool cpu_grad_input_uses_blas(const GradInputCall& call) {
  const Gemm4bitGradInputParams& p = call.params;
  // The input gradient's probe slices the weight's rows too: its output width is K.
  return choose({false, p.dtype, call.grad_output.scalar_type(), p.M, p.weight.N, p.weight.K},
                p.weight, Caller::GemmGradInput);
}

bool cpu_lora_forward_uses_blas(DType dtype, at::ScalarType scalar, int64_t M,
                                const Weight4bit& weight) {
  return choose({true, dtype, scalar, M, weight.N, weight.K}, weight, Caller::LoraForward);
}

bool cpu_lora_backward_uses_blas(DType dtype, at::ScalarType scalar, int64_t M,
                                 const Weight4bit& weight) {
  return choose({false, dtype, scalar, M, weight.N, weight.K}, weight, Caller::LoraBackward);
}

bool cpu_lora_backward_without_base_uses_blas(DType dtype, int64_t M) {
  run_core([] { (void)cpu_isa(); });  // a bad FOURBIT_DISABLE_AMX/_AVX2 is a ValueError here
  const Mode mode = read_mode();
  const bool blas = dtype != DType::Float16 &&
                    (mode == Mode::Fused || mode == Mode::Blas ? mode == Mode::Blas
                                                               : static_rule(M, dtype));
  State& st = state();
  std::lock_guard<std::mutex> lock(st.mu);
  st.last_lora_backward = blas ? "blas" : "fused";
  return blas;
}

int64_t cpu_matmul_cache_clear() {
  State& st = state();
  std::lock_guard<std::mutex> lock(st.mu);
  const std::string prefix = machine_prefix();
  for (auto it = st.choices.begin(); it != st.choices.end();) {
    it = it->first.rfind(prefix, 0) == 0 ? st.choices.erase(it) : std::next(it);
  }
  const std::string path = cache_path();
  auto entries = read_cache(path);
  int64_t dropped = 0;
  for (auto it = entries.begin(); it != entries.end();) {
    if (it->first.rfind(prefix, 0) == 0) {
      it = entries.erase(it);
      ++dropped;
    } else {
      ++it;
    }
  }
  if (dropped > 0) {
    st.warned_write = false;
    write_cache(path, entries, st);  // a temporary file renamed over the old one
    CHECK_ARG(!st.warned_write, "could not rewrite the CPU matmul cache '", path, "'");
  }
  return dropped;
}

std::string cpu_matmul_info_json() {
  const Mode mode = read_mode();
  State& st = state();
  std::lock_guard<std::mutex> lock(st.mu);
  std::ostringstream os;
  os << "{\"isa\": " << json_string(to_string(cpu_isa()))
     << ", \"amx_hardware\": " << (cpu_has_amx_hardware() ? "true" : "false")
     << ", \"cpu\": " << json_string(cpu_model_name()) << ", \"threads\": " << at::get_num_threads()
     << ", \"mode\": " << json_string(mode_name(mode)) << ", \"machine_key\": "
     << json_string(machine_key()) << ", \"cache_file\": " << json_string(cache_path())
     << ", \"static_blas_min_rows\": " << static_min_rows(DType::BFloat16)
     << ", \"auto_blas_min_rows\": " << kCpuBlasMinRows << ", \"measurements\": " << st.measurements
     << ", \"provisional\": " << st.provisional << ", \"loadavg\": " << read_loadavg()
     << ", \"cores\": " << online_cores()
     << ", \"last\": {\"forward\": " << json_string(st.last_forward)
     << ", \"grad_input\": " << json_string(st.last_grad_input)
     << ", \"lora_forward\": " << json_string(st.last_lora_forward)
     << ", \"lora_backward\": " << json_string(st.last_lora_backward) << "}, \"choices\": {";
  bool first = true;
  for (const auto& [key, ch] : st.choices) {
    const std::string cls = key.substr(key.find("||") + 2);
    os << (first ? "" : ", ") << json_string(cls) << ": {\"path\": "
       << json_string(ch.blas ? "blas" : "fused") << ", \"source\": " << json_string(ch.source)
       << ", \"fused_ms\": " << ch.fused_ms << ", \"blas_ms\": " << ch.blas_ms
       << ", \"probe_ms\": " << ch.probe_ms
       << ", \"wait_share\": " << ch.wait_share << ", \"fused_spread\": " << ch.fused_spread
       << ", \"blas_spread\": " << ch.blas_spread
       << ", \"provisional\": " << (ch.provisional ? "true" : "false")
       << ", \"untrusted\": " << json_string(ch.untrusted) << "}";
    first = false;
  }
  os << "}}";
  return os.str();
}

}  // namespace binding
}  // namespace fourbit

TORCH_LIBRARY_FRAGMENT(fourbit, m) {
  m.def("cpu_matmul_info() -> str", [] { return fourbit::binding::cpu_matmul_info_json(); });
  m.def("cpu_matmul_cache_clear() -> int",
        [] { return fourbit::binding::cpu_matmul_cache_clear(); });
}
