#!/usr/bin/env bash
# The whole GPU check in ONE device call of at most 8 minutes: build for the card, the CUDA
# tests (every kernel against its CPU twin), compute-sanitizer on a short set, FSDP2 over a
# 1-rank NCCL group (tests/python/test_distributed.py -m nccl), and the benchmarks side by
# side with bitsandbytes and torch. Logs, JSON and summary.txt go to $OUT
# (default ./gpu_out).
#
# Every stage runs under its own `timeout` (seconds, below); the budgets add up to 455 s
# so the call ends inside 8 minutes even when a stage hangs, and whatever a stage wrote
# before its timeout stays in $OUT. A timed-out stage is reported as such and fails the run.
#
# On the lent GPU machine (no network): carry a bitsandbytes wheel in .whl/ (see
# docs/BENCHMARKS.md for the pip download line) and run `bash scripts/gpu_check.sh`.
# STAGES picks parts (default "tests sanitizer dist bench"; "cpp" builds the C++ torch API's
# GoogleTests and runs their Cuda* tests, docs/cpp.md); FULL=1 runs the whole pytest suite
# and the full benchmark grids instead of the short forms (that does not fit 8 minutes).
set -uo pipefail
cd "$(dirname "$0")/.."
STAGES=${STAGES:-"tests sanitizer dist bench"}
want() { [[ " $STAGES " == *" $1 "* ]]; }
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
FULL=${FULL:-0}
export PYTHONUNBUFFERED=1
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
status=0
step() { echo; echo "== $*" | tee -a "$OUT/summary.txt"; }
# run_for SECONDS LOG CMD...: runs CMD under a timeout, output to LOG; records the outcome.
run_for() {
  local budget=$1 log=$2; shift 2
  local t0=$SECONDS
  timeout --kill-after=10 "$budget" "$@" >"$log" 2>&1
  local rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    echo "TIMED OUT after ${budget}s: $*" | tee -a "$OUT/summary.txt"; status=1
  elif [ $rc -ne 0 ]; then
    echo "exit code $rc ($((SECONDS - t0))s): $*" | tee -a "$OUT/summary.txt"; status=1
  else
    echo "ok ($((SECONDS - t0))s)" | tee -a "$OUT/summary.txt"
  fi
  return $rc
}

# Budgets in seconds (sum 455 < 480). The matmul benchmark has its own: it is the full grid
# of issue 14 (4 Llama-8B shapes x M in {1..4096} x fwd / fwd+bwd x every kernel, --algos).
BUILD_S=165
TESTS_S=90
SANITIZER_S=40
DIST_S=25
BENCH_S=50          # quant, lora, optim: a third each
BENCH_MATMUL_S=85

step "environment"
{ nvidia-smi; nvcc --version; "$PY" -c "import torch; print('torch', torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"; } >"$OUT/env.txt" 2>&1
tail -n 3 "$OUT/env.txt"

# bitsandbytes (the reference) from carried wheels, when present.
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/fourbit_site .whl/*.whl \
    && export PYTHONPATH=/tmp/fourbit_site${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" -c "import bitsandbytes as b; print('bitsandbytes', b.__version__)" 2>&1 | tail -n 1 | tee -a "$OUT/summary.txt"

step "build for this card"
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d .)
[ "$cap" = "90" ] && cap=90a   # Hopper: arch-specific target (wgmma, setmaxnreg)
export FOURBIT_CUDA=ON FOURBIT_CUDA_ARCHS=$cap
if ! run_for $BUILD_S "$OUT/build.log" "$PY" -m pip install -v --no-build-isolation --no-deps .; then
  echo "BUILD FAILED for sm_$cap (see build.log)" | tee -a "$OUT/summary.txt"; tail -n 30 "$OUT/build.log"; exit 1
fi

if want tests; then
  step "pytest: the CUDA tests (each kernel against its CPU twin)"
  if [ "$FULL" = 1 ]; then sel=(-m "not nccl"); else sel=(-m "cuda and not nccl"); fi
  run_for $TESTS_S "$OUT/pytest.log" "$PY" -m pytest tests/python -q -rs -p no:cacheprovider "${sel[@]}"
  tail -n 5 "$OUT/pytest.log" | tee -a "$OUT/summary.txt"
fi

if want cpp; then  # not in the default STAGES: the extra build does not fit the 8-minute call with the rest
  step "C++ torch API (fourbit::torch): build its GoogleTests for this card, run the Cuda* tests"
  run_for 300 "$OUT/cpp.log" bash -c "cmake -S . -B build-gpu-cpp -G Ninja -DFOURBIT_CUDA=ON \
    -DFOURBIT_CUDA_ARCHS=$cap -DFOURBIT_BUILD_TORCH=ON >/dev/null \
    && cmake --build build-gpu-cpp --target test_torch_nn test_torch_optim \
    && ctest --test-dir build-gpu-cpp -R Cuda --output-on-failure --no-tests=error"
  tail -n 5 "$OUT/cpp.log" | tee -a "$OUT/summary.txt"
fi

if want sanitizer; then
  step "compute-sanitizer memcheck: one dtype x format through every kernel family"
  if command -v compute-sanitizer >/dev/null 2>&1; then
    run_for $SANITIZER_S "$OUT/sanitizer.log" compute-sanitizer --tool memcheck --error-exitcode 9 \
      "$PY" -m pytest tests/python/test_cuda.py tests/python/test_matmul.py tests/python/test_lora_op.py \
      -q -x -p no:cacheprovider -m cuda \
      -k "bfloat16 and nf4 and not large and not compile and not opcheck"
    grep -E "ERROR SUMMARY|passed|failed" "$OUT/sanitizer.log" | tail -n 3 | tee -a "$OUT/summary.txt"
  else
    echo "compute-sanitizer not found" | tee -a "$OUT/summary.txt"
  fi
fi

if want dist; then
  step "FSDP2 on a 1-rank NCCL group: 4-bit bytes gathered intact, forward, paged 8-bit step"
  run_for $DIST_S "$OUT/dist.log" "$PY" -m pytest tests/python/test_distributed.py -q -rs -p no:cacheprovider -m nccl
  tail -n 3 "$OUT/dist.log" | tee -a "$OUT/summary.txt"
fi

if want bench; then
  # Short forms: decode (M = 1, 8) and one training M on two Llama-8B shapes, few reps.
  if [ "$FULL" = 1 ]; then short=(); qshort=(); lshort=(--ms 512 4096);
  else short=(--reps 10 --warmup 2); qshort=(--shapes small); lshort=(--ms 4096 --shapes q_proj); fi
  # bench NAME TITLE BUDGET ARGS...: one benchmark script under its budget (seconds).
  bench() {
    local name=$1 title=$2 budget=$3; shift 3
    step "benchmark: $title"
    run_for "$budget" "$OUT/bench_$name.log" "$PY" benchmarks/bench_$name.py --device cuda \
      "$@" "${short[@]}" --json "$OUT/bench_$name.json"
    tail -n 12 "$OUT/bench_$name.log"
  }
  bench quant "quantize / dequantize vs bitsandbytes" $((BENCH_S / 3)) "${qshort[@]}"
  # Every kernel (gemv, tensor_core, dequant_cublas, fused) vs bitsandbytes, torch bf16 and
  # dequantize + cuBLAS, M in {1, 8, 16, 32, 64, 128, 512, 4096}, fwd and fwd+bwd, one run.
  bench matmul "4-bit matmul: every kernel vs bitsandbytes vs torch bf16" $BENCH_MATMUL_S --algos
  bench lora "LoRA layer fwd+bwd vs bitsandbytes+PEFT vs bf16+PEFT" $((BENCH_S / 3)) "${lshort[@]}"
  bench optim "AdamW step vs bitsandbytes and torch fused" $((BENCH_S / 3))
fi

echo; echo "gpu_check: total ${SECONDS}s, status $status" | tee -a "$OUT/summary.txt"
exit $status
