"""``fourbit inspect PATH``: what a checkpoint directory, a safetensors file or a LoRA adapter
holds, read from the safetensors headers and the small quant-state entries only."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import click
from rich.table import Table

from ..utils import unpack_tensor_to_dict
from ._common import EXIT_INPUT, CliError, console, fmt_bytes
from .checkpoint import safetensors_header, shard_files

_QS = re.compile(r"^(?P<w>.+)\.quant_state\.bitsandbytes__(?P<qt>nf4|fp4)$")
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "U8": 1, "I8": 1, "I16": 2, "I32": 4, "I64": 8,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_TORCH_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
ADAPTER_FILES = ("adapter_model.safetensors", "adapter.safetensors")


def _entries(files: list[Path]) -> dict[str, tuple[str, list[int], Path]]:
    """key -> (safetensors dtype, shape, file), from the headers."""
    out = {}
    for path in files:
        _, header, _ = safetensors_header(path)
        for key, meta in header.items():
            if key != "__metadata__":
                out[key] = (meta["dtype"], meta["shape"], path)
    return out


def _read(path: Path, key: str):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(key)


def inspect_path(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise CliError(f"PATH {str(path)!r} does not exist", EXIT_INPUT)
    info: dict = {"path": str(path)}
    adapter_cfg = None
    if path.is_file():
        files = [path]
    elif (path / "adapter_config.json").is_file() or (path / "lora_config.json").is_file():
        name = "adapter_config.json" if (path / "adapter_config.json").is_file() else "lora_config.json"
        adapter_cfg = json.loads((path / name).read_text())
        files = [path / f for f in ADAPTER_FILES if (path / f).is_file()]
        if not files:
            raise CliError(f"{path}: {name} but none of {list(ADAPTER_FILES)}", EXIT_INPUT)
    else:
        names, _ = shard_files(path)
        files = [path / n for n in names]
        if (path / "config.json").is_file():
            config = json.loads((path / "config.json").read_text())
            info["architecture"] = (config.get("architectures") or [config.get("model_type")])[0]
            info["quantization_config"] = config.get("quantization_config")
    entries = _entries(files)
    info["disk_bytes"] = sum(f.stat().st_size for f in files)
    info["tensors"] = len(entries)

    if adapter_cfg is not None:
        lora = {k: v for k, v in entries.items() if ".lora_A." in k or ".lora_B." in k}
        a_keys = [k for k in lora if ".lora_A." in k]
        ranks = Counter(lora[k][1][0] for k in a_keys)
        layers = sorted(re.sub(r"\.lora_A\..*$", "", k) for k in a_keys)
        targets = sorted({layer.rsplit(".", 1)[-1] for layer in layers})
        info.update(format="LoRA adapter", lora_layers=len(layers),
                    rank=adapter_cfg.get("r", ranks.most_common(1)[0][0] if ranks else None),
                    lora_alpha=adapter_cfg.get("lora_alpha"), targets=targets,
                    base_model=adapter_cfg.get("base_model_name_or_path", adapter_cfg.get("base_model")),
                    parameters=sum(math.prod(v[1]) for v in lora.values()),
                    dtypes=sorted({v[0] for v in lora.values()}))
        info["full_precision_bytes"] = info["disk_bytes"]
        return info

    states = {}
    for key, (_, _, file) in entries.items():
        m = _QS.match(key)
        if m:
            raw = _read(file, key)
            try:
                states[m["w"]] = unpack_tensor_to_dict(raw)
            except ValueError as e:
                raise CliError(f"{file}: {key}: {e}", EXIT_INPUT) from None
    full = 0
    four_bit_keys = set()
    for w, st in states.items():
        full += math.prod(st["shape"]) * _TORCH_BYTES.get(st["dtype"], 4)
        four_bit_keys.update(k for k in entries if k == w or k.startswith(w + "."))
    for key, (dt, shape, _) in entries.items():
        if key not in four_bit_keys:
            full += math.prod(shape) * _DTYPE_BYTES.get(dt, 4)
    info["full_precision_bytes"] = full
    if states:
        fmt = Counter((s["quant_type"], s["blocksize"], "nested_offset" in s, s["dtype"]) for s in states.values())
        (qt, bs, nested, dtype), _ = fmt.most_common(1)[0]
        qc = info.get("quantization_config") or {}
        info.update(format="bitsandbytes 4-bit", quant_type=qt, blocksize=bs, double_quant=nested, dtype=dtype,
                    formats=len(fmt), quantized_layers=len(states),
                    compute_dtype=qc.get("bnb_4bit_compute_dtype"),
                    quant_storage=entries[next(iter(states))][0],
                    float_tensors=len(entries) - len(four_bit_keys))
    else:
        info.update(format="full precision", dtypes=dict(Counter(v[0] for v in entries.values())))
    return info


def info_table(info: dict) -> Table:
    table = Table(title=f"{info['path']}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    labels = [("format", "format"), ("architecture", "architecture"), ("quant_type", "quant type"),
              ("blocksize", "blocksize"), ("double_quant", "double quant"), ("dtype", "dtype (of the weights)"),
              ("compute_dtype", "compute dtype"), ("quant_storage", "quant storage"),
              ("quantized_layers", "4-bit layers"), ("float_tensors", "other tensors"), ("dtypes", "dtypes"),
              ("lora_layers", "LoRA layers"), ("rank", "LoRA rank"), ("lora_alpha", "LoRA alpha"),
              ("targets", "LoRA targets"), ("parameters", "adapter parameters"), ("base_model", "base model"),
              ("tensors", "tensors")]
    for key, label in labels:
        if info.get(key) is not None:
            value = info[key]
            if isinstance(value, (list, tuple)):
                value = ", ".join(map(str, value))
            elif isinstance(value, dict):
                value = ", ".join(f"{k}: {v}" for k, v in value.items())
            table.add_row(label, str(value))
    ratio = info["full_precision_bytes"] / max(1, info["disk_bytes"])
    table.add_row("size on disk", fmt_bytes(info["disk_bytes"]))
    if info["format"] != "LoRA adapter":
        table.add_row("full precision", f"{fmt_bytes(info['full_precision_bytes'])} ({ratio:.2f}x the disk size)")
    return table


@click.command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="print the facts as JSON (for scripts)")
def inspect_cmd(path, as_json):
    """Show what PATH holds: a checkpoint directory (float or 4-bit), a .safetensors file, or a
    LoRA adapter directory: format, quant type, blocksize, double quant, dtype, size on disk
    vs full precision, LoRA rank and targets."""
    info = inspect_path(path)
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        console.print(info_table(info))
