"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for fourbit's 4-bit layers.

``prepare_fsdp(model)`` turns the weight of every quantized ``Linear4bit`` (also the base
layer of a ``LoraLinear4bit`` or of fourbit's PEFT layer) into ONE flat ``uint8`` parameter
that holds, back to back and 16-byte aligned, everything the layer needs to compute:

    codes          the packed 4-bit codes, their bytes as stored (any ``quant_storage``)
    absmax         fp32 per block, or uint8 per block with double quantization
    nested_absmax  fp32 per 256 absmax blocks        (double quantization only)
    nested_code    fp32 [256], the 8-bit dynamic map  (double quantization only)
    offset         fp32 [1], the mean of the absmax   (double quantization only)
    code           fp32 [16], the NF4/FP4 codebook

FSDP2 then shards that plain byte tensor along dim 0 like any other parameter: the codes
AND the quantization state are sharded (each rank holds ceil(nbytes / world) bytes), any
world size (FSDP pads the last shard; nothing needs to divide the block count), with the
stock all-gather, CPU offload, ``reshard_after_forward``, meta-device init and
``torch.distributed.checkpoint`` (DTensor shards, resharding to another world size).

Why bytes: collectives and copies move a uint8 tensor bit for bit (FSDP2 never casts a
non-float parameter under a ``MixedPrecisionPolicy``), so bf16-stored codes whose bit
patterns are NaNs reach the kernel unchanged (bitsandbytes #1945), and the quantization
state cannot be lost on the way (it is in the same bytes). After FSDP2 all-gathers the
parameter, ``Linear4bit`` reads zero-copy views of it (``FlatLayout.views``): no copy, no
cast, no Python state that FSDP would have to carry.

The layout is a pure function of the weight's shape, blocksize, quant type, storage dtype
and double quantization, so ranks that built the model on the meta device compute the
same layout without seeing the weights (low-memory loading, docs/distributed.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .. import functional as F
from ..nn.linear import Linear4bit
from ..nn.params import Params4bit

_ALIGN = 16  # every segment starts 16-byte aligned: a fp32 or bf16 view of it is always valid


@dataclass(frozen=True)
class FlatLayout:
    """Where each piece of one quantized weight lives in its flat byte parameter.

    ``segments``: (name, byte offset, numel, dtype) for each piece, in order; ``nbytes``: the
    parameter's length. Identical on every rank (it depends on the weight's metadata only).
    """

    shape: tuple
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    quant_storage: torch.dtype
    nested: bool
    segments: tuple
    nbytes: int

    @classmethod
    def build(cls, shape, dtype: torch.dtype, blocksize: int, quant_type: str, quant_storage: torch.dtype,
              nested: bool) -> "FlatLayout":
        F._check_blocksize(blocksize)
        F._check_quant_type(quant_type)
        if len(shape) != 2:
            raise ValueError(f"shape must be the 2-D weight shape [out_features, in_features], got {list(shape)}")
        numel = int(shape[0]) * int(shape[1])
        itemsize = torch.empty(0, dtype=quant_storage).element_size()
        rows = (numel + 2 * itemsize - 1) // (2 * itemsize)
        blocks = (numel + blocksize - 1) // blocksize
        pieces = [("codes", rows * itemsize, torch.uint8)]
        if nested:
            nested_blocks = (blocks + F.NESTED_BLOCKSIZE - 1) // F.NESTED_BLOCKSIZE
            pieces += [("absmax", blocks, torch.uint8), ("nested_absmax", nested_blocks, torch.float32),
                       ("nested_code", 256, torch.float32), ("offset", 1, torch.float32)]
        else:
            pieces += [("absmax", blocks, torch.float32)]
        pieces += [("code", 16, torch.float32)]
        segments, offset = [], 0
        for name, numel_, dt in pieces:
            segments.append((name, offset, numel_, dt))
            size = numel_ * torch.empty(0, dtype=dt).element_size()
            offset += (size + _ALIGN - 1) // _ALIGN * _ALIGN
        return cls(tuple(int(d) for d in shape), dtype, blocksize, quant_type, quant_storage, nested,
                   tuple(segments), offset)

    @classmethod
    def of(cls, layer: Linear4bit) -> "FlatLayout":
        """The layout of ``layer``'s weight: from its QuantState when quantized, else (a layer
        built on the meta device) from its construction arguments."""
        w = layer.weight
        qs = getattr(w, "quant_state", None)
        if qs is not None:
            return cls.build(tuple(qs.shape), qs.dtype, qs.blocksize, qs.quant_type, w.dtype, qs.nested)
        return cls.build((layer.out_features, layer.in_features), w.dtype, w.blocksize, w.quant_type,
                         w.quant_storage, w.compress_statistics)

    # ------------------------------------------------------------------ bytes <-> pieces
    def _piece(self, flat: torch.Tensor, name: str) -> torch.Tensor:
        for seg, offset, numel, dtype in self.segments:
            if seg == name:
                size = numel * torch.empty(0, dtype=dtype).element_size()
                return flat[offset:offset + size].view(dtype)
        raise KeyError(name)

    def pack(self, weight: Params4bit) -> torch.Tensor:
        """The flat uint8 bytes of a quantized ``weight`` (codes and QuantState), on its device."""
        return self.pack_codes(weight.data, weight.quant_state)

    def pack_codes(self, codes: torch.Tensor, qs: F.QuantState) -> torch.Tensor:
        """The flat uint8 bytes of packed ``codes`` and their QuantState, on ``codes``' device."""
        flat = torch.zeros(self.nbytes, dtype=torch.uint8, device=codes.device)
        pieces = {"codes": codes.reshape(-1).view(torch.uint8), "absmax": qs.absmax.reshape(-1),
                  "code": qs.code.reshape(-1)}
        if self.nested:
            pieces.update(nested_absmax=qs.state2.absmax.reshape(-1), nested_code=qs.state2.code.reshape(-1),
                          offset=qs.offset.reshape(-1).float())
        for name, value in pieces.items():
            dst = self._piece(flat, name)
            if value.numel() != dst.numel() or value.dtype != dst.dtype:
                raise RuntimeError(f"{name} of the weight is {value.dtype} [{value.numel()}], but the flat layout "
                                   f"expects {dst.dtype} [{dst.numel()}]: the QuantState is inconsistent with "
                                   f"shape {list(self.shape)}, blocksize {self.blocksize}")
            dst.copy_(value.to(dst.device))
        return flat

    def views(self, flat: torch.Tensor) -> tuple[torch.Tensor, F.QuantState]:
        """(packed codes ``[rows, 1]`` of ``quant_storage``, QuantState): zero-copy views of
        ``flat``, the whole (unsharded) byte parameter."""
        codes = self._piece(flat, "codes").view(self.quant_storage).view(-1, 1)
        state2 = offset = None
        if self.nested:
            state2 = F.QuantState(absmax=self._piece(flat, "nested_absmax"), code=self._piece(flat, "nested_code"),
                                  blocksize=F.NESTED_BLOCKSIZE, dtype=torch.float32)
            offset = self._piece(flat, "offset").view(())
        qs = F.QuantState(absmax=self._piece(flat, "absmax"), shape=torch.Size(self.shape),
                          code=self._piece(flat, "code"), blocksize=self.blocksize, quant_type=self.quant_type,
                          dtype=self.dtype, offset=offset, state2=state2)
        return codes, qs


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def flat_weight_views(layer: Linear4bit, layout: FlatLayout):
    """What ``Linear4bit`` computes with when prepared for FSDP: views of its (unsharded)
    flat weight, cached while the parameter and its storage stay the same."""
    weight = layer.weight
    cache = layer.__dict__.get("_flat_views")
    if cache is not None and cache[0] is weight and cache[1] == weight.data_ptr():
        return cache[2]
    if _is_dtensor(weight):
        raise RuntimeError(f"this {type(layer).__name__}'s weight is still sharded (a DTensor of "
                           f"{list(weight.shape)} bytes): call the model (or the fully_shard-ed module that "
                           "holds the layer) so that FSDP all-gathers it before the forward")
    if weight.dtype != torch.uint8 or weight.dim() != 1 or weight.numel() != layout.nbytes:
        raise RuntimeError(f"this {type(layer).__name__} was prepared for FSDP, so its weight must be the flat "
                           f"uint8 [{layout.nbytes}] parameter, got {weight.dtype} {list(weight.shape)}")
    views = layout.views(weight.detach())
    layer.__dict__["_flat_views"] = (weight, weight.data_ptr(), views)
    return views


def _layers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, Linear4bit)]


def prepare_fsdp(model: nn.Module) -> nn.Module:
    """Makes every ``Linear4bit`` of ``model`` shardable by FSDP2 (in place; returns ``model``).

    Call it before ``fully_shard`` (or before handing the model to accelerate / TRL with an
    FSDP2 config). A layer must be quantized, or on the meta device (low-memory loading:
    its flat weight is then a meta tensor of the right size, filled later by
    ``set_model_state_dict(..., broadcast_from_rank0=True)``). Layers already prepared are
    left as they are. A layer whose weight is a float tensor on a real device raises
    ValueError naming it: quantize first (``.to(device)`` / ``.quantize()``)."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, layer in model.named_modules():
        if not isinstance(layer, Linear4bit) or layer.__dict__.get("_flat_layout") is not None:
            continue
        w = layer.weight
        if not isinstance(w, Params4bit):
            raise ValueError(f"{name or 'model'}: weight is a {type(w).__name__}, not a fourbit Params4bit")
        if not w.bnb_quantized and w.device.type != "meta":
            raise ValueError(f"{name or 'model'}: weight is not quantized (a {w.dtype} {list(w.shape)} tensor on "
                             f"{w.device}); quantize the model (.to(device) / .quantize()) before prepare_fsdp")
        layout = FlatLayout.of(layer)
        if w.bnb_quantized:
            flat = layout.pack(w)
        else:
            flat = torch.empty(layout.nbytes, dtype=torch.uint8, device="meta")
        layer._parameters["weight"] = nn.Parameter(flat, requires_grad=False)
        layer._flat_layout = layout
        layer._gemm_cache = None
        layer.__dict__.pop("_flat_views", None)
    return model


def restore_params4bit(model: nn.Module) -> nn.Module:
    """Undoes ``prepare_fsdp`` on a model that is NOT sharded (for instance after loading a
    full state dict): every flat weight becomes a ``Params4bit`` with its QuantState again,
    whose ``state_dict`` has bitsandbytes' keys and bytes. In place; returns ``model``."""
    for name, layer in model.named_modules():
        layout = layer.__dict__.get("_flat_layout") if isinstance(layer, Linear4bit) else None
        if layout is None:
            continue
        flat = layer.weight
        if _is_dtensor(flat) or flat.is_meta:
            raise ValueError(f"{name or 'model'}: its flat weight is {'sharded' if _is_dtensor(flat) else 'on meta'}; "
                             "restore_params4bit needs the whole weight on a real device (gather a full state "
                             "dict and load it into an unsharded model first)")
        codes, qs = layout.views(flat.detach().clone())
        layer._parameters["weight"] = Params4bit(codes, requires_grad=False, quant_state=qs,
                                                 blocksize=qs.blocksize, compress_statistics=qs.nested,
                                                 quant_type=qs.quant_type, quant_storage=layout.quant_storage,
                                                 bnb_quantized=True)
        layer._flat_layout = None
        layer._gemm_cache = None
        layer.__dict__.pop("_flat_views", None)
    return model


def flat_layout(layer: Linear4bit) -> Optional[FlatLayout]:
    """The layer's FlatLayout when ``prepare_fsdp`` has been applied, else None."""
    return layer.__dict__.get("_flat_layout")


__all__ = ["FlatLayout", "prepare_fsdp", "restore_params4bit", "flat_layout", "flat_weight_views"]
