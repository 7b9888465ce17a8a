"""Optimizer states of sharded (DTensor) parameters, as FSDP2 makes them.

The fused AdamW kernel steps on each rank's local shard: a DTensor parameter, its gradient
and its states are unwrapped to their local tensors (AdamW is elementwise, so a shard's
update is the full tensor's update restricted to the shard). 32-bit states are DTensors
with the parameter's placement, so ``torch.distributed.checkpoint`` saves them sharded and
reshards them to another world size. 8-bit states are blockwise over the LOCAL shard (256
elements per absmax block), which depends on the world size; a state dict therefore carries
the uint8 codes as a DTensor and, instead of the per-block absmax, ``scale1``/``scale2``: each
element's block absmax as an fp32 DTensor shaped like the parameter (with ``"qbits": 8``).
Both reshard. Loaded on the same shards, codes and absmax come back exactly (a resumed
run equals an uninterrupted one bit for bit); on other shards the decoded values are
quantized again over the new local blocks (one 8-bit rounding).
"""

from __future__ import annotations

import torch

from .. import functional as F

QBITS_KEY = "qbits"
BLOCKSIZE = 256


def is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor; any other tensor as it is."""
    return t._local_tensor if is_dtensor(t) else t


def like(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``t`` (a local tensor shaped like ``p``'s shard) as a DTensor placed as ``p`` is;
    ``t`` itself when ``p`` is not a DTensor."""
    if not is_dtensor(p):
        return t
    from torch.distributed.tensor import DTensor
    return DTensor.from_local(t, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def to_scale(codes: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """Each element's block absmax, shaped like ``codes`` (so that it shards like them)."""
    return absmax.float().repeat_interleave(BLOCKSIZE)[:codes.numel()].reshape(codes.shape)


def from_scale(codes: torch.Tensor, scale: torch.Tensor, qmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes, fp32 absmax per 256) of this rank's shard from saved codes and per-element
    scales. Where every local block of 256 has one scale (the same shards as when saved, or
    blocks that nest in the saved ones) the codes and scales are kept as they are: exact.
    Otherwise the decoded values are quantized again over the local blocks."""
    flat = scale.reshape(-1).float()
    first = flat[::BLOCKSIZE].contiguous()
    if torch.equal(first.repeat_interleave(BLOCKSIZE)[:flat.numel()], flat):
        return codes.contiguous(), first
    values = qmap[codes.reshape(-1).long()] * flat
    new_codes, qs = F.quantize_blockwise(values.contiguous(), code=qmap, blocksize=BLOCKSIZE)
    return new_codes.reshape(codes.shape), qs.absmax.float()
