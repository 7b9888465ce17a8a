"""Low-memory loading of an FSDP2 model from rank 0 (``load_from_rank0``), 2 gloo ranks.

Every rank builds the model on the meta device, prepares and shards it; rank 0 streams a
safetensors checkpoint (float weights as transformers saves them, sharded with an index; or
a bitsandbytes-format 4-bit checkpoint). Checked against the same model quantized in one
process: the 4-bit bytes bit for bit, every other tensor exactly, the forward output exactly.
Peak memory: each rank's RSS high-water mark over the load (``VmHWM`` after resetting it via
``/proc/self/clear_refs``) may exceed its start by at most its own shards + 3 x the largest
checkpoint tensor + 8 MiB for allocator noise (seen up to +8 MiB on a loaded 2-core machine);
the model is more than 3x that bound. Bad checkpoints raise on every rank, naming the key or
the file.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from fourbit.cli._common import _status_kib
from fourbit.integrations.distributed import flat_layout, prepare_fsdp
from fourbit.nn import Linear4bit, LoraLinear4bit

from _dist_helpers import full, spawn

TIMEOUT = 120
MiB = 1 << 20
NOISE = 8 * MiB
BIG = dict(vocab=1024, d=1024, hidden=2048, n=8)  # 16 fp32 linears of 8 MiB: a 132 MiB checkpoint
SMALL = dict(vocab=64, d=35, hidden=33, n=2)


def _layer(d_in, d_out, i, device):
    """Even blocks: uint8 storage, double quantization; odd: bf16 storage, fp32 absmax."""
    base = Linear4bit(d_in, d_out, bias=True, quant_type="nf4", compress_statistics=i % 2 == 0,
                      quant_storage=torch.uint8 if i % 2 == 0 else torch.bfloat16, device=device)
    return LoraLinear4bit(base, r=4, lora_alpha=8, init_lora_weights=False)


class Block(nn.Module):
    def __init__(self, d, hidden, i, device):
        super().__init__()
        self.up, self.down = _layer(d, hidden, i, device), _layer(hidden, d, i, device)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


class Stack(nn.Module):
    def __init__(self, vocab, d, hidden, n, device=None):
        super().__init__()
        self.embed = nn.Embedding(vocab, d, device=device)
        self.blocks = nn.ModuleList([Block(d, hidden, i, device) for i in range(n)])
        self.norm = nn.LayerNorm(d, device=device)
        # real even when the parameters are on meta, and not in the checkpoint (as rotary
        # frequencies): the loader must keep it
        self.register_buffer("scale", torch.full((d,), 0.5), persistent=False)

    def forward(self, ids):
        x = self.embed(ids)
        for b in self.blocks:
            x = b(x)
        return self.norm(x) * self.scale


def _float_model(cfg):
    torch.manual_seed(0)
    return Stack(**cfg)


def _quantized(cfg):
    """The reference: the float model quantized in one process."""
    net = _float_model(cfg)
    for m in net.modules():
        if isinstance(m, Linear4bit):
            m.quantize()
    return net


def _save(sd, path, files):
    """``sd`` as a transformers-style checkpoint: one file, or ``files`` shards + index."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    sd = {k: v.detach().as_subclass(torch.Tensor).contiguous() for k, v in sd.items()}
    if files == 1:
        save_file(sd, os.path.join(path, "model.safetensors"))
        return
    names = [f"model-{i + 1:05d}-of-{files:05d}.safetensors" for i in range(files)]
    weight_map = {k: names[i * files // len(sd)] for i, k in enumerate(sd)}
    for name in names:
        save_file({k: v for k, v in sd.items() if weight_map[k] == name}, os.path.join(path, name))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def _base_keys(sd):
    """A base-model checkpoint's names: ``x.weight`` for a LoRA layer's ``x.base_layer.weight``."""
    return {k.replace(".base_layer.", "."): v for k, v in sd.items()}


def _sharded_meta(cfg, ws):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    net = prepare_fsdp(Stack(**cfg, device="meta"))
    mesh = init_device_mesh("cpu", (ws,))
    for b in net.blocks:
        fully_shard(b, mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net


def _check_equal(net, ref, cfg, what):
    """Gathered tensors equal the reference's (4-bit: its flat bytes); same forward output."""
    ref_sd = ref.state_dict()
    for name, m in net.named_modules():
        if isinstance(m, Linear4bit):
            r = ref.get_submodule(name)
            assert torch.equal(full(m.weight), flat_layout(m).pack(r.weight)), f"{what}: {name} 4-bit bytes differ"
    for k, v in net.state_dict().items():
        if not k.endswith("base_layer.weight"):
            assert torch.equal(full(v), ref_sd[k]), f"{what}: {k} differs"
    ids = torch.randint(0, cfg["vocab"], (2, 5), generator=torch.Generator().manual_seed(3))
    assert torch.equal(net(ids), ref(ids)), f"{what}: forward output differs"


def _load_worker(rank, ws, tmp):
    import torch.distributed as dist
    from fourbit.integrations.rank0_load import load_from_rank0
    net = _sharded_meta(BIG, ws)
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = _status_kib("VmRSS") * 1024
    report = load_from_rank0(net, f"{tmp}/float")
    peak = _status_kib("VmHWM") * 1024 - start
    assert report == {"loaded": len(net.state_dict()), "quantized": 16, "packed": 0, "skipped": []}, report
    own = sum(v.to_local().numel() * v.element_size() for v in net.state_dict().values())
    largest = BIG["d"] * BIG["hidden"] * 4
    model_bytes = sum(os.path.getsize(os.path.join(f"{tmp}/float", n)) for n in os.listdir(f"{tmp}/float"))
    bound = own + 3 * largest + NOISE
    with open(f"{tmp}/peak_rank{rank}.txt", "w") as f:
        f.write(f"{peak} {own} {largest} {model_bytes}\n")
    assert model_bytes > 3 * bound, "the test model is too small to tell streaming from loading it all"
    assert peak <= bound, (f"rank {rank}: peak RSS +{peak / MiB:.1f} MiB while loading, over its shards "
                           f"{own / MiB:.1f} MiB + 3 x {largest / MiB:.0f} MiB + {NOISE / MiB:.0f} MiB")
    _check_equal(net, _quantized(BIG), BIG, "float checkpoint")
    del net
    # an already-4-bit bitsandbytes-format checkpoint (one file): its bytes taken unchanged
    small = _sharded_meta(SMALL, ws)
    report = load_from_rank0(small, f"{tmp}/bnb")
    assert report["packed"] == 4 and report["quantized"] == 0, report
    _check_equal(small, _quantized(SMALL), SMALL, "bnb checkpoint")


def test_load_from_rank0_streams_and_matches(tmp_path):
    """A 132 MiB float checkpoint in 3 shards: each rank ends with its shards of the model
    quantized in one process (bit for bit) and peaks at about one tensor above them."""
    _save(_base_keys(_float_model(BIG).state_dict()), str(tmp_path / "float"), files=3)
    _save(_quantized(SMALL).state_dict(), str(tmp_path / "bnb"), files=1)
    spawn(_load_worker, 2, tmp_path, TIMEOUT)
    for rank in range(2):
        peak, own, largest, model_bytes = map(int, open(tmp_path / f"peak_rank{rank}.txt").read().split())
        print(f"rank {rank}: peak +{peak / MiB:.1f} MiB (own shards {own / MiB:.1f} MiB, largest tensor "
              f"{largest / MiB:.0f} MiB, checkpoint {model_bytes / MiB:.0f} MiB)")


def _bad_worker(rank, ws, tmp):
    from fourbit.integrations.rank0_load import load_from_rank0
    cases = [("missing", KeyError, r"blocks\.1\.down\.base_layer\.weight: not in the checkpoint"),
             ("shape", ValueError, r"blocks\.0\.up\.lora_A\.weight in .*model\.safetensors: shape \[4, 36\], "
                                   r"but the model's blocks\.0\.up\.lora_A\.weight is \[4, 35\]"),
             ("noshard", FileNotFoundError, r"model-00002-of-00002\.safetensors: named in "
                                            r"model\.safetensors\.index\.json but missing"),
             ("nodir", FileNotFoundError, r"checkpoint directory .*nodir' does not exist"),
             # found while streaming (not from the headers): still raised on every rank
             ("blocksize", ValueError, r"blocks\.0\.up\.base_layer\.weight \(from blocks\.0\.up\.base_layer\.weight\)"
                                       r": ValueError: .*blocksize.*\(\(33, 35\), 128, 'nf4', True, torch\.uint8\), but the "
                                       r"model's .* expects \(\(33, 35\), 64, ")]
    for name, exc, match in cases:
        net = _sharded_meta(SMALL, ws)
        with pytest.raises(exc, match=match):  # on every rank, not only the reader
            load_from_rank0(net, f"{tmp}/{name}")
    net = _sharded_meta(SMALL, ws)
    report = load_from_rank0(net, f"{tmp}/missing", missing_ok=lambda k: k == "blocks.1.down.base_layer.weight")
    assert report["skipped"] == ["blocks.1.down.base_layer.weight"], report


def test_load_from_rank0_bad_checkpoints(tmp_path):
    sd = _base_keys(_float_model(SMALL).state_dict())
    _save({k: v for k, v in sd.items() if k != "blocks.1.down.weight"}, str(tmp_path / "missing"), files=1)
    _save({**sd, "blocks.0.up.lora_A.weight": torch.zeros(4, 36)}, str(tmp_path / "shape"), files=1)
    _save(sd, str(tmp_path / "noshard"), files=2)
    os.remove(tmp_path / "noshard" / "model-00002-of-00002.safetensors")
    ref = _float_model(SMALL)
    for m in ref.modules():
        if isinstance(m, Linear4bit):
            m.weight.blocksize = 128
            m.quantize()
    _save(ref.state_dict(), str(tmp_path / "blocksize"), files=1)
    spawn(_bad_worker, 2, tmp_path, TIMEOUT)


def test_load_from_rank0_rejects_bad_calls():
    from fourbit.integrations.rank0_load import load_from_rank0
    with pytest.raises(ValueError, match="model must be a torch.nn.Module, got str"):
        load_from_rank0("model", "ckpt")
    with pytest.raises(ValueError, match=r"^0: a Linear4bit not prepared for FSDP; call prepare_fsdp"):
        load_from_rank0(nn.Sequential(Linear4bit(8, 4, device="meta")), "ckpt")
    with pytest.raises(RuntimeError, match="needs an initialised process group"):
        load_from_rank0(nn.Linear(2, 2), "ckpt")
