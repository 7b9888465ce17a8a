// judge_measurement (src/torch/cpu_dispatch_trust.h): when one CPU matmul measurement is
// trusted enough to be cached, and the reason given when it is not.
#include <gtest/gtest.h>

#include "torch/cpu_dispatch_trust.h"

using fourbit::binding::judge_measurement;
using fourbit::binding::MeasurementStats;

namespace {

// A quiet measurement: repetitions within 3%, little run-queue wait, load below the cores.
MeasurementStats quiet() {
  MeasurementStats s;
  s.fused_s = {1.00e-3, 1.02e-3, 1.03e-3};
  s.blas_s = {2.00e-3, 2.01e-3, 2.05e-3};
  s.wall_s = 9.1e-3;
  s.threads = 4;
  s.wait_s = 0.01 * s.wall_s * s.threads;
  s.loadavg = 2.5;
  s.cores = 8;
  return s;
}

TEST(CpuDispatchTrust, QuietMeasurementIsTrusted) {
  const auto t = judge_measurement(quiet());
  EXPECT_TRUE(t.trusted);
  EXPECT_EQ(t.reason, "");
}

TEST(CpuDispatchTrust, LoadAboveTheCoresIsUntrusted) {
  auto s = quiet();
  s.loadavg = 8.5;
  const auto t = judge_measurement(s);
  EXPECT_FALSE(t.trusted);
  EXPECT_NE(t.reason.find("load average 8.5 above the 8 online cores"), std::string::npos)
      << t.reason;
  s.loadavg = 8.0;  // fully used, not oversubscribed
  EXPECT_TRUE(judge_measurement(s).trusted);
  s.loadavg = -1;  // unknown: not held against the measurement
  EXPECT_TRUE(judge_measurement(s).trusted);
}

TEST(CpuDispatchTrust, WaitingForACoreIsUntrusted) {
  auto s = quiet();
  s.wait_s = 0.4 * s.wall_s * s.threads;
  const auto t = judge_measurement(s);
  EXPECT_FALSE(t.trusted);
  EXPECT_NE(t.reason.find("threads waited for a core 0.4 x wall x 4 threads"), std::string::npos)
      << t.reason;
  s.wait_s = 0.25 * s.wall_s * s.threads;  // the bound itself is trusted
  EXPECT_TRUE(judge_measurement(s).trusted);
  s.wait_s = -1;  // unknown (no schedstat): not held against the measurement
  EXPECT_TRUE(judge_measurement(s).trusted);
}

TEST(CpuDispatchTrust, SpreadRepetitionsOfEitherPathAreUntrusted) {
  auto s = quiet();
  s.blas_s = {2.0e-3, 2.6e-3, 2.1e-3};
  auto t = judge_measurement(s);
  EXPECT_FALSE(t.trusted);
  EXPECT_NE(t.reason.find("blas repetitions spread 1.3x"), std::string::npos) << t.reason;
  s = quiet();
  s.fused_s = {1.0e-3, 1.0e-3, 1.3e-3};
  t = judge_measurement(s);
  EXPECT_FALSE(t.trusted);
  EXPECT_NE(t.reason.find("fused repetitions spread 1.3x"), std::string::npos) << t.reason;
  s.fused_s = {1.0e-3, 1.25e-3};  // the bound itself is trusted
  EXPECT_TRUE(judge_measurement(s).trusted);
  s.fused_s = {0.0, 1.0e-3};  // a zero time (clock too coarse) cannot be judged: untrusted
  EXPECT_FALSE(judge_measurement(s).trusted);
  s.fused_s = {0.0, 0.0};
  EXPECT_FALSE(judge_measurement(s).trusted);
}

TEST(CpuDispatchTrust, EveryReasonIsGiven) {
  auto s = quiet();
  s.loadavg = 20;
  s.wait_s = 0.9 * s.wall_s * s.threads;
  s.fused_s = {1e-3, 3e-3};
  const auto t = judge_measurement(s);
  EXPECT_FALSE(t.trusted);
  EXPECT_NE(t.reason.find("load average"), std::string::npos) << t.reason;
  EXPECT_NE(t.reason.find("; threads waited"), std::string::npos) << t.reason;
  EXPECT_NE(t.reason.find("; fused repetitions spread 3x"), std::string::npos) << t.reason;
}

}  // namespace
