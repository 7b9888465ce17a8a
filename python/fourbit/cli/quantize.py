"""``fourbit quantize SRC DST``: a Hugging Face float checkpoint directory to a 4-bit one
(bitsandbytes' keys and bytes, the ``quantization_config`` transformers writes), streaming:
one shard is read, one tensor at a time, quantized and written before the next is opened."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import click
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import fourbit.functional as F

from ._common import EXIT_USAGE, PeakRSS, CliError, atomic_dir, console, fmt_bytes, require_dir
from .checkpoint import (INDEX_FILE, key_to_module, linear_modules, matches, meta_model, open_shard, read_config,
                         shard_files)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def plan_modules(model, include: tuple[str, ...], exclude: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(linear modules to quantize, linear modules kept in full precision): transformers' choice
    (its default skips: the output head, tied and fp32-kept modules), narrowed by --include and
    --exclude."""
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    default_skip = list(get_keys_to_not_convert(model)) + list(getattr(model, "_keep_in_fp32_modules", None) or ())
    linears = linear_modules(model)
    chosen = [n for n in linears if should_convert_module(n, default_skip)
              and (not include or any(matches(n, p) for p in include))
              and not any(matches(n, p) for p in exclude)]
    for flag, patterns in (("--include", include), ("--exclude", exclude)):
        for p in patterns:
            if not any(matches(n, p) for n in linears):
                raise CliError(f"{flag} {p!r} matches no linear layer of the model (e.g. {linears[:3]})", EXIT_USAGE)
    return chosen, [n for n in linears if n not in chosen]


def quantize_checkpoint(src: Path, dst: Path, *, quant_type: str, double_quant: bool, blocksize: int,
                        compute_dtype: str, include=(), exclude=(), progress: bool = True) -> dict:
    """Writes the 4-bit checkpoint into ``dst`` (an existing empty directory); returns the report."""
    from safetensors.torch import save_file

    from fourbit.integrations.transformers import QuantOptions

    config = read_config(src)
    if "quantization_config" in config:
        raise CliError(f"{src} is already quantized (config.json has a quantization_config)")
    files, index = shard_files(src)
    model = meta_model(src)
    chosen, kept = plan_modules(model, include, exclude)
    if not chosen:
        raise CliError("no linear layer left to quantize (check --include/--exclude)", EXIT_USAGE)
    chosen_set, prefix = set(chosen), getattr(model, "base_model_prefix", "")
    del model
    n_keys = 0
    for name in files:
        with open_shard(src / name) as f:
            n_keys += len(list(f.keys()))

    layers, weight_map, total = [], {}, {"float_bytes": 0, "out_bytes": 0}
    done = set()
    with PeakRSS() as rss, Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                    TimeElapsedColumn(), console=console, disable=not progress,
                                    transient=True) as bar:
        task = bar.add_task("quantizing", total=n_keys)
        for name in files:
            out = {}
            with open_shard(src / name) as f:
                for key in f.keys():
                    tensor = f.get_tensor(key)
                    module = key_to_module(key, chosen_set, prefix)
                    total["float_bytes"] += tensor.numel() * tensor.element_size()
                    if module is None:
                        out[key] = tensor
                    else:
                        if not tensor.is_floating_point() or tensor.dim() != 2:
                            raise CliError(f"{src / name}: {key} is {tensor.dtype} {list(tensor.shape)}, not a "
                                           "2-D float weight")
                        packed, state = F.quantize_4bit(tensor, blocksize=blocksize, quant_type=quant_type,
                                                        compress_statistics=double_quant)
                        w = tensor.float()
                        err = (F.dequantize_4bit(packed, state).float() - w)
                        layers.append({"name": module, "shape": list(tensor.shape), "dtype": str(tensor.dtype),
                                       "rel_error": float(err.norm() / w.norm().clamp_min(1e-30)),
                                       "max_abs_error": float(err.abs().max())})
                        del w, err
                        out[key] = packed
                        for k, v in state.as_dict(packed=True).items():
                            out[f"{key}.{k}"] = v
                        done.add(module)
                    del tensor
                    bar.advance(task)
            save_file(out, str(dst / name), metadata={"format": "pt"})
            for key, t in out.items():
                weight_map[key] = name
                total["out_bytes"] += t.numel() * t.element_size()
            del out
    missing = sorted(chosen_set - done)
    if missing:
        raise CliError(f"{src}: no weight entry for linear layer(s) {missing[:5]} in the checkpoint")
    if index is not None:
        (dst / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total["out_bytes"]},
                                             "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    opts = QuantOptions(quant_type, double_quant, DTYPES[compute_dtype], torch.uint8, tuple(kept))
    config["quantization_config"] = opts.to_bnb_dict()
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for item in sorted(Path(src).iterdir()):  # tokenizer, sentence-transformers files, ...
        if item.name in ("config.json", INDEX_FILE) or item.name in files or item.suffix == ".safetensors":
            continue
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, dst / item.name)
    return {"src": str(src), "quant_type": quant_type, "double_quant": double_quant, "blocksize": blocksize,
            "compute_dtype": compute_dtype, "quantized": len(layers), "kept": kept, "layers": layers,
            "shards": len(files), "input_bytes": total["float_bytes"], "output_bytes": total["out_bytes"],
            "peak_rss_bytes": rss.peak_bytes,
            "largest_shard_bytes": max((src / name).stat().st_size for name in files)}


def layer_table(layers: list[dict], limit: int) -> Table:
    worst = sorted(layers, key=lambda r: -r["rel_error"])[:limit]
    table = Table(title=f"Per-layer error ({len(layers)} layers; the {len(worst)} worst, then all-layer stats)")
    for col in ("layer", "shape", "rel. error ||W-Q||/||W||", "max |W-Q|"):
        table.add_column(col, justify="left" if col == "layer" else "right", overflow="fold")
    for r in worst:
        table.add_row(r["name"], "x".join(map(str, r["shape"])), f"{r['rel_error']:.4f}", f"{r['max_abs_error']:.3g}")
    errs = [r["rel_error"] for r in layers]
    table.add_section()
    table.add_row("all layers: mean / min / max", "", f"{sum(errs) / len(errs):.4f} / {min(errs):.4f} / "
                  f"{max(errs):.4f}", "")
    return table


@click.command("quantize")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--quant-type", type=click.Choice(["nf4", "fp4"]), default="nf4", show_default=True)
@click.option("--double-quant/--no-double-quant", default=True, show_default=True,
              help="quantize the absmax statistics too (QLoRA's double quantization)")
@click.option("--blocksize", type=click.Choice(["32", "64", "128", "256", "512", "1024", "2048", "4096"]),
              default="64", show_default=True, help="elements per absmax block (transformers loads 64 only)")
@click.option("--compute-dtype", type=click.Choice(sorted(DTYPES)), default="bfloat16", show_default=True,
              help="bnb_4bit_compute_dtype written to config.json")
@click.option("--include", multiple=True, metavar="PATTERN",
              help="quantize only linear layers matching (name, dotted suffix or glob); repeatable")
@click.option("--exclude", multiple=True, metavar="PATTERN", help="keep matching linear layers in full precision")
@click.option("--overwrite", is_flag=True, help="replace DST if it exists")
@click.option("--top", type=click.IntRange(min=0), default=10, show_default=True, help="worst layers to list")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="also write the report as JSON")
@click.option("--no-progress", is_flag=True)
def quantize_cmd(src, dst, quant_type, double_quant, blocksize, compute_dtype, include, exclude, overwrite, top,
                 json_out, no_progress):
    """Quantize the linear layers of the Hugging Face checkpoint SRC to 4 bits, into DST.

    DST loads as it is with transformers + bitsandbytes (AutoModel*.from_pretrained) and
    with fourbit.integrations.transformers.from_pretrained. One shard is in memory at a
    time; the peak RSS of the run is measured and printed."""
    require_dir(src, "SRC", "config.json")
    blocksize = int(blocksize)
    if blocksize != 64:
        console.print(f"[yellow]note:[/] blocksize {blocksize}: bitsandbytes and fourbit load it; "
                      "transformers' loader expects 64")
    with atomic_dir(dst, overwrite) as tmp:
        report = quantize_checkpoint(src, tmp, quant_type=quant_type, double_quant=double_quant, blocksize=blocksize,
                                     compute_dtype=compute_dtype, include=include, exclude=exclude,
                                     progress=not no_progress)
    report["dst"] = str(dst)
    if top:
        console.print(layer_table(report["layers"], top))
    console.print(f"quantized {report['quantized']} linear layers to {quant_type.upper()} (blocksize {blocksize}"
                  f"{', double quant' if double_quant else ''}); kept {len(report['kept'])} in full precision"
                  + (f" ({', '.join(report['kept'][:4])}{', ...' if len(report['kept']) > 4 else ''})"
                     if report["kept"] else ""))
    console.print(f"tensors: {fmt_bytes(report['input_bytes'])} -> {fmt_bytes(report['output_bytes'])} "
                  f"({report['input_bytes'] / max(1, report['output_bytes']):.2f}x smaller) in {report['shards']} "
                  f"shard(s); peak RSS above start {fmt_bytes(report['peak_rss_bytes'])} "
                  f"(largest shard {fmt_bytes(report['largest_shard_bytes'])})")
    console.print(f"wrote {dst}")
    if json_out:
        Path(json_out).write_text(json.dumps(report, indent=2) + "\n")
