#!/usr/bin/env bash
# The whole GPU check in one device call: build for the card, run the CUDA tests (and the
# rest of the suite), run compute-sanitizer on the CUDA kernels, and run the benchmarks
# side by side with bitsandbytes. Logs and JSON go to $OUT (default ./gpu_out).
#
# On the lent GPU machine (no network): carry a bitsandbytes wheel in .whl/ (see
# docs/BENCHMARKS.md for the pip download line) and run `bash scripts/gpu_check.sh`.
#
# STAGES picks the parts (default: all): "tests" (pytest), "sanitizer" (compute-sanitizer),
# "bench" (the benchmarks). The build always runs and is incremental, so where one
# call is limited in time (the device tool: 10 minutes), run it as two calls on the warm
# machine: STAGES="tests sanitizer", then STAGES=bench.
set -uo pipefail
cd "$(dirname "$0")/.."
STAGES=${STAGES:-"tests sanitizer bench"}
want() { [[ " $STAGES " == *" $1 "* ]]; }
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
status=0
step() { echo; echo "== $*" | tee -a "$OUT/summary.txt"; }

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
if FOURBIT_CUDA=ON FOURBIT_CUDA_ARCHS=$cap "$PY" -m pip install -v --no-build-isolation --no-deps . >"$OUT/build.log" 2>&1; then
  echo "built for sm_$cap" | tee -a "$OUT/summary.txt"
else
  echo "BUILD FAILED (see build.log)" | tee -a "$OUT/summary.txt"; tail -n 30 "$OUT/build.log"; exit 1
fi

if want tests; then
step "pytest (CUDA tests and the rest)"
"$PY" -m pytest tests/python -q -rs -p no:cacheprovider >"$OUT/pytest.log" 2>&1 || status=1
tail -n 5 "$OUT/pytest.log" | tee -a "$OUT/summary.txt"

step "pytest: the CUDA LoRA op (core kernels at small M, cuBLAS path at M = 1500)"
"$PY" -m pytest tests/python/test_lora_op.py -q -rs -p no:cacheprovider -k cuda >"$OUT/pytest_lora.log" 2>&1 || status=1
tail -n 3 "$OUT/pytest_lora.log" | tee -a "$OUT/summary.txt"
fi

if want sanitizer; then
step "compute-sanitizer memcheck on the CUDA kernels"
if command -v compute-sanitizer >/dev/null 2>&1; then
  # The quantize kernels (all but the 2^24-element, torch.compile and opcheck cases, which
  # only repeat the same kernels more slowly); the matmul kernels on every algo for one
  # format (memcheck slows kernels ~100x, so not the whole dtype x format grid).
  timeout 420 compute-sanitizer --tool memcheck --error-exitcode 9 \
    "$PY" -m pytest tests/python/test_cuda.py tests/python/test_matmul.py -q -x -p no:cacheprovider \
    -k "(not test_matmul or test_cuda_one_hot or (test_cuda_matches_reference and bfloat16 and nf4 and nested)) and not large and not compile and not opcheck" \
    >"$OUT/sanitizer.log" 2>&1
  rc=$?; [ $rc -ne 0 ] && status=1
  echo "memcheck exit code $rc" | tee -a "$OUT/summary.txt"; grep -E "ERROR SUMMARY|passed|failed" "$OUT/sanitizer.log" | tail -n 3 | tee -a "$OUT/summary.txt"
  # The LoRA adapter kernels (cuda/lora_4bit.cu): one dtype x format, every shape.
  timeout 300 compute-sanitizer --tool memcheck --error-exitcode 9 \
    "$PY" -m pytest tests/python/test_lora_op.py -q -x -p no:cacheprovider \
    -k "test_cuda_forward_and_backward_match_reference and bfloat16 and nf4 and nested" \
    >"$OUT/sanitizer_lora.log" 2>&1
  rc=$?; [ $rc -ne 0 ] && status=1
  echo "memcheck (LoRA) exit code $rc" | tee -a "$OUT/summary.txt"; grep -E "ERROR SUMMARY|passed|failed" "$OUT/sanitizer_lora.log" | tail -n 3 | tee -a "$OUT/summary.txt"
else
  echo "compute-sanitizer not found" | tee -a "$OUT/summary.txt"
fi
fi

if want bench; then
step "benchmark: AdamW step (fourbit 32/8-bit, paged, evicted) vs bitsandbytes and torch fused"
"$PY" benchmarks/bench_optim.py --device cuda --json "$OUT/bench_optim.json" >"$OUT/bench_optim.md" 2>&1 || status=1
cat "$OUT/bench_optim.md"

step "benchmark: quantize / dequantize vs bitsandbytes"
"$PY" benchmarks/bench_quant.py --device cuda --json "$OUT/bench_quant.json" >"$OUT/bench_quant.md" 2>&1 || status=1
cat "$OUT/bench_quant.md"

step "benchmark: 4-bit matmul vs bitsandbytes vs torch bf16 (and each fourbit kernel)"
"$PY" benchmarks/bench_matmul.py --device cuda --algos --json "$OUT/bench_matmul.json" \
  >"$OUT/bench_matmul.md" 2>"$OUT/bench_matmul.log" || status=1
cat "$OUT/bench_matmul.md"

step "benchmark: LoRA layer fwd+bwd, r=16, M=4096: fourbit vs bitsandbytes+PEFT vs bf16+PEFT"
"$PY" benchmarks/bench_lora.py --device cuda --ms 512 4096 --json "$OUT/bench_lora.json" \
  >"$OUT/bench_lora.md" 2>"$OUT/bench_lora.log" || status=1
cat "$OUT/bench_lora.md"
fi

exit $status
