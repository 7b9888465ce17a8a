"""``fourbit merge``: equal to PEFT's merge_and_unload on a small model (float32 and bf16
bases, sharded), peak resident memory about one tensor on a model many times larger than the
bound the test sets (measured in the process with the kernel's high-water mark), and bad
inputs that name the problem and leave no destination."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
fbt = pytest.importorskip("fourbit.integrations.transformers")

import fourbit  # noqa: E402
from _cli_helpers import run, save_tiny_llama  # noqa: E402
from fourbit.cli.adapter import save_adapter  # noqa: E402


def make_adapter(base_dir, out_dir, r=4, alpha=8.0, targets=None, seed=1):
    """A random (non-zero B) adapter on the 4-bit model of base_dir, saved in PEFT's format."""
    model = fbt.from_pretrained(base_dir, load_in_4bit=True, bnb_4bit_quant_type="nf4")
    torch.manual_seed(seed)
    fourbit.nn.add_lora(model, target_modules=targets, r=r, lora_alpha=alpha, init_lora_weights=False)
    out_dir.mkdir(parents=True)
    save_adapter(model, out_dir, r=r, lora_alpha=alpha, lora_dropout=0.0, base_model=str(base_dir),
                 task_type="CAUSAL_LM")
    return out_dir


def merged_state(path):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_equals_peft_merge_and_unload(tmp_path, dtype):
    base = tmp_path / "base"
    save_tiny_llama(base, dtype=dtype, max_shard_size="50KB")
    adapter = make_adapter(base, tmp_path / "adapter")
    out = run("merge", base, adapter, tmp_path / "merged").output
    assert "merged 14 LoRA layers" in out and "peak RSS" in out
    ours = merged_state(tmp_path / "merged")
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    theirs = peft.PeftModel.from_pretrained(ref_model, adapter).merge_and_unload().state_dict()
    original = merged_state(base)
    assert sorted(ours) == sorted(original)
    changed = [k for k in ours if not torch.equal(ours[k], original[k])]
    assert len(changed) == 14 and all("proj" in k for k in changed)
    for k, v in ours.items():
        assert v.dtype == dtype
        tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(v, theirs[k], **tol)
    index = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(ours)
    # the merged checkpoint loads in transformers as a plain float model
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")


def test_merge_peak_memory_is_one_shard_plus_one_layer_at_most(tmp_path):
    """A 108 MB float32 model in 8 MB shards whose largest tensor is 4 MiB. The data the merge
    may hold is the issue's bound, one shard plus one layer (8 + 2 x 4 MiB = 16 MiB); the limit
    adds 8 MiB for what the process allocates besides (malloc arenas of torch's worker threads,
    code pages touched for the first time), which measured 4-12.5 MiB on a quiet machine and up
    to 18.6 MiB in all under a load of 8 on 2 cores. The model is 4.5 times the limit: a merge
    that held it, or even a quarter of it, fails. The peak resident memory is measured in the
    process with the kernel's high-water mark."""
    config = transformers.LlamaConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=6,
                                      num_attention_heads=8, num_key_value_heads=8, vocab_size=2048,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "base", max_shard_size="8MB")
    adapter = make_adapter(tmp_path / "base", tmp_path / "adapter", r=8)
    report = tmp_path / "report.json"
    run("merge", tmp_path / "base", adapter, tmp_path / "merged", "--json", report)
    rep = json.loads(report.read_text())
    allowance = 8 * 2**20  # the process's own transient allocations, see above
    limit = 8 * 2**20 + 2 * (2048 * 512 * 4) + allowance
    assert rep["model_bytes"] > 4 * limit and rep["shards"] >= 12 and rep["merged_layers"] == 42
    assert rep["peak_rss_bytes"] is not None, "needs Linux /proc/self/clear_refs"
    print(f"merge peak RSS {rep['peak_rss_bytes'] / 2**20:.2f} MiB, model {rep['model_bytes'] / 2**20:.1f} MiB")
    assert rep["peak_rss_bytes"] < limit, f"peak {rep['peak_rss_bytes'] / 2**20:.1f} MiB >= {limit / 2**20} MiB"


def test_bad_inputs(tmp_path):
    base = tmp_path / "base"
    save_tiny_llama(base)
    adapter = make_adapter(base, tmp_path / "adapter", targets=["q_proj"])
    assert "not a directory" in run("merge", tmp_path / "nope", adapter, tmp_path / "d", expect=3).output
    assert "adapter_config.json" in run("merge", base, base, tmp_path / "d", expect=3).output
    # an adapter for another model: the layer it names is not in BASE
    other = tmp_path / "other"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128)).save_pretrained(other)
    big = make_adapter(other, tmp_path / "big", targets=["q_proj"])
    assert "model.layers.2.self_attn.q_proj" in run("merge", base, big, tmp_path / "d", expect=3).output
    # wrong shapes
    wide = tmp_path / "wide"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128)).save_pretrained(wide)
    assert "B @ A" in run("merge", wide, adapter, tmp_path / "d", expect=3).output
    (adapter / "adapter_config.json").write_text("{not json")
    assert "malformed JSON" in run("merge", base, adapter, tmp_path / "d", expect=3).output
    assert not (tmp_path / "d").exists() and not list(tmp_path.glob(".d.partial-*"))
    quantized = tmp_path / "q"
    run("quantize", base, quantized, "--no-progress")
    good = make_adapter(base, tmp_path / "good")
    assert "quantized" in run("merge", quantized, good, tmp_path / "d", expect=3).output
    (tmp_path / "d").mkdir()
    assert "--overwrite" in run("merge", base, good, tmp_path / "d", expect=6).output
