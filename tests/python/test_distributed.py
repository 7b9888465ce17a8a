"""FSDP2 / DDP with fourbit's 4-bit layers, on the CPU with gloo (2 and 3 processes).

Every worker trains the same seeded QLoRA model two ways and compares them step by step:
the N-rank sharded run (each rank a slice of the global batch) against a 1-rank run on the
whole global batch. Tolerances (fp32 compute; the two runs differ only in how batch sums
and gradient reductions are ordered):
    loss, gradients, 32-bit optimizer states   rtol 1e-5 of the tensor's max magnitude
    forward outputs                            exact before the first step (the kernels compute
                                               rows independently), then rtol 1e-5
    parameters after each AdamW step           atol 1e-2 * lr
With a bf16 MixedPrecisionPolicy the reference is the same policy on a 1-rank FSDP group:
    loss rtol 1e-2, gradients rtol 5e-2 (bf16 sums in another order), parameters: max
    |diff| <= 2 * lr and mean |diff| <= 0.1 * lr (8-bit states are blockwise over each shard).
The frozen 4-bit weights are compared byte for byte after training.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fourbit
from fourbit.integrations.distributed import FlatLayout, flat_layout, prepare_fsdp, restore_params4bit
from fourbit.nn import Linear4bit, Params4bit

from _dist_helpers import assert_close, batches, full, make_net, spawn, trainable

LR = 1e-3
ROWS = 6  # global batch: divisible by 2 and 3 ranks
TIMEOUT = 150  # seconds per spawned group


def _mse(out, y):
    return ((out - y) ** 2).mean()


def _optimizer(kind, params):
    if kind == "adamw":
        return fourbit.optim.AdamW(params, lr=LR)
    if kind == "paged_adamw":
        return fourbit.optim.PagedAdamW(params, lr=LR)
    if kind == "adamw8bit":
        return fourbit.optim.AdamW8bit(params, lr=LR, min_8bit_size=0)
    if kind == "paged_adamw8bit":
        return fourbit.optim.PagedAdamW8bit(params, lr=LR, min_8bit_size=0)
    raise AssertionError(kind)


def _shard(net, mesh, **kw):
    from torch.distributed.fsdp import fully_shard
    prepare_fsdp(net)
    for block in net.blocks:
        fully_shard(block, mesh=mesh, **kw)
    fully_shard(net, mesh=mesh, **kw)
    return net


def _same_4bit_bytes(net, ref):
    """The sharded model's flat weights (gathered) hold exactly the reference's bytes."""
    for (name, m), r in zip(((n, m) for n, m in net.named_modules() if isinstance(m, Linear4bit)),
                            (m for m in ref.modules() if isinstance(m, Linear4bit))):
        layout = flat_layout(m)
        expected = layout.pack(r.weight) if isinstance(r.weight, Params4bit) else full(r.weight)
        assert torch.equal(full(m.weight), expected), f"{name}: 4-bit bytes changed"


def _train_and_compare(rank, ws, cfg, ref_mesh=None, steps=3):
    """One scenario: N-rank FSDP2 run vs the 1-rank run (plain model, or 1-rank FSDP2 when
    ``ref_mesh`` is given), loss / grads / params / optimizer states every step."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    shapes = cfg["shapes"]
    kw = dict(storage=cfg.get("storage", torch.uint8), nested=cfg.get("nested", True),
              nan_bytes=cfg.get("nan_bytes", False), checkpoint=cfg.get("checkpoint", False))
    fsdp_kw = dict(reshard_after_forward=cfg.get("reshard", True))
    if cfg.get("mp"):
        fsdp_kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cfg.get("offload"):
        fsdp_kw["offload_policy"] = CPUOffloadPolicy(pin_memory=False)
    net = _shard(make_net(*shapes, **kw), init_device_mesh("cpu", (ws,)), **fsdp_kw)
    ref = make_net(*shapes, **kw)
    ref_bytes = copy.deepcopy(ref)
    if ref_mesh is not None:
        ref = _shard(ref, ref_mesh, **fsdp_kw)
    opt, ref_opt = _optimizer(cfg["optim"], net.parameters()), _optimizer(cfg["optim"], ref.parameters())
    mp = bool(cfg.get("mp"))
    rtol_loss, rtol_grad = (1e-2, 5e-2) if mp else (1e-5, 1e-5)
    per_rank = ROWS // ws
    for step, (x, y) in enumerate(batches(steps, ROWS, shapes[0])):
        xl, yl = x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]
        out = net(xl)
        loss = _mse(out, yl)
        loss.backward()
        ref_out = ref(x)
        ref_loss = _mse(ref_out, y)
        ref_loss.backward()
        if not mp and step == 0:  # same parameters: the same rows, bit for bit
            assert torch.equal(out, ref_out[rank * per_rank:(rank + 1) * per_rank]), f"{cfg['name']}: forward differs"
        assert_close(out, ref_out[rank * per_rank:(rank + 1) * per_rank], rtol_loss, 0,
                     f"{cfg['name']} step {step}: forward")
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        assert_close(mean / ws, ref_loss, rtol_loss, 0, f"{cfg['name']} step {step}: loss")
        for (n, p), q in zip(trainable(net).items(), trainable(ref).values()):
            assert_close(full(p.grad), full(q.grad), rtol_grad, 1e-8, f"{cfg['name']} step {step}: grad of {n}")
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        for (n, p), q in zip(trainable(net).items(), trainable(ref).values()):
            a, b = full(p.detach()), full(q.detach())
            if mp:
                diff = (a - b).abs()
                assert diff.max() <= 2 * LR and diff.mean() <= 0.1 * LR, \
                    f"{cfg['name']} step {step}: {n} max {diff.max():.3g} mean {diff.mean():.3g}"
            else:
                assert_close(a, b, 0, 1e-2 * LR, f"{cfg['name']} step {step}: param {n}")
    if not mp and cfg["optim"] in ("adamw", "paged_adamw"):
        for (n, p), q in zip(trainable(net).items(), trainable(ref).values()):
            for key in ("state1", "state2"):
                assert_close(full(opt.state[p][key]), full(ref_opt.state[q][key]), 1e-4, 1e-12,
                             f"{cfg['name']}: optimizer {key} of {n}")
    _same_4bit_bytes(net, ref_bytes)


SCENARIOS = [
    # shapes (d, hidden): 64/128 divide the block count by 2 (not by 3); 35/33 divide nothing
    dict(name="uint8 nested, even shapes, AdamW", shapes=(64, 128), optim="adamw"),
    dict(name="bf16 NaN-pattern bytes, odd shapes, no reshard, checkpointing, PagedAdamW", shapes=(35, 33),
         storage=torch.bfloat16, nested=False, nan_bytes=True, reshard=False, checkpoint=True, optim="paged_adamw"),
    dict(name="CPU offload, checkpointing with reshard, odd shapes, bf16 storage nested", shapes=(35, 33),
         storage=torch.bfloat16, nan_bytes=True, offload=True, checkpoint=True, optim="adamw", steps=2),
]
MP_SCENARIO = dict(name="bf16 MixedPrecisionPolicy, AdamW8bit, NaN bytes", shapes=(35, 33), storage=torch.bfloat16,
                   nan_bytes=True, mp=True, optim="adamw8bit")


def _ddp_compare(rank, ws):
    """DDP over Params4bit weights (not prepared): bf16 NaN-pattern storage broadcast at init."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    net = DDP(make_net(35, 33, torch.bfloat16, nan_bytes=True))
    ref = make_net(35, 33, torch.bfloat16, nan_bytes=True)
    opt, ref_opt = _optimizer("adamw8bit", net.parameters()), _optimizer("adamw8bit", ref.parameters())
    per_rank = ROWS // ws
    for x, y in batches(2, ROWS, 35):
        _mse(net(x[rank * per_rank:(rank + 1) * per_rank]), y[rank * per_rank:(rank + 1) * per_rank]).backward()
        _mse(ref(x), y).backward()
        for (n, p), q in zip(trainable(net.module).items(), trainable(ref).values()):
            assert_close(p.grad, q.grad, 1e-5, 1e-8, f"DDP grad of {n}")
        opt.step(), ref_opt.step(), opt.zero_grad(), ref_opt.zero_grad()
    for (n, p), q in zip(trainable(net.module).items(), trainable(ref).values()):
        assert_close(p, q, 0, 1e-2 * LR, f"DDP param {n}")
    for a, b in zip(net.module.modules(), ref.modules()):
        if isinstance(a, Linear4bit):
            assert torch.equal(a.weight.data.view(torch.int16), b.weight.data.view(torch.int16))


def _low_memory_load(rank, ws):
    """Rank 0 builds and quantizes; the others build on meta and receive their shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    if rank == 0:
        net = make_net(35, 33, torch.bfloat16, nan_bytes=True)
        prepare_fsdp(net)
        full_sd = {k: v.clone() for k, v in net.state_dict().items()}
    else:
        net = make_net(35, 33, torch.bfloat16, device="meta")
        full_sd = {}
    net = _shard(net, init_device_mesh("cpu", (ws,)))
    if rank != 0:
        net.to_empty(device="cpu")
    set_model_state_dict(net, full_sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    with pytest.raises(RuntimeError, match="weight is still sharded"):  # a layer called outside its FSDP unit
        net.blocks[0].up.base_layer(torch.randn(2, 35))
    local = net.blocks[0].up.base_layer.weight.to_local()
    assert local.numel() <= -(-flat_layout(net.blocks[0].up.base_layer).nbytes // ws), "weight not sharded"
    ref = make_net(35, 33, torch.bfloat16, nan_bytes=True)
    x, _ = batches(1, ROWS, 35)[0]
    assert torch.equal(net(x), ref(x)), "a rank that loaded on meta computes another output"
    _same_4bit_bytes(net, ref)


def _fsdp_worker(rank, ws, tmp):
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    singles = [dist.new_group([r]) for r in range(ws)]  # every rank creates every group, in order
    for cfg in SCENARIOS:
        _train_and_compare(rank, ws, cfg, steps=cfg.get("steps", 3))
    _train_and_compare(rank, ws, MP_SCENARIO, ref_mesh=DeviceMesh.from_group(singles[rank], "cpu"))
    _low_memory_load(rank, ws)
    if ws == 2:
        _ddp_compare(rank, ws)


@pytest.mark.parametrize("world_size", [2, 3])
def test_fsdp_matches_single_rank(world_size, tmp_path):
    """FSDP2 on N ranks equals 1 rank: dividing and non-dividing shapes, uint8 and
    NaN-pattern bf16 storage, reshard_after_forward on/off, activation checkpointing, CPU
    offload, bf16 mixed precision, AdamW / PagedAdamW / AdamW8bit on DTensor shards,
    low-memory loading from rank 0, and (2 ranks) DDP."""
    spawn(_fsdp_worker, world_size, tmp_path, TIMEOUT)


# ---------------------------------------------------------------------- checkpoints
def _state(net, opt):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    return {"model": get_model_state_dict(net), "optim": get_optimizer_state_dict(net, opt)}


def _load(net, opt, path, group=None):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    sd = _state(net, opt)
    dcp.load(sd, checkpoint_id=path, process_group=group)
    set_model_state_dict(net, sd["model"])
    set_optimizer_state_dict(net, opt, sd["optim"])


def _steps(net, opt, data, rank, ws):
    per_rank = ROWS // ws
    for x, y in data:
        _mse(net(x[rank * per_rank:(rank + 1) * per_rank]), y[rank * per_rank:(rank + 1) * per_rank]).backward()
        opt.step()
        opt.zero_grad()


def _snapshot(net, opt):
    """Every trainable parameter and optimizer state as whole tensors (collectives)."""
    out = {}
    for n, p in trainable(net).items():
        out[n] = full(p.detach()).clone()
        for k, v in opt.state[p].items():
            if isinstance(v, torch.Tensor) and v.shape == p.shape:
                out[f"{n}/{k}"] = full(v).clone()
    return out


def _checkpoint_worker(rank, ws, tmp, optim):
    """Ranks 0-1 train 2 steps, save with DCP, train 2 more (uninterrupted); a fresh pair
    loads and trains the same 2 steps (resumed: equal bit for bit); then all 3 ranks load
    the 2-rank checkpoint (resharded) and train the same 2 steps (equal within tolerance)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    pair = dist.new_group([0, 1])
    path = f"{tmp}/ckpt"
    data = batches(4, ROWS, 35)
    shapes = dict(storage=torch.bfloat16, nested=True, nan_bytes=True)
    saved = after = None
    if rank < 2:
        mesh = DeviceMesh.from_group(pair, "cpu")
        net = _shard(make_net(35, 33, **shapes), mesh)
        opt = _optimizer(optim, net.parameters())
        _steps(net, opt, data[:2], rank, 2)
        dcp.save(_state(net, opt), checkpoint_id=path, process_group=pair)
        saved = _snapshot(net, opt)
        _steps(net, opt, data[2:], rank, 2)
        after = _snapshot(net, opt)
        # resumed on the same 2 ranks: a fresh model (other seed) and optimizer
        net2 = _shard(make_net(35, 33, seed=7, **shapes), mesh)
        opt2 = _optimizer(optim, net2.parameters())
        _load(net2, opt2, path, pair)
        assert all(torch.equal(v, saved[k]) for k, v in _snapshot(net2, opt2).items())
        _steps(net2, opt2, data[2:], rank, 2)
        resumed = _snapshot(net2, opt2)
        assert resumed.keys() == after.keys()
        for k in after:
            assert torch.equal(resumed[k], after[k]), f"{optim}: resumed {k} differs from the uninterrupted run"
    dist.barrier()
    # resharded onto 3 ranks
    net3 = _shard(make_net(35, 33, seed=7, **shapes), init_device_mesh("cpu", (ws,)))
    opt3 = _optimizer(optim, net3.parameters())
    _load(net3, opt3, path)
    loaded = _snapshot(net3, opt3)
    objs = [saved, after]
    dist.broadcast_object_list(objs, src=0)
    saved, after = objs
    for k, v in loaded.items():
        if k.endswith("state1") or k.endswith("state2"):
            if v.dtype == torch.uint8:
                continue  # 8-bit codes were re-blocked over 3 shards; compared through training below
        assert torch.equal(v, saved[k]), f"{optim}: {k} changed when resharded 2 -> 3"
    _steps(net3, opt3, data[2:], rank, ws)
    for k, v in _snapshot(net3, opt3).items():
        if "/" not in k:
            assert_close(v, after[k], 0, 1e-2 * LR if "8bit" not in optim else 2 * LR, f"{optim}: 3-rank {k}")


@pytest.mark.parametrize("optim", ["adamw", "paged_adamw8bit"])
def test_checkpoint_reshard_resume(optim, tmp_path):
    """DCP save on 2 ranks; resume on 2 equals the uninterrupted run bit for bit (also the
    paged 8-bit optimizer: bitsandbytes #782/#1381); load on 3 ranks reshards exactly."""
    spawn(_checkpoint_worker, 3, tmp_path, TIMEOUT, optim)


# ---------------------------------------------------------------------- accelerate
def _accelerate_worker(rank, ws, tmp):
    """accelerate's own FSDP2 preparation (what ``Accelerator.prepare`` runs under an FSDP2
    config: auto-wrap by class name, bf16 policy, cpu_ram_efficient_loading where only rank 0
    holds real weights) on a prepare_fsdp-ed model. Accelerate refuses FSDP on CPU-only
    machines, so the test calls that function with the plugin and the few accelerator
    attributes it reads."""
    from types import SimpleNamespace
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            transformer_cls_names_to_wrap=["Block"], reshard_after_forward=True,
                                            cpu_ram_efficient_loading=True, mixed_precision_policy="bf16")
    acc = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=None, mixed_precision="bf16",
                          is_main_process=rank == 0, device=torch.device("cpu"), parallelism_config=None)
    # rank 1 starts from other weights: it must end with rank 0's
    net = prepare_fsdp(make_net(35, 33, torch.bfloat16, nan_bytes=True, seed=0 if rank == 0 else 5))
    net = fsdp2_prepare_model(acc, net)
    ref = make_net(35, 33, torch.bfloat16, nan_bytes=True)
    assert type(net.blocks[0]).__name__ == "FSDPBlock"
    _same_4bit_bytes(net, ref)
    for (n, p), q in zip(trainable(net).items(), trainable(ref).values()):
        assert torch.equal(full(p.detach()), q.detach()), f"{n} not loaded from rank 0"
    x, y = batches(1, ROWS, 35)[0]
    out = net(x[rank * 3:(rank + 1) * 3])
    assert_close(out, ref(x)[rank * 3:(rank + 1) * 3], 2e-2, 0, "bf16 forward vs fp32 reference")
    opt = fourbit.optim.PagedAdamW8bit(net.parameters(), lr=LR, min_8bit_size=0)
    _mse(out, y[rank * 3:(rank + 1) * 3]).backward()
    opt.step()


def test_accelerate_fsdp2_prepare(tmp_path):
    pytest.importorskip("accelerate")
    spawn(_accelerate_worker, 2, tmp_path, TIMEOUT)


def _aborted_in_teardown(run, last_line: str) -> bool:
    """True when a torchrun run did all its work (`last_line` printed, after its final
    collective) and a rank then aborted at process teardown with libstdc++'s
    "terminate called without an active exception" (a joinable std::thread destroyed). Seen
    once in CI (2026-12-05, rank 0, --low-memory), not in 100 runs of the same command here
    since; fourbit's C++ starts no std::thread, so it is a teardown race below us (torch,
    gloo). The test reruns once on exactly this signature; any other failure, or the same
    one twice, fails."""
    return (run.returncode != 0 and last_line in run.stdout
            and "terminate called without an active exception" in run.stderr)


@pytest.mark.parametrize("low_memory", [False, True])
def test_torchrun_example(tmp_path, low_memory):
    """examples/fsdp_qlora.py under torchrun (2 CPU ranks, gloo): PEFT LoRA on a 4-bit Llama,
    prepare_fsdp, fully_shard, PagedAdamW8bit steps, DCP save and reload, the adapter saved;
    with --low-memory the model is built on meta and rank 0 streams a saved float checkpoint
    (load_from_rank0), and the 4-bit model is exported (--export-4bit)."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.join(root, "examples", "fsdp_qlora.py"), "--steps", "2", "--layers", "2", "--hidden", "128",
           "--out", str(tmp_path / "ckpt")] + (["--low-memory", "--export-4bit", "--max-shard-size", "200KB"]
                                                if low_memory else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env)
    last_line = "exported the 4-bit model" if low_memory else "saved the adapter"
    if _aborted_in_teardown(run, last_line):  # not fourbit's: see _aborted_in_teardown; twice fails
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = run.stdout
    assert "step 1: loss" in lines and "saved and reloaded" in lines, lines
    # 2 layers x 7 linears x (A, B); PEFT's files
    assert "saved the adapter (28 tensors: README.md, adapter_config.json, adapter_model.safetensors)" in lines, lines
    assert os.path.isfile(tmp_path / "ckpt" / "adapter" / "adapter_model.safetensors")
    if low_memory:  # 2 layers x (7 linears + 2 norms), embedding, final norm, head; 28 LoRA tensors
        assert "loaded 21 tensors (14 quantized)" in lines and "28 LoRA tensors initialised" in lines, lines
        assert "exported the 4-bit model (21 tensors, 14 4-bit, " in lines, lines
        assert os.path.isfile(tmp_path / "ckpt" / "nf4" / "model.safetensors.index.json")
    for rank in (0, 1):
        whole, here = [int(w) for w in lines.split(f"rank {rank}: 4-bit weights ")[1].split()[::3][:2]]
        assert here <= -(-whole // 2) + 64, f"rank {rank} holds {here} of {whole} bytes"


# ---------------------------------------------------------------------- single process
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
@pytest.mark.parametrize("nested", [True, False])
def test_prepare_and_restore_roundtrip(storage, nested):
    """prepare_fsdp keeps the output exactly; restore_params4bit gives back bitsandbytes'
    state_dict bytes; a meta-built layer gets the same layout as the quantized one."""
    net = make_net(35, 33, storage, nested, nan_bytes=storage == torch.bfloat16)
    x = torch.randn(4, 35)
    y = net(x)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    prepare_fsdp(net)
    assert all(type(m.weight) is torch.nn.Parameter and m.weight.dtype == torch.uint8
               for m in net.modules() if isinstance(m, Linear4bit))
    assert torch.equal(net(x), y)
    restore_params4bit(net)
    after = net.state_dict()
    assert sorted(before) == sorted(after)
    for k in before:
        assert torch.equal(before[k].view(torch.uint8) if before[k].dtype == torch.bfloat16 else before[k],
                           after[k].view(torch.uint8) if after[k].dtype == torch.bfloat16 else after[k]), k
    meta = make_net(35, 33, storage, nested, device="meta")
    for a, b in zip((m for m in meta.modules() if isinstance(m, Linear4bit)),
                    (m for m in net.modules() if isinstance(m, Linear4bit))):
        assert FlatLayout.of(a) == FlatLayout.of(b)


def test_chunk_and_split_keep_params4bit():
    """bitsandbytes #1424: torch.chunk / torch.split of a Params4bit give Params4bit pieces
    carrying its QuantState."""
    w = Params4bit(torch.randn(35, 33), quant_type="nf4", quant_storage=torch.bfloat16).quantize()
    for pieces in (torch.chunk(w, 3), torch.split(w, 100)):
        assert all(isinstance(p, Params4bit) and p.quant_state is w.quant_state for p in pieces)
        assert torch.equal(torch.cat([p.data for p in pieces]).view(torch.int16), w.data.view(torch.int16))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="model must be a torch.nn.Module, got int"):
        prepare_fsdp(3)
    net = torch.nn.Sequential(Linear4bit(8, 4))
    with pytest.raises(ValueError, match=r"^0: weight is not quantized"):
        prepare_fsdp(net)
    with pytest.raises(ValueError, match="shape must be the 2-D weight shape"):
        FlatLayout.build((8,), torch.float32, 64, "nf4", torch.uint8, True)
    with pytest.raises(ValueError, match="blocksize must be one of"):
        FlatLayout.build((8, 8), torch.float32, 48, "nf4", torch.uint8, True)
    meta = prepare_fsdp(torch.nn.Sequential(Linear4bit(8, 4, device="meta")))
    with pytest.raises(ValueError, match="0: its flat weight is on meta"):
        restore_params4bit(meta)
    layer = prepare_fsdp(torch.nn.Sequential(Linear4bit(64, 4, quant_type="nf4").quantize()))[0]
    bnb_sd = Linear4bit(64, 4, quant_type="nf4").quantize().state_dict()
    with pytest.raises(RuntimeError, match="prepared for FSDP"):
        layer.load_state_dict(bnb_sd)
    layer._parameters["weight"] = torch.nn.Parameter(torch.zeros(5, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(RuntimeError, match=r"flat uint8 \[\d+\] parameter, got torch.uint8 \[5\]"):
        layer(torch.randn(2, 64))


def test_optimizer_rejects_bad_sharded_state():
    p = torch.nn.Parameter(torch.randn(300))
    opt = fourbit.optim.AdamW8bit([p], min_8bit_size=0)
    p.grad = torch.randn(300)
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["qbits"] = 4
    with pytest.raises(ValueError, match="qbits of parameter 0 must be 8"):
        opt.load_state_dict(sd)
    sd["state"][0]["qbits"] = 8
    with pytest.raises(ValueError, match="parameter is not a DTensor"):
        opt.load_state_dict(sd)


# ---------------------------------------------------------------------- CUDA / NCCL
def _nccl_worker(rank, ws, tmp):
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    torch.cuda.set_device(0)
    group = dist.new_group([0], backend="nccl")
    mesh = DeviceMesh.from_group(group, "cuda")
    kw = dict(storage=torch.bfloat16, nested=True, nan_bytes=True)
    ref = make_net(64, 128, **kw).cuda()
    net = _shard(make_net(64, 128, **kw).cuda(), mesh)
    x = torch.randn(8, 64, device="cuda")
    assert_close(net(x), ref(x), 1e-5, 0, "NCCL-gathered 4-bit weights: forward")
    opt = fourbit.optim.PagedAdamW8bit(net.parameters(), lr=LR, min_8bit_size=0)
    _mse(net(x), x).backward()
    opt.step()
    _same_4bit_bytes(net, ref)


@pytest.mark.cuda
@pytest.mark.nccl
def test_fsdp_nccl_one_gpu(tmp_path):
    """The CUDA path: a 1-rank NCCL group shards, gathers and steps (scripts/gpu_check.sh)."""
    spawn(_nccl_worker, 1, tmp_path, 120)


def test_teardown_rerun_signature_is_narrow():
    """The torchrun test reruns only a run that finished its work and then aborted in teardown."""
    from subprocess import CompletedProcess
    done, abort = "step 1: loss 6.2\nsaved the adapter (8 tensors)\n", "terminate called without an active exception\n"
    last = "saved the adapter"
    assert _aborted_in_teardown(CompletedProcess([], 1, done, abort), last)
    assert not _aborted_in_teardown(CompletedProcess([], 0, done, abort), last)  # passed: nothing to rerun
    assert not _aborted_in_teardown(CompletedProcess([], 1, "step 1: loss 6.2\n", abort), last)  # died before the end
    assert not _aborted_in_teardown(CompletedProcess([], 1, done, "RuntimeError: shape mismatch\n"), last)  # another error
