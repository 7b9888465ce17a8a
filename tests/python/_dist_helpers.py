"""Helpers of the distributed tests: spawn N gloo processes with a hard timeout, a small
QLoRA model of fourbit layers, per-rank data, and tolerance checks.

``spawn(fn, world_size, tmp_path, timeout)`` runs ``fn(rank, world_size, tmp_path)`` in
``world_size`` fresh processes joined in one gloo group (a file store under tmp_path). A
worker that raises writes its traceback to a file; the test then fails with it. A run past
``timeout`` seconds is killed and fails the test (a hung collective never hangs CI).
"""

from __future__ import annotations

import math
import os
import sys
import time
import traceback

import torch
import torch.multiprocessing as mp
from torch import nn

import fourbit
from fourbit.nn import Linear4bit, LoraLinear4bit


def _worker(fn, rank, world_size, tmp, args):
    import torch.distributed as dist
    torch.set_num_threads(1)  # N processes share the machine's cores
    try:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world_size)
        fn(rank, world_size, tmp, *args)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(tmp, f"error_rank{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        os._exit(1)
    # The test's work and checks are done: leave without the interpreter's and C++ statics'
    # teardown, where a rank rarely aborts with "terminate called without an active
    # exception" (a torch/gloo thread left joinable; seen twice in ~hundreds of runs, never in
    # fourbit's code, which starts no std::thread). A crash before this line still fails.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn, world_size: int, tmp_path, timeout: float, *args) -> None:
    tmp = str(tmp_path)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, tmp, args), daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    errors = []
    for r in range(world_size):
        path = os.path.join(tmp, f"error_rank{r}.txt")
        if os.path.exists(path):
            errors.append(f"--- rank {r} ---\n" + open(path).read())
    if errors:
        raise AssertionError("\n".join(errors))
    if hung:
        raise AssertionError(f"ranks {hung} still running after {timeout}s: killed")
    bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
    if bad:
        raise AssertionError(f"ranks exited with codes {bad}")


# ---------------------------------------------------------------------- the model
def lora_layer(d_in, d_out, storage, nested, device=None):
    base = Linear4bit(d_in, d_out, bias=True, quant_type="nf4", quant_storage=storage, compress_statistics=nested,
                      device=device)
    if device is None or torch.device(device).type != "meta":
        base.quantize()
    return LoraLinear4bit(base, r=4, lora_alpha=8, init_lora_weights=False)


class Block(nn.Module):
    def __init__(self, d, hidden, storage, nested, device=None):
        super().__init__()
        self.up = lora_layer(d, hidden, storage, nested, device)
        self.down = lora_layer(hidden, d, storage, nested, device)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


class Net(nn.Module):
    """Two residual blocks of LoRA-on-4-bit linears; ``checkpoint`` recomputes each block."""

    def __init__(self, d, hidden, storage=torch.uint8, nested=True, device=None, checkpoint=False):
        super().__init__()
        self.blocks = nn.ModuleList([Block(d, hidden, storage, nested, device) for _ in range(2)])
        self.checkpoint = checkpoint

    def forward(self, x):
        for b in self.blocks:
            x = torch.utils.checkpoint.checkpoint(b, x, use_reentrant=False) if self.checkpoint else b(x)
        return x


def make_net(d, hidden, storage=torch.uint8, nested=True, nan_bytes=False, seed=0, **kw):
    """The same model on every rank (seeded). ``nan_bytes``: bf16 storage whose packed codes
    include bit patterns that are NaNs as bf16 (0x7FFF, 0xFFBF, 0x7F81): canonicalising them
    (to 0x7FC0) would change the 4-bit codes, hence the output."""
    torch.manual_seed(seed)
    net = Net(d, hidden, storage, nested, **kw)
    if nan_bytes:
        patterns = torch.tensor([0x7FFF, 0xFFBF - 0x10000, 0x7F81, 0x7FA5], dtype=torch.int16)
        for m in net.modules():
            if isinstance(m, Linear4bit):
                raw = m.weight.data.view(torch.int16).view(-1)
                idx = torch.arange(0, raw.numel(), 3)
                raw[idx] = patterns.repeat(math.ceil(idx.numel() / 4))[:idx.numel()]
                assert torch.isnan(m.weight.data.view(torch.bfloat16)).sum() >= idx.numel()
    return net


def batches(steps, rows, d, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, d, generator=g), torch.randn(rows, d, generator=g)) for _ in range(steps)]


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def full(t):
    """A DTensor's whole value (a collective: every rank calls it), or the tensor itself."""
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def assert_close(actual, expected, rtol, atol, what):
    actual, expected = actual.detach().float(), expected.detach().float()
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    bound = atol + rtol * (expected.abs().max().item() if expected.numel() else 0.0)
    assert err <= bound, f"{what}: max |diff| {err:.3g} > {bound:.3g} (rtol {rtol}, atol {atol})"


__all__ = ["spawn", "Net", "make_net", "batches", "trainable", "full", "assert_close", "fourbit"]
