"""``fourbit estimate``: the memory model against the H100 anchors (../shared/anchors,
docs/BENCHMARKS.md), its items, and the command's output, --gpu-mem and bad inputs."""

import json

import pytest

from _cli_helpers import run, tiny_llama_config  # noqa: E402
from fourbit.cli.estimate import GiB, estimate, load_shape  # noqa: E402

# (model, batch, seq, measured peak GiB: torch.cuda.max_memory_allocated), H100 80GB, 2026-11-23:
# LoRA r=16 on all seven projections, gradient checkpointing, bitsandbytes PagedAdamW8bit, bf16.
ANCHORS = [("llama-3.1-8b", 1, 512, 6.566), ("llama-3.1-8b", 4, 512, 9.557), ("llama-3.1-8b", 1, 2048, 9.558),
           ("llama-3.1-8b", 8, 1024, 21.518), ("llama-3-70b", 1, 512, 39.438)]


@pytest.mark.parametrize("model,batch,seq,measured", ANCHORS)
def test_predicts_the_anchors_within_10_percent(model, batch, seq, measured):
    est = estimate(load_shape(model), batch=batch, seq=seq, r=16)
    predicted = est["peak_allocated_bytes"] / GiB
    assert abs(predicted / measured - 1) < 0.10, f"{model} {batch}x{seq}: {predicted:.2f} vs {measured} GiB"


def test_items_count_what_they_say():
    est = estimate(load_shape("llama-3.1-8b"), batch=1, seq=512, r=16)
    assert est["lora_parameters"] == 41943040  # the anchor's trainable parameter count
    items = est["items"]
    # measured: 5.467 GiB allocated after building the 4-bit model with LoRA (before any step)
    static = sum(items[k] for k in ("4-bit weights", "quantization state",
                                    "float params (embeddings, norms, lm_head)", "LoRA parameters"))
    assert abs(static / GiB - 5.467) < 0.01
    no_ckpt = estimate(load_shape("llama-3.1-8b"), batch=4, seq=512, r=16, grad_ckpt=False)
    assert no_ckpt["peak_allocated_bytes"] > est["peak_allocated_bytes"] + 4 * GiB
    fewer = estimate(load_shape("llama-3.1-8b"), batch=1, seq=512, r=16, targets=("q_proj", "v_proj"))
    assert fewer["lora_parameters"] == 32 * 16 * (4096 + 4096 + 4096 + 1024)


def test_command_table_json_and_fit(tmp_path):
    out = run("estimate", "llama-3.1-8b", "--batch", "4", "--seq", "512").output
    assert "4-bit weights" in out and "logits" in out and "fits (nominal memory)" in out and "9.52" in out
    data = json.loads(run("estimate", "llama-3-70b", "--json").output)
    assert abs(data["peak_allocated_bytes"] / GiB - 39.16) < 0.01 and data["fits"] is None
    assert "does not fit" in run("estimate", "llama-3-70b", "--gpu-mem", "24", expect=4).output
    run("estimate", "llama-3-70b", "--gpu-mem", "80")
    tiny_llama_config().to_json_file(tmp_path / "config.json")
    data = json.loads(run("estimate", tmp_path, "--json", "--r", "4").output)
    assert data["lora_parameters"] == 2 * 4 * (64 * 2 + 64 + 32 + 64 + 32 + 64 * 2 + 2 * (64 + 128) + 128 + 64)


def test_bad_inputs(tmp_path):
    assert "known family" in run("estimate", "gpt-17", expect=3).output
    (tmp_path / "config.json").write_text("{broken")
    assert "malformed JSON" in run("estimate", tmp_path, expect=3).output
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    assert "'bert'" in run("estimate", tmp_path, expect=3).output
    assert "not projections" in run("estimate", "llama-3.1-8b", "--targets", "q_proj,lm_head", expect=2).output
    run("estimate", "llama-3.1-8b", "--batch", "0", expect=2)


@pytest.mark.parametrize("vocab,batch,seq", [(32000, 2, 256)])
def test_predicts_a_measured_cpu_step_within_10_percent(tmp_path, vocab, batch, seq):
    """A tiny Llama (4 layers, hidden 256) trained on the CPU as on the GPU (NF4 nested, bf16,
    LoRA r=16 on all seven projections, checkpointing, 8-bit AdamW): the estimate for
    device="cpu" against the measured peak (tests/python/_cpu_step_memory.py)."""
    import os
    import subprocess
    import sys

    transformers = pytest.importorskip("transformers")
    import torch

    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                      tie_word_embeddings=False, max_position_embeddings=2048)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path)
    script = os.path.join(os.path.dirname(__file__), "_cpu_step_memory.py")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, script, str(tmp_path), str(batch), str(seq)], env=env, check=True,
                         capture_output=True, text=True, timeout=600).stdout
    measured = json.loads(out.strip().splitlines()[-1])["measured_bytes"]
    est = estimate(load_shape(str(tmp_path)), batch=batch, seq=seq, r=16, optim="adamw_8bit", device="cpu")
    predicted = est["peak_allocated_bytes"]
    print(f"vocab {vocab}, {batch}x{seq}: predicted {predicted / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB")
    assert abs(predicted / measured - 1) < 0.10, f"predicted {predicted / 2**20:.1f} vs measured {measured / 2**20:.1f} MiB"
