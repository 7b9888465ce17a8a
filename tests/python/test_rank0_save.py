"""Saving an FSDP2-sharded QLoRA model from rank 0 (``fourbit.integrations.rank0_save``), 2 gloo ranks.

A tiny seeded Llama (odd sizes: vocabulary 67 and hidden 35, so embeddings, norms and LoRA
B matrices have a dim 0 that 2 ranks do not divide) is quantized with ``replace_linear``,
given PEFT LoRA adapters, ``prepare_fsdp``-ed and sharded over 2 ranks. Checked against
the same model saved in one process:
- ``save_adapter``: the files of PEFT's ``save_pretrained`` byte for byte, and
  ``PeftModel.from_pretrained`` on them gives the trained model's logits exactly;
- ``save_quantized``: the files of ``fourbit.integrations.transformers.save_pretrained`` byte
  for byte (uint8 storage with double quantization, bf16 storage without; one file and
  several shards), and transformers' loader (fourbit's) reads them back to the same logits;
- rank 0's peak RSS while exporting (``VmHWM`` after resetting it via ``/proc/self/clear_refs``)
  stays within 3 x the largest tensor + 2 x ``max_shard_size`` + 8 MiB of allocator noise
  (the all-gather's buffers, the layer's pieces, the shard being filled and safetensors'
  copy of it), less than a third of the checkpoint;
- bad calls raise on every rank, naming the argument, and leave an existing checkpoint as it was.
"""

from __future__ import annotations

import filecmp
import importlib.util
import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

import fourbit  # noqa: E402
import fourbit.integrations.peft  # noqa: E402,F401  (PEFT's LoRA on fourbit layers)
from fourbit.cli._common import _status_kib  # noqa: E402
from fourbit.integrations.distributed import prepare_fsdp  # noqa: E402

from _dist_helpers import spawn  # noqa: E402

TIMEOUT = 120
MiB = 1 << 20
NOISE = 8 * MiB
TINY = dict(vocab=67, hidden=35, inter=45, layers=2, heads=5, kv_heads=1, head_dim=8)
BIG = dict(vocab=256, hidden=512, inter=2048, layers=20, heads=4, kv_heads=2, head_dim=128)  # a 40 MiB 4-bit checkpoint


def _llama(cfg, storage=torch.uint8, nested=True, seed=0):
    """The seeded float Llama, its linears (not lm_head) quantized to NF4 with ``storage``."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["inter"],
                         num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                         num_key_value_heads=cfg["kv_heads"], head_dim=cfg["head_dim"],
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    return fourbit.replace_linear(model, quant_type="nf4", compress_statistics=nested,
                                  compute_dtype=torch.float32, quant_storage=storage)


def _lora(model, seed=1):
    """PEFT LoRA on every 4-bit linear, with non-zero B (as after training)."""
    from peft import LoraConfig, get_peft_model
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return peft_model


def _shard(model, ws):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    prepare_fsdp(model)
    mesh = init_device_mesh("cpu", (ws,))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _ids(cfg):
    return torch.randint(0, cfg["vocab"], (2, 7), generator=torch.Generator().manual_seed(3))


def _same_files(got, want):
    """The same file names, every file byte for byte; but PEFT's adapter_config.json lists
    ``target_modules``, a Python set, in string-hash order, which differs between any two
    processes (PEFT's own saves too): there, the same JSON with that list as a set."""
    names = sorted(os.listdir(want))
    assert sorted(os.listdir(got)) == names, f"{got}: files {sorted(os.listdir(got))}, expected {names}"
    for name in names:
        a, b = os.path.join(got, name), os.path.join(want, name)
        if name == "adapter_config.json":
            ca, cb = json.load(open(a)), json.load(open(b))
            assert set(ca.pop("target_modules")) == set(cb.pop("target_modules")), f"{name}: target_modules differ"
            assert ca == cb, f"{name} differs"
            continue
        assert filecmp.cmp(a, b, shallow=False), f"{name} differs"


# ---------------------------------------------------------------------------------------- adapter
def _adapter_worker(rank, ws, tmp):
    from fourbit.integrations.rank0_save import save_adapter
    model = _shard(_lora(_llama(TINY)), ws)
    report = save_adapter(model, f"{tmp}/adapter")
    assert report["tensors"] == 2 * 7 * TINY["layers"], report  # A and B of 7 linears per layer
    assert "adapter_model.safetensors" in report["files"] and "adapter_config.json" in report["files"], report
    with open(f"{tmp}/logits_rank{rank}.pt", "wb") as f:  # the sharded model's own output
        torch.save(model(input_ids=_ids(TINY)).logits.detach(), f)


def test_save_adapter_matches_peft(tmp_path):
    """2-rank save_adapter == PEFT's save_pretrained of the unsharded model, file for file;
    PeftModel.from_pretrained on it reproduces the sharded model's logits."""
    from peft import PeftModel
    spawn(_adapter_worker, 2, tmp_path, TIMEOUT)
    _lora(_llama(TINY)).save_pretrained(str(tmp_path / "reference"))
    _same_files(str(tmp_path / "adapter"), str(tmp_path / "reference"))
    loaded = PeftModel.from_pretrained(_llama(TINY), str(tmp_path / "adapter")).eval()
    logits = loaded(input_ids=_ids(TINY)).logits
    for rank in range(2):
        assert torch.equal(logits, torch.load(tmp_path / f"logits_rank{rank}.pt")), f"rank {rank}: logits differ"


# ---------------------------------------------------------------------------------------- 4-bit export
CASES = {"uint8": dict(storage=torch.uint8, nested=True, max_shard_size="50GB"),
         "bf16": dict(storage=torch.bfloat16, nested=False, max_shard_size=5000)}  # 5 files: the 9 KiB embedding alone


def _export_worker(rank, ws, tmp):
    from fourbit.integrations.rank0_save import save_quantized
    for name, case in CASES.items():
        model = _shard(_lora(_llama(TINY, case["storage"], case["nested"])), ws)
        report = save_quantized(model, f"{tmp}/{name}", max_shard_size=case["max_shard_size"])
        assert report["quantized"] == 7 * TINY["layers"], report


def test_save_quantized_matches_single_process(tmp_path):
    """2-rank save_quantized of a LoRA-wrapped sharded model == the one-process
    save_pretrained of the same quantized model (no LoRA), file for file: uint8 storage +
    double quantization in one file, bf16 storage in several shards + index. fourbit's
    transformers loader reads the export back to the quantized model's logits, and so does
    transformers + bitsandbytes where bitsandbytes is installed (to 1e-4 of the largest)."""
    from fourbit.integrations.transformers import from_pretrained, save_pretrained
    spawn(_export_worker, 2, tmp_path, TIMEOUT)
    for name, case in CASES.items():
        ref = _llama(TINY, case["storage"], case["nested"])
        save_pretrained(ref, str(tmp_path / f"{name}_reference"), max_shard_size=case["max_shard_size"])
        _same_files(str(tmp_path / name), str(tmp_path / f"{name}_reference"))
        shards = [f for f in os.listdir(tmp_path / name) if f.endswith(".safetensors")]
        assert len(shards) == (1 if name == "uint8" else 5), shards
        loaded = from_pretrained(str(tmp_path / name))
        expected = ref(input_ids=_ids(TINY)).logits
        assert torch.equal(loaded(input_ids=_ids(TINY)).logits, expected), name
        if importlib.util.find_spec("bitsandbytes") is not None:  # where installed: its own loader too
            from transformers import AutoModelForCausalLM
            bnb = AutoModelForCausalLM.from_pretrained(str(tmp_path / name), device_map="cpu")
            assert type(bnb.model.layers[0].self_attn.q_proj).__module__.startswith("bitsandbytes"), name
            # same dequantized weights; the matmuls sum in another order
            err = (bnb(input_ids=_ids(TINY)).logits.float() - expected).abs().max().item()
            assert err <= 1e-4 * expected.abs().max().item(), f"{name}: bitsandbytes' logits differ by {err}"


def _memory_worker(rank, ws, tmp, shard_size):
    import torch.distributed as dist
    from fourbit.integrations.rank0_save import save_quantized
    from fourbit.integrations.transformers import from_pretrained
    model = _shard(_lora(from_pretrained(f"{tmp}/quantized")), ws)
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = _status_kib("VmRSS") * 1024
    save_quantized(model, f"{tmp}/export", max_shard_size=shard_size)
    peak = _status_kib("VmHWM") * 1024 - start
    with open(f"{tmp}/peak_rank{rank}.txt", "w") as f:
        f.write(f"{peak}\n")


def test_save_quantized_peak_memory(tmp_path):
    """Rank 0 holds one gathered layer and one output shard, not the model: its RSS peak
    while exporting a 40 MiB checkpoint in 1 MiB shards is bounded by 3 x the largest tensor +
    2 x the shard size + 8 MiB; the export equals the one-process save file for file."""
    from fourbit.integrations.transformers import from_pretrained, save_pretrained
    from safetensors import safe_open
    shard_size = 1 * MiB
    save_pretrained(_llama(BIG), str(tmp_path / "quantized"), max_shard_size=shard_size)
    # the reference: what one process saves of the model the workers load
    save_pretrained(from_pretrained(str(tmp_path / "quantized")), str(tmp_path / "reference"),
                    max_shard_size=shard_size)
    ckpt = sum(os.path.getsize(tmp_path / "reference" / n) for n in os.listdir(tmp_path / "reference"))
    largest = 0
    for name in os.listdir(tmp_path / "reference"):
        if name.endswith(".safetensors"):
            with safe_open(str(tmp_path / "reference" / name), framework="pt") as f:
                for k in f.keys():
                    t = f.get_slice(k)
                    n = 1
                    for d in t.get_shape():
                        n *= d
                    largest = max(largest, n * {"U8": 1, "BF16": 2, "F16": 2, "F32": 4}[t.get_dtype()])
    bound = 3 * largest + 2 * shard_size + NOISE
    assert ckpt > 3 * bound, f"the test model ({ckpt / MiB:.1f} MiB) is too small to tell streaming from gathering"
    spawn(_memory_worker, 2, tmp_path, TIMEOUT, shard_size)
    _same_files(str(tmp_path / "export"), str(tmp_path / "reference"))
    peaks = [int(open(tmp_path / f"peak_rank{r}.txt").read()) for r in range(2)]
    print(f"export of {ckpt / MiB:.1f} MiB in {shard_size / MiB:.0f} MiB shards: rank 0 peak +{peaks[0] / MiB:.1f} "
          f"MiB, rank 1 +{peaks[1] / MiB:.1f} MiB (bound {bound / MiB:.1f} MiB, largest tensor "
          f"{largest / MiB:.2f} MiB)")
    assert peaks[0] <= bound, f"rank 0: peak RSS +{peaks[0] / MiB:.1f} MiB while exporting, over {bound / MiB:.1f} MiB"


# ---------------------------------------------------------------------------------------- errors
def _errors_worker(rank, ws, tmp):
    from fourbit.integrations.rank0_save import save_adapter, save_quantized
    model = _shard(_lora(_llama(TINY)), ws)
    for save in (save_adapter, save_quantized):
        with pytest.raises(NotADirectoryError, match=r"out_dir '.*/a_file' is a file, not a directory"):
            save(model, f"{tmp}/a_file")  # on every rank: rank 0 checks, the others wait for its answer
        with pytest.raises(NotADirectoryError,
                           match=r"out_dir '.*/a_file/sub': '.*/a_file' is a file, not a directory"):
            save(model, f"{tmp}/a_file/sub")
        with pytest.raises(PermissionError, match=r"out_dir '/sys/fourbit_out': cannot write in '/sys' "
                                                  r"\(Operation not permitted\)"):  # sysfs: read-only, even for root
            save(model, "/sys/fourbit_out")
    with pytest.raises(ValueError, match=r"max_shard_size must be a number of bytes or a size such as '5GB', "
                                         r"got '12 parsecs'"):
        save_quantized(model, f"{tmp}/never", max_shard_size="12 parsecs")
    with pytest.raises(ValueError, match=r"is_main_process=False: save_adapter sets is_main_process itself"):
        save_adapter(model, f"{tmp}/never", is_main_process=False)
    with pytest.raises(ValueError, match=r"selected_adapters=\['other'\]: 'other' is not an adapter of model"):
        save_adapter(model, f"{tmp}/never", selected_adapters=["other"])
    # a failure while writing (rank 0's disk, simulated): the previous export stays as it was
    save_quantized(model, f"{tmp}/existing", max_shard_size=20_000)
    before = {n: open(f"{tmp}/existing/{n}", "rb").read() for n in os.listdir(f"{tmp}/existing")}
    import safetensors.torch
    save_file = safetensors.torch.save_file
    if rank == 0:
        def full_disk(*args, **kwargs):
            raise OSError(28, "No space left on device")
        safetensors.torch.save_file = full_disk
    try:
        with pytest.raises(OSError, match=r"^model\.\S+: \[Errno 28\] No space left on device"):
            save_quantized(model, f"{tmp}/existing", max_shard_size=20_000)
    finally:
        safetensors.torch.save_file = save_file
    assert {n: open(f"{tmp}/existing/{n}", "rb").read() for n in os.listdir(f"{tmp}/existing")} == before
    assert not [n for n in os.listdir(tmp) if ".partial-" in n], os.listdir(tmp)
    # a successful save over it: one file now; the old shards and index go, other files stay
    torch.distributed.barrier()  # every rank has checked the directory above before rank 0 adds a file to it
    if rank == 0:
        with open(f"{tmp}/existing/tokenizer.json", "w") as f:
            f.write("{}")
    report = save_quantized(model, f"{tmp}/existing")
    assert sorted(os.listdir(f"{tmp}/existing")) == ["config.json", "generation_config.json", "model.safetensors",
                                                      "tokenizer.json"], os.listdir(f"{tmp}/existing")
    assert report["files"] == ["config.json", "generation_config.json", "model.safetensors"], report
    # rank 0's model not prepared: every rank raises rank 0's error
    model = _lora(_llama(TINY)) if rank == 0 else prepare_fsdp(_lora(_llama(TINY)))
    with pytest.raises(ValueError, match=r"base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.base_layer: a "
                                         r"Linear4bit not prepared for FSDP; call .*prepare_fsdp"):
        save_quantized(model, f"{tmp}/never")
    assert not os.path.exists(f"{tmp}/never")


def test_rank0_save_errors(tmp_path):
    """Bad out_dir (a file, under a file, unwritable), bad arguments, a disk that fails
    mid-export and a model rank 0 has not prepared: the same error on both ranks (no hang),
    naming the argument and value; an existing export is left untouched, no partial files.
    A successful export over an existing one replaces its weight files and keeps the rest."""
    (tmp_path / "a_file").write_text("not a directory")
    spawn(_errors_worker, 2, tmp_path, TIMEOUT)


def test_save_quantized_tied_embeddings_one_process(tmp_path):
    """Without a process group (one process, prepared but not sharded), a model whose lm_head
    is tied to the embedding: the tied name left out as transformers leaves it out, files equal."""
    from fourbit.integrations.rank0_save import save_quantized
    from fourbit.integrations.transformers import save_pretrained

    def tied():
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=67, hidden_size=35, intermediate_size=45, num_hidden_layers=2,
                             num_attention_heads=5, num_key_value_heads=1, head_dim=8, tie_word_embeddings=True)
        return fourbit.replace_linear(LlamaForCausalLM(config).eval(), quant_type="nf4", compute_dtype=torch.float32)
    save_pretrained(tied(), str(tmp_path / "reference"), max_shard_size=5000)
    report = save_quantized(prepare_fsdp(_lora(tied())), str(tmp_path / "export"), max_shard_size=5000)
    assert report["tensors"] == 20 and report["quantized"] == 14, report  # no lm_head.weight
    _same_files(str(tmp_path / "export"), str(tmp_path / "reference"))


def test_rank0_save_rejects_bad_models():
    """Without a process group (one process): wrong model types named."""
    from fourbit.integrations.rank0_save import save_adapter, save_quantized
    with pytest.raises(ValueError, match="model must be a peft.PeftModel .*got Linear"):
        save_adapter(torch.nn.Linear(2, 2), "unused")
    with pytest.raises(ValueError, match="model must be a torch.nn.Module, got str"):
        save_quantized("model", "unused")
    with pytest.raises(ValueError, match="model must be a transformers PreTrainedModel .*got Sequential"):
        save_quantized(torch.nn.Sequential(torch.nn.Linear(2, 2)), "unused")
