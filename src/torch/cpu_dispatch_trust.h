// Whether one CPU matmul measurement (src/torch/cpu_dispatch.cpp) can be trusted enough to
// be cached for good: a plain host function, no torch, so tests/cpp/test_cpu_dispatch_trust.cpp
// checks the rule directly. The rule and why: docs/kernels.md, "CPU dispatch".
#pragma once

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

namespace fourbit {
namespace binding {

// What a measurement saw: each path's timed repetitions (seconds), the process's CPU time
// (all its threads) and the wall time over the timed repetitions, the threads the kernels
// ran on, the 1-minute load average and the online cores (a negative load: unknown).
struct MeasurementStats {
  std::vector<double> fused_s, blas_s;
  double cpu_s = 0, wall_s = 0;
  int threads = 1;
  double loadavg = -1;
  int cores = 1;
};

// The bounds are ratios of the measurement with itself, not timings of one CPU:
// a path's repetitions, alternated with the other path's on the same probe, agree within a
// few percent on a quiet machine (docs/BENCHMARKS.md: about 5% run to run); more than
// kTrustMaxSpread (max/min) means something else ran in between.
constexpr double kTrustMaxSpread = 1.25;
// The kernels keep `threads` threads busy (OpenMP workers spin while they wait), so CPU time
// is about wall x threads; below kTrustMinCpuShare of that, other processes held the cores.
constexpr double kTrustMinCpuShare = 0.5;

struct Trust {
  bool trusted = true;
  std::string reason;  // empty when trusted; else why, for the log and cpu_matmul_info
};

inline std::string trust_format(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.3g", v);
  return buf;
}

// Untrusted if any of: the machine is oversubscribed (load average above the online cores),
// the process got less than kTrustMinCpuShare of wall x threads of CPU time, or a path's
// repetitions spread by more than kTrustMaxSpread. Reasons are joined with "; ".
inline Trust judge_measurement(const MeasurementStats& s) {
  Trust t;
  auto add = [&t](const std::string& why) {
    t.trusted = false;
    t.reason += (t.reason.empty() ? "" : "; ") + why;
  };
  if (s.loadavg >= 0 && s.cores > 0 && s.loadavg > s.cores) {
    add("load average " + trust_format(s.loadavg) + " above the " + std::to_string(s.cores) +
        " online cores");
  }
  const double share = s.wall_s > 0 && s.threads > 0 ? s.cpu_s / (s.wall_s * s.threads) : 1.0;
  if (share < kTrustMinCpuShare) {
    add("CPU time " + trust_format(share) + " x wall x " + std::to_string(s.threads) +
        " threads (other processes held the cores)");
  }
  for (const auto* reps : {&s.fused_s, &s.blas_s}) {
    if (reps->empty()) continue;
    const auto [lo, hi] = std::minmax_element(reps->begin(), reps->end());
    if (*lo <= 0 || *hi / *lo > kTrustMaxSpread) {
      add(std::string(reps == &s.fused_s ? "fused" : "blas") + " repetitions spread " +
          (*lo > 0 ? trust_format(*hi / *lo) : std::string("inf")) + "x (max/min)");
    }
  }
  return t;
}

}  // namespace binding
}  // namespace fourbit
