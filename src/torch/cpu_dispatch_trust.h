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

// What a measurement saw: each path's timed repetitions (seconds); the time the process's
// threads spent runnable but waiting for a core (the kernel's run_delay, summed over
// /proc/self/task/*/schedstat; negative: unknown) and the wall time over the timed
// repetitions; the threads the kernels ran on; the 1-minute load average and the online
// cores (a negative load: unknown).
struct MeasurementStats {
  std::vector<double> fused_s, blas_s;
  double wait_s = -1, wall_s = 0;
  int threads = 1;
  double loadavg = -1;
  int cores = 1;
};

// The bounds are ratios of the measurement with itself, not timings of one CPU:
// a path's repetitions, alternated with the other path's on the same probe, agree within a
// few percent on a quiet machine (docs/BENCHMARKS.md: about 5% run to run); more than
// kTrustMaxSpread (max/min) means something else ran in between.
constexpr double kTrustMaxSpread = 1.25;
// A thread that waits on the run queue had work but no core: on a quiet machine the wait is
// near 0; with the cores shared among twice as many runnable threads, about half the time.
// Above kTrustMaxWaitShare of wall x threads, other processes held the cores. (Run-queue
// wait rather than CPU time / wall: a kernel thread that sleeps because it has no work
// costs neither, so a small probe on many threads is not held against the measurement.)
constexpr double kTrustMaxWaitShare = 0.25;

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
// the process's threads waited for a core more than kTrustMaxWaitShare of wall x threads,
// or a path's repetitions spread by more than kTrustMaxSpread. Reasons are joined with "; ".
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
  const double share = s.wait_s >= 0 && s.wall_s > 0 && s.threads > 0
                            ? s.wait_s / (s.wall_s * s.threads)
                            : 0.0;
  if (share > kTrustMaxWaitShare) {
    add("threads waited for a core " + trust_format(share) + " x wall x " +
        std::to_string(s.threads) + " threads (other processes held the cores)");
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
