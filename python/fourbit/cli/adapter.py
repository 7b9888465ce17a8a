"""LoRA adapters on disk in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``
with ``base_model.model.<module>.lora_A.weight`` keys), written from fourbit's LoRA layers and
read back for ``merge``, ``inspect`` and resuming."""

from __future__ import annotations

import json
from pathlib import Path

import torch

import fourbit

from ._common import EXIT_INPUT, CliError

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


def save_adapter(model: torch.nn.Module, out_dir: Path, *, r: int, lora_alpha: float, lora_dropout: float,
                 base_model: str, task_type: str) -> None:
    from safetensors.torch import save_file

    tensors = {PREFIX + k: v.contiguous().clone() for k, v in fourbit.nn.lora_state_dict(model).items()}
    modules = sorted({k[len(PREFIX):].rsplit(".lora_", 1)[0] for k in tensors})
    save_file(tensors, str(Path(out_dir) / WEIGHTS), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model, "r": r,
              "lora_alpha": lora_alpha, "lora_dropout": lora_dropout, "target_modules": modules, "bias": "none",
              "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True, "inference_mode": True,
              "modules_to_save": None}
    (Path(out_dir) / CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def read_adapter(path: Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(adapter_config, {module name: {"A": lora_A weight, "B": lora_B weight}}) of a PEFT LoRA
    adapter directory; every problem is a CliError naming the file and the key."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / CONFIG).is_file():
        raise CliError(f"ADAPTER {str(path)!r} has no {CONFIG}", EXIT_INPUT)
    try:
        config = json.loads((path / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise CliError(f"{path / CONFIG}: malformed JSON ({e})", EXIT_INPUT) from None
    if config.get("peft_type", "LORA") != "LORA":
        raise CliError(f"{path / CONFIG}: peft_type {config.get('peft_type')!r} is not LORA", EXIT_INPUT)
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or config[key] <= 0:
            raise CliError(f"{path / CONFIG}: {key} must be a positive number, got {config.get(key)!r}", EXIT_INPUT)
    if config.get("alpha_pattern"):
        raise CliError(f"{path / CONFIG}: alpha_pattern {config['alpha_pattern']!r} is not supported", EXIT_INPUT)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise CliError(f"ADAPTER {str(path)!r} has no {WEIGHTS}", EXIT_INPUT)
    try:
        raw = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise CliError(f"{weights}: not a readable safetensors file ({e})", EXIT_INPUT) from None
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in raw.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        for part, tag in ((".lora_A.", "A"), (".lora_B.", "B")):
            if part in name:
                module = name.split(part)[0]
                module = module[: -len(".default")] if module.endswith(".default") else module
                layers.setdefault(module, {})[tag] = value
                break
        else:
            raise CliError(f"{weights}: entry {key!r} is not a LoRA weight (only lora_A/lora_B merge)", EXIT_INPUT)
    for module, ab in layers.items():
        if set(ab) != {"A", "B"}:
            raise CliError(f"{weights}: layer {module!r} has lora_{'A' if 'A' in ab else 'B'} only", EXIT_INPUT)
        if ab["A"].shape[0] != ab["B"].shape[1]:
            raise CliError(f"{weights}: layer {module!r}: lora_A {list(ab['A'].shape)} and lora_B "
                           f"{list(ab['B'].shape)} disagree on the rank", EXIT_INPUT)
    return config, layers


def scaling(config: dict, rank: int) -> float:
    """PEFT's scaling of a layer of rank ``rank``: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    alpha = config["lora_alpha"]
    return alpha / (rank ** 0.5) if config.get("use_rslora") else alpha / rank
