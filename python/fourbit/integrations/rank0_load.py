"""Low-memory loading of an FSDP2-sharded fourbit model: rank 0 streams the checkpoint.

``load_from_rank0(model, path)`` is called on every rank with the same model, built on the
meta device, prepared with ``prepare_fsdp`` and wrapped with ``fully_shard``. Rank 0 reads
the safetensors checkpoint one tensor at a time (``safe_open``; never a whole file), turns
each 4-bit target into its flat byte layout (quantizing a float weight, or taking a
bitsandbytes-format packed weight and its statistics as they are), and scatters it: every
rank receives only its FSDP shard (``ceil(rows / world)`` rows of dim 0) and copies it into
its local tensor. Replicated tensors are broadcast. So a rank's memory grows by its own
shards plus about one tensor (rank 0: the float tensor it read and its packed bytes), never
the model.

The checkpoint is checked from the safetensors headers on rank 0 before any tensor moves
(missing entries, shapes, shard files); an error is sent to every rank, and all of them
raise the same exception naming the key or the file, instead of hanging in a collective.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from .. import functional as F
from ..nn.linear import _QS_KEY_PREFIX, Linear4bit
from .distributed import flat_layout
from .shards import INDEX_FILE, read_weight_map

_SINGLE_FILE = "model.safetensors"
_PEFT_PREFIX = "base_model.model."


class _Reader:
    """Rank 0's view of a checkpoint directory: key -> file from the index (or the single
    file) and each tensor's shape, from the headers. A read opens the file for that one
    tensor: ``safe_open`` maps the file, and every page a tensor touched would stay resident
    while the mapping lives (the whole checkpoint, by the end, with one handle per file)."""

    def __init__(self, path: str):
        from safetensors import safe_open
        self.path = path
        index = os.path.join(path, INDEX_FILE)
        if os.path.isfile(index):
            weight_map = read_weight_map(path)
        elif os.path.isfile(os.path.join(path, _SINGLE_FILE)):
            weight_map = None
        elif not os.path.isdir(path):
            raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
        else:
            raise FileNotFoundError(f"{path}: no {_SINGLE_FILE} or {INDEX_FILE} (found {sorted(os.listdir(path))})")
        files = sorted(set(weight_map.values())) if weight_map is not None else [_SINGLE_FILE]
        self.file_of, self.shapes = {}, {}
        for name in files:
            full = os.path.join(path, name)
            if not os.path.isfile(full):
                raise FileNotFoundError(f"{full}: named in {INDEX_FILE} but missing; the checkpoint is incomplete")
            try:
                with safe_open(full, framework="pt", device="cpu") as handle:
                    for key in handle.keys():
                        self.file_of[key] = name
                        self.shapes[key] = list(handle.get_slice(key).get_shape())
            except Exception as e:  # SafetensorError or OSError
                raise ValueError(f"{full}: not a readable safetensors file ({e})") from None
        if weight_map is not None:
            lost = sorted(k for k, name in weight_map.items() if self.file_of.get(k) != name)
            if lost:
                raise ValueError(f"{index}: {len(lost)} key(s) are not in the shard the index names, e.g. "
                                 f"{lost[0]!r} (index: {weight_map[lost[0]]})")

    def where(self, key: str) -> str:
        return os.path.join(self.path, self.file_of[key])

    def shape(self, key: str) -> list:
        return self.shapes[key]

    def read(self, key: str) -> torch.Tensor:
        from safetensors import safe_open
        with safe_open(self.where(key), framework="pt", device="cpu") as handle:
            return handle.get_tensor(key)


def _candidates(key: str) -> list:
    """Checkpoint keys that may hold model entry ``key``: itself, without PEFT's
    ``base_model.model.`` prefix, and without a LoRA wrapper's ``.base_layer``."""
    out = [key]
    if key.startswith(_PEFT_PREFIX):
        out.append(key[len(_PEFT_PREFIX):])
    for k in list(out):
        if ".base_layer." in k:
            out.append(k.replace(".base_layer.", "."))
    return out


def _plan(model: nn.Module, entries: dict, reader: _Reader, missing_ok) -> tuple[list, list]:
    """[(model key, kind, checkpoint key)] in model order, kind "quantize" / "packed" / "plain";
    and the model keys left out (``missing_ok``). KeyError / ValueError naming the first bad entry."""
    plan, skipped, seen = [], [], {}
    for key, t in entries.items():
        if id(t) in seen:  # a tied parameter: loaded once, under its first name
            continue
        seen[id(t)] = key
        layout = _layout_of(model, key)
        ckey = next((c for c in _candidates(key) if c in reader.file_of), None)
        qs_key = None
        if layout is not None:
            qs_key = next((f"{c}.{_QS_KEY_PREFIX}{q}" for c in _candidates(key) for q in ("nf4", "fp4")
                           if f"{c}.{_QS_KEY_PREFIX}{q}" in reader.file_of), None)
        if ckey is None and qs_key is None:
            if missing_ok is not None and missing_ok(key):
                skipped.append(key)
                continue
            raise KeyError(f"{key}: not in the checkpoint {reader.path} (looked for "
                           f"{', '.join(repr(c) for c in _candidates(key))})")
        if qs_key is not None:
            wkey = qs_key[:-len(f".{_QS_KEY_PREFIX}nf4")]
            if wkey not in reader.file_of:
                raise KeyError(f"{wkey}: missing from the checkpoint {reader.path}, which holds its 4-bit "
                               f"statistics {qs_key!r}")
            plan.append((key, "packed", wkey))
            continue
        got = reader.shape(ckey)
        want = list(layout.shape) if layout is not None else list(t.shape)
        if got != want:
            raise ValueError(f"{ckey} in {reader.where(ckey)}: shape {got}, but the model's {key} "
                             f"{'(a 4-bit weight, out x in) ' if layout is not None else ''}is {want}")
        plan.append((key, "quantize" if layout is not None else "plain", ckey))
    return plan, skipped


def _layout_of(model: nn.Module, key: str):
    owner, _, attr = key.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    return flat_layout(module) if isinstance(module, Linear4bit) and attr == "weight" else None


def _produce(model: nn.Module, reader: _Reader, key: str, kind: str, ckey: str, like: torch.Tensor,
             device: torch.device) -> torch.Tensor:
    """Rank 0: the whole value of model entry ``key`` (a flat byte weight for a 4-bit layer)."""
    layout = _layout_of(model, key)
    if kind == "plain":
        return reader.read(ckey).to(device=device, dtype=like.dtype)
    if kind == "quantize":
        w = reader.read(ckey)
        if not w.is_floating_point():
            raise ValueError(f"{ckey} in {reader.where(ckey)}: a {w.dtype} tensor, but the model's {key} is a "
                             "4-bit weight to quantize from floats")
        w = w.to(device=device, dtype=layout.dtype).contiguous()
        codes, qs = F.quantize_4bit(w, blocksize=layout.blocksize, compress_statistics=layout.nested,
                                    quant_type=layout.quant_type, quant_storage=layout.quant_storage)
        del w
        return layout.pack_codes(codes, qs)
    stats = {k[len(ckey) + 1:]: reader.read(k) for k in reader.file_of if k.startswith(ckey + ".")}
    qs = F.QuantState.from_dict(stats, device=device)
    codes = reader.read(ckey).to(device)
    want = (tuple(layout.shape), layout.blocksize, layout.quant_type, layout.nested, layout.quant_storage)
    got = (tuple(qs.shape), qs.blocksize, qs.quant_type, qs.nested, codes.dtype)
    if got != want:
        raise ValueError(f"{ckey} in {reader.where(ckey)}: a 4-bit weight with (shape, blocksize, quant_type, "
                         f"nested, storage) {got}, but the model's {key} expects {want}")
    return layout.pack_codes(codes, qs)


def _local(key: str, t: torch.Tensor, world: int):
    """(local tensor, rows per shard or None when replicated) of a model entry."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    if not isinstance(t, DTensor):
        return t.data, None
    mesh = t.device_mesh
    if mesh.ndim != 1 or mesh.mesh.flatten().tolist() != list(range(world)):
        raise ValueError(f"{key}: a DTensor on mesh {mesh.mesh.tolist()}; load_from_rank0 supports 1-D meshes "
                         f"over all {world} ranks in order")
    placement = t.placements[0]
    if isinstance(placement, Replicate):
        return t.to_local(), None
    if not isinstance(placement, Shard) or placement.dim != 0:
        raise ValueError(f"{key}: placement {placement}; load_from_rank0 supports Shard(0) and Replicate")
    return t.to_local(), -(-t.shape[0] // world) if t.dim() else None


def _send(full: Optional[torch.Tensor], local: torch.Tensor, rows: Optional[int], rank: int, world: int) -> None:
    """Rank 0's ``full`` value into every rank's ``local`` part: a broadcast when replicated,
    else a scatter of ``rows``-row chunks of dim 0 (FSDP2's split; the last ones padded)."""
    if rows is None:
        if rank == 0:
            local.copy_(full)
        dist.broadcast(local, src=0)
        return
    rest = tuple(local.shape[1:])
    recv = torch.empty((rows,) + rest, dtype=local.dtype, device=local.device)
    chunks = None
    if rank == 0:
        chunks = []
        for r in range(world):
            piece = full[r * rows:(r + 1) * rows]
            if piece.shape[0] != rows:
                padded = torch.zeros((rows,) + rest, dtype=full.dtype, device=full.device)
                padded[:piece.shape[0]] = piece
                piece = padded
            chunks.append(piece.contiguous())
    dist.scatter(recv, chunks, src=0)
    local.copy_(recv[:local.shape[0]])


def load_from_rank0(model: nn.Module, path, *, device=None,
                    missing_ok: Optional[Callable[[str], bool]] = None) -> dict:
    """Fills ``model`` (every rank calls it; built on meta, ``prepare_fsdp``-ed, sharded) from
    the safetensors checkpoint directory ``path``, which only rank 0 reads.

    ``path``: a directory with ``model.safetensors`` or ``model.safetensors.index.json`` and
    its shards (on rank 0; the other ranks ignore it). Float weights of 4-bit layers are
    quantized with each layer's options (blocksize, quant type, double quantization,
    storage); a bitsandbytes-format 4-bit entry (``weight`` + ``weight.absmax`` ... +
    ``weight.quant_state.bitsandbytes__nf4``) is taken as it is and must match the layer.
    Model keys are looked up as they are, without PEFT's ``base_model.model.`` prefix and
    without ``.base_layer`` (a base-model checkpoint into a LoRA-wrapped model).
    ``device``: where meta tensors are materialised (default: cpu); tensors already real stay.
    ``missing_ok(key)``: True for model entries that may be absent (e.g. fresh LoRA weights,
    to be initialised by the caller afterwards); any other absent entry is an error.

    Returns {"loaded": n, "quantized": n, "packed": n, "skipped": [keys]} (same on all ranks).
    Raises KeyError / ValueError / FileNotFoundError naming the key or file, on every rank.
    Buffers that were real stay as they were (unless the checkpoint holds them); buffers on
    meta that the checkpoint lacks (non-persistent ones) are left uninitialised.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, m in model.named_modules():
        if isinstance(m, Linear4bit) and flat_layout(m) is None:
            raise ValueError(f"{name or 'model'}: a Linear4bit not prepared for FSDP; call prepare_fsdp(model) "
                             "(then fully_shard) before load_from_rank0")
    if not dist.is_initialized():
        raise RuntimeError("load_from_rank0 needs an initialised process group (dist.init_process_group)")
    rank, world = dist.get_rank(), dist.get_world_size()
    if any(t.is_meta for t in model.state_dict(keep_vars=True).values()):
        # to_empty replaces every tensor: real buffers (rotary frequencies, often not in the
        # checkpoint) are put back; they are small
        kept = {n: b.detach().clone() for n, b in model.named_buffers() if not b.is_meta}
        model.to_empty(device=torch.device("cpu") if device is None else torch.device(device))
        with torch.no_grad():
            for n, b in model.named_buffers():
                if n in kept:
                    b.copy_(kept[n])
    entries = model.state_dict(keep_vars=True)

    # 1. rank 0 checks everything from the headers; every rank raises the same error.
    reader, status = None, [None, None]
    if rank == 0:
        try:
            reader = _Reader(os.fspath(path))
            status = [_plan(model, entries, reader, missing_ok), None]
        except Exception as e:  # sent to every rank: the others would wait in a collective forever
            status = [None, (type(e).__name__, e.args[0] if e.args else str(e))]
    dist.broadcast_object_list(status, src=0)
    if status[1] is not None:
        kinds = {"KeyError": KeyError, "ValueError": ValueError, "FileNotFoundError": FileNotFoundError}
        raise kinds.get(status[1][0], RuntimeError)(status[1][1])
    plan, skipped = status[0]

    # 2. one tensor at a time: rank 0 reads (and quantizes), every rank keeps its shard.
    counts = {"loaded": 0, "quantize": 0, "packed": 0}
    with torch.no_grad():
        for key, kind, ckey in plan:
            local, rows = _local(key, entries[key], world)
            flag = torch.zeros(1, dtype=torch.int64, device=local.device)  # the backend's device (NCCL: cuda)
            full, err = None, None
            if rank == 0:
                try:
                    full = _produce(model, reader, key, kind, ckey, local, local.device)
                    expect = entries[key].shape
                    if tuple(full.shape) != tuple(expect):
                        raise ValueError(f"{ckey}: gives {list(full.shape)}, but the model's {key} is {list(expect)}")
                except Exception as e:  # I/O errors too: every rank must stop, not only rank 0
                    err = f"{key} (from {ckey}): {type(e).__name__}: {e}"
                flag.fill_(0 if err is None else 1)
            dist.broadcast(flag, src=0)
            if flag.item():
                box = [err]
                dist.broadcast_object_list(box, src=0)
                raise ValueError(box[0])
            _send(full, local, rows, rank, world)
            del full
            counts["loaded"] += 1
            if kind != "plain":
                counts[kind] += 1
    for m in model.modules():
        if isinstance(m, Linear4bit):
            m._gemm_cache = None
            m.__dict__.pop("_flat_views", None)
    return {"loaded": counts["loaded"], "quantized": counts["quantize"], "packed": counts["packed"],
            "skipped": skipped}


__all__ = ["load_from_rank0"]
