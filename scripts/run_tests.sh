#!/usr/bin/env bash
# Sets up, then runs every test: the C++ core under GoogleTest (plain and under
# AddressSanitizer + UBSan), the CUDA kernel lint (where nvcc is), the libFuzzer target, the
# installed-package consumer examples (the C++ QLoRA trainer with its Python check), and pytest (the hypothesis fuzzers among it).
# Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
JOBS=${JOBS:-$(nproc)}

echo "== C++ core and torch API: build + ctest (CPU kernels; fourbit::torch against Python's fixtures; its file readers again under ASan + UBSan)"
cmake -S . -B build-ci/cpu -G Ninja -DFOURBIT_CUDA=OFF -DFOURBIT_BUILD_TORCH=ON -DCMAKE_BUILD_TYPE=Release \
  -DFOURBIT_SANITIZE_TORCH_IO=address,undefined >/dev/null
cmake --build build-ci/cpu -j "$JOBS"
ctest --test-dir build-ci/cpu --output-on-failure

echo "== CUDA kernel lint: ptxas -v and SASS for sm_80 and sm_90a (scripts/kernel_lint.py)"
if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then
  "$PY" scripts/kernel_lint.py --jobs "$JOBS"
else
  echo "kernel lint: no nvcc on this machine, not run"
fi

echo "== C++ core: ctest under AddressSanitizer + UndefinedBehaviorSanitizer (portable path, no AVX2, AVX-512 or AMX)"
cmake -S . -B build-ci/asan -G Ninja -DFOURBIT_CUDA=OFF -DCMAKE_BUILD_TYPE=Debug \
  -DFOURBIT_SANITIZE=address,undefined >/dev/null
cmake --build build-ci/asan -j "$JOBS"
FOURBIT_DISABLE_AVX2=1 FOURBIT_DISABLE_AVX512=1 FOURBIT_DISABLE_AMX=1 ctest --test-dir build-ci/asan --output-on-failure
echo "== C++ core: the 4-bit kernels' suites again, on the AVX2 class (where the CPU has AVX2; no AVX-512 or AMX)"
FOURBIT_DISABLE_AVX512=1 FOURBIT_DISABLE_AMX=1 ctest --test-dir build-ci/asan --output-on-failure \
  -R 'GemmGrid|Gemm4bit\.|LoraGrid|Lora4bit\.|Dequantize4bit\.|TilePath\.|CpuIsa\.|CpuFeatures\.'
echo "== C++ core: the same, with the AVX-512 kernels (where the CPU has them)"
ctest --test-dir build-ci/asan --output-on-failure

echo "== C++ core: libFuzzer over validation and parsing, under ASan + UBSan (${FUZZ_SECONDS:=60} s)"
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
# clang with libFuzzer, its sanitizer runtimes and OpenMP, for the fuzz target (tests/fuzz);
# installed here rather than in setup.sh, which the main job shares.
if ! command -v clang++ >/dev/null 2>&1; then
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q clang
fi
clang_major=$(clang++ -dumpversion | cut -d. -f1)
if ! [ -d "/usr/lib/llvm-$clang_major/lib/clang" ] || ! ls /usr/lib/llvm-"$clang_major"/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a >/dev/null 2>&1 \
   || ! [ -e "/usr/lib/llvm-$clang_major/lib/libomp.so" ]; then
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q "libclang-rt-$clang_major-dev" "libomp-$clang_major-dev"
fi

CXX=clang++ cmake -S . -B build-ci/fuzz -G Ninja -DFOURBIT_CUDA=OFF -DFOURBIT_BUILD_TESTS=OFF \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DFOURBIT_BUILD_FUZZERS=ON \
  -DFOURBIT_SANITIZE=address,undefined,fuzzer-no-link >/dev/null
cmake --build build-ci/fuzz -j "$JOBS"
mkdir -p build-ci/fuzz/corpus build-ci/fuzz/findings
UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 OMP_NUM_THREADS=1 ./build-ci/fuzz/tests/fuzz/fuzz_core \
  -max_total_time="$FUZZ_SECONDS" -max_len=4096 -rss_limit_mb=4096 -print_final_stats=1 \
  -artifact_prefix=build-ci/fuzz/findings/ build-ci/fuzz/corpus 2>&1 | { grep -v -E "^#[0-9]+ +(NEW|REDUCE|pulse)|NEW_FUNC" || true; }

echo "== C++ API: install the package, build examples/cpp against it with find_package(fourbit [COMPONENTS torch])"
rm -rf build-ci/prefix build-ci/consumer build-ci/train_lora build-ci/train_llama_lora
cmake --install build-ci/cpu --prefix build-ci/prefix >/dev/null
cmake -S examples/cpp -B build-ci/consumer -G Ninja -DCMAKE_PREFIX_PATH="$PWD/build-ci/prefix" \
  -DPython_EXECUTABLE="$(command -v "$PY")" -DFOURBIT_EXAMPLE_REQUIRE_TORCH=ON >/dev/null
cmake --build build-ci/consumer -j "$JOBS"
./build-ci/consumer/quantize_example
echo "== C++ QLoRA trainer: Python saves a 4-bit model (an MLP, then a transformers Llama), C++ trains LoRA on it, PEFT loads the adapter"
"$PY" examples/cpp/tiny_mlp.py save build-ci/train_lora/base
./build-ci/consumer/train_lora build-ci/train_lora/base build-ci/train_lora/adapter
"$PY" examples/cpp/tiny_mlp.py check build-ci/train_lora/base build-ci/train_lora/adapter
# The same on a transformers Llama (4-bit by transformers + bitsandbytes): C++ must reproduce the
# base logits, halve the loss in 40 steps, and PEFT's logits with its adapter must match (1e-4).
"$PY" examples/cpp/tiny_llama.py save build-ci/train_llama_lora/base
./build-ci/consumer/train_llama_lora build-ci/train_llama_lora/base build-ci/train_llama_lora/adapter 40 q_proj,v_proj
"$PY" examples/cpp/tiny_llama.py check build-ci/train_llama_lora/base build-ci/train_llama_lora/adapter --atol 1e-4

echo "== Python: pytest"
"$PY" -m pytest tests/python -v -rs
