"""``fourbit merge BASE ADAPTER DST``: a LoRA adapter merged into a full-precision checkpoint,
W + scaling * B @ A for every adapted layer (computed in float32, stored in the weight's
dtype), streaming. The tensors of each safetensors shard keep their dtypes and shapes, so the
output shard has the input's header and offsets: each tensor is read with a plain file read,
merged if it is adapted, and written at once. Resident memory is one tensor plus its float32
update B @ A, whatever the shard or model size (page cache aside)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import click
import torch

from ._common import EXIT_INPUT, PeakRSS, CliError, atomic_dir, console, fmt_bytes, require_dir
from .adapter import read_adapter, scaling
from .checkpoint import key_to_module, read_config, safetensors_header, shard_files

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
COPY_CHUNK = 2**20  # bytes per read/write when a tensor is copied unchanged


def merge_shard(src: Path, dst: Path, layers: dict, cfg: dict, prefix: str, merged: set) -> None:
    raw, header, data_start = safetensors_header(src)
    modules = set(layers)
    entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"])
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.write(raw)
        pos = 0
        for key, meta in entries:
            begin, end = meta["data_offsets"]
            if begin != pos:  # keep any gap byte for byte (the header's offsets stay valid)
                fin.seek(data_start + pos)
                fout.write(fin.read(begin - pos))
            module = key_to_module(key, modules, prefix)
            fin.seek(data_start + begin)
            if module is None:
                left = end - begin
                while left:
                    chunk = fin.read(min(left, COPY_CHUNK))
                    fout.write(chunk)
                    left -= len(chunk)
            else:
                dtype = _DTYPES.get(meta["dtype"])
                if dtype is None or not dtype.is_floating_point or len(meta["shape"]) != 2:
                    raise CliError(f"{src}: {key} is {meta['dtype']} {meta['shape']}, not a 2-D float weight", EXIT_INPUT)
                buf = bytearray(fin.read(end - begin))
                w = torch.frombuffer(buf, dtype=dtype).reshape(meta["shape"])
                a, b = layers[module]["A"], layers[module]["B"]
                delta = b.float() @ a.float()
                if cfg.get("fan_in_fan_out"):
                    delta = delta.T
                if list(delta.shape) != list(w.shape):
                    raise CliError(f"adapter layer {module!r}: B @ A is {list(delta.shape)} but {key} in {src.name} "
                                   f"is {list(w.shape)}", EXIT_INPUT)
                delta.mul_(scaling(cfg, a.shape[0]))
                if dtype == torch.float32:
                    w.add_(delta)  # in the read buffer: no copy of the weight
                else:
                    delta.add_(w.float())  # the float32 sum, rounded once into the buffer
                    w.copy_(delta)
                fout.write(buf)
                merged.add(module)
                del w, delta, buf
            pos = end


def merge_checkpoint(base: Path, adapter: Path, dst: Path) -> dict:
    config = read_config(base)
    if "quantization_config" in config:
        raise CliError(f"BASE {str(base)!r} is quantized; merge into the full-precision checkpoint it came from "
                       "(a merged 4-bit model would need re-quantizing the sum)", EXIT_INPUT)
    cfg, layers = read_adapter(adapter)
    files, index = shard_files(base)
    from .checkpoint import meta_model

    prefix = getattr(meta_model(base), "base_model_prefix", "")
    merged: set = set()
    torch.ones(64, 64) @ torch.ones(64, 64)  # start torch's CPU thread pool before measuring
    with PeakRSS() as rss:
        for name in files:
            merge_shard(base / name, dst / name, layers, cfg, prefix, merged)
    missing = sorted(set(layers) - merged)
    if missing:
        raise CliError(f"adapter layer(s) {missing[:5]} have no weight in BASE {str(base)!r} (is it the adapter's "
                       f"base model? its config says {cfg.get('base_model_name_or_path')!r})", EXIT_INPUT)
    for item in sorted(base.iterdir()):  # config, index, tokenizer, ...
        if item.name not in files:
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, dst / item.name)
    sizes = [(base / f).stat().st_size for f in files]
    largest = max(max(v.numel() * v.element_size() for v in ab.values()) for ab in layers.values())
    return {"base": str(base), "adapter": str(adapter), "merged_layers": len(merged), "shards": len(files),
            "model_bytes": sum(sizes), "largest_shard_bytes": max(sizes), "peak_rss_bytes": rss.peak_bytes,
            "largest_adapter_tensor_bytes": largest, "index": index is not None}


@click.command("merge")
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("adapter", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True, help="replace DST if it exists")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="also write the report as JSON")
def merge_cmd(base, adapter, dst, overwrite, json_out):
    """Merge the LoRA ADAPTER (PEFT format, e.g. from fourbit train) into the full-precision
    checkpoint BASE, writing DST shard by shard (same shards, dtypes and index as BASE). Peak
    memory is about one tensor, whatever the model size; it is measured and printed."""
    require_dir(base, "BASE", "config.json")
    require_dir(adapter, "ADAPTER")
    with atomic_dir(dst, overwrite) as tmp:
        report = merge_checkpoint(base, adapter, tmp)
    report["dst"] = str(dst)
    console.print(f"merged {report['merged_layers']} LoRA layers into {report['shards']} shard(s) "
                  f"({fmt_bytes(report['model_bytes'])}); peak RSS above start {fmt_bytes(report['peak_rss_bytes'])} "
                  f"(largest shard {fmt_bytes(report['largest_shard_bytes'])}); wrote {dst}")
    if json_out:
        Path(json_out).write_text(json.dumps(report, indent=2) + "\n")
