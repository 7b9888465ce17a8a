"""Hugging Face checkpoint directories as the CLI reads and writes them: the safetensors
shards (``model.safetensors`` or the files of ``model.safetensors.index.json``), the model
built on the meta device to learn which modules are linear layers, and module-name patterns."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Optional

import torch

from ._common import EXIT_INPUT, CliError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def shard_files(path: Path) -> tuple[list[str], Optional[dict]]:
    """(shard file names in order, the index dict or None) of a checkpoint directory."""
    path = Path(path)
    if (path / INDEX).is_file():
        try:
            index = json.loads((path / INDEX).read_text())
            weight_map = index["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CliError(f"{path / INDEX}: not a safetensors index ({e})", EXIT_INPUT) from None
        from fourbit.integrations.transformers import check_shard_names

        try:
            check_shard_names(str(path), weight_map)
        except ValueError as e:
            raise CliError(str(e), EXIT_INPUT) from None
        files = list(dict.fromkeys(weight_map.values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise CliError(f"{path}: shard(s) {missing} listed in {INDEX} are missing", EXIT_INPUT)
        return files, index
    if (path / SINGLE).is_file():
        return [SINGLE], None
    raise CliError(f"{path}: no {SINGLE} or {INDEX} (only safetensors checkpoints are read)", EXIT_INPUT)


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
