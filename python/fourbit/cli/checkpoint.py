"""Hugging Face checkpoint directories as the CLI reads and writes them: the safetensors
shards (``model.safetensors`` or the files of ``model.safetensors.index.json``), the model
built on the meta device to learn which modules are linear layers, and module-name patterns."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Optional

import torch

from ..integrations.shards import INDEX_FILE, check_shard_names
from ._common import EXIT_INPUT, CliError

SINGLE = "model.safetensors"


def shard_files(path: Path) -> tuple[list[str], Optional[dict]]:
    """(shard file names in order, the index dict or None) of a checkpoint directory."""
    path = Path(path)
    if (path / INDEX_FILE).is_file():
        try:
            index = json.loads((path / INDEX_FILE).read_text())
            weight_map = index["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CliError(f"{path / INDEX_FILE}: not a safetensors index ({e})", EXIT_INPUT) from None
        try:
            check_shard_names(str(path), weight_map)
        except ValueError as e:
            raise CliError(str(e), EXIT_INPUT) from None
        files = list(dict.fromkeys(weight_map.values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise CliError(f"{path}: shard(s) {missing} listed in {INDEX_FILE} are missing", EXIT_INPUT)
        return files, index
    if (path / SINGLE).is_file():
        return [SINGLE], None
    raise CliError(f"{path}: no {SINGLE} or {INDEX_FILE} (only safetensors checkpoints are read)", EXIT_INPUT)


def read_config(path: Path) -> dict:
    try:
        return json.loads((Path(path) / "config.json").read_text())
    except FileNotFoundError:
        raise CliError(f"{path}: no config.json", EXIT_INPUT) from None
    except json.JSONDecodeError as e:
        raise CliError(f"{path}/config.json: malformed JSON ({e})", EXIT_INPUT) from None


def meta_model(path: Path):
    """The transformers model of ``path``'s config.json, parameters on the meta device."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CliError(f"{path}/config.json: transformers cannot read it ({e})", EXIT_INPUT) from None
    from fourbit.integrations.transformers import model_class_of

    try:
        cls = model_class_of(config)
    except ValueError as e:
        raise CliError(f"{path}/config.json: {e}", EXIT_INPUT) from None
    with torch.device("meta"):
        return cls._from_config(config)


def matches(name: str, pattern: str) -> bool:
    """``pattern`` names module ``name``: equal, a dotted suffix ("q_proj", "attn.q_proj") or a
    shell glob of the name or of a dotted suffix ("layers.1.*", "mlp.*")."""
    return (name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)
            or fnmatch.fnmatchcase(name, "*." + pattern))


def linear_modules(model) -> list[str]:
    """Names of the exact ``nn.Linear`` modules (and transformers' ``Conv1D``) of ``model``."""
    from transformers.pytorch_utils import Conv1D

    return [n for n, m in model.named_modules() if type(m) in (torch.nn.Linear, Conv1D)]


def key_to_module(key: str, modules: set[str], prefix: str) -> Optional[str]:
    """The module of ``modules`` whose weight the checkpoint entry ``key`` is, if any; checkpoints
    of a head model may carry the base model's ``prefix`` or not."""
    if not key.endswith(".weight"):
        return None
    name = key[: -len(".weight")]
    for candidate in (name, name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else None,
                      f"{prefix}.{name}" if prefix else None):
        if candidate in modules:
            return candidate
    return None


def open_shard(path: Path):
    """``safe_open`` on one file; a corrupt or truncated file is a CliError that names it."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise CliError(f"{path}: not a readable safetensors file ({e})", EXIT_INPUT) from None


def safetensors_header(path: Path) -> tuple[bytes, dict, int]:
    """(raw header bytes with their 8-byte length, header dict, offset of the data section) of a
    safetensors file, read and checked without touching the data; a corrupt or truncated file is a
    CliError that names it."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        n = int.from_bytes(raw_len, "little") if len(raw_len) == 8 else -1
        if n <= 0 or n > size - 8:
            raise CliError(f"{path}: not a safetensors file (header length {n}, file size {size})", EXIT_INPUT)
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CliError(f"{path}: corrupt safetensors header ({e})", EXIT_INPUT) from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CliError(f"{path}: truncated ({size} bytes, the header describes {8 + n + end})", EXIT_INPUT)
    return raw_len + raw, header, 8 + n
