"""The training recipe of ``fourbit train`` as one dataclass: every field is a YAML key and a
command-line flag (``lora_r`` <-> ``--lora-r``); flags win over the file. Unknown keys, wrong
types and out-of-range values are errors that name the key and the value."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import click

from ._common import EXIT_INPUT, EXIT_USAGE, CliError

TASKS = ("causal_lm", "contrastive")
OPTIMIZERS = ("paged_adamw_8bit", "adamw_8bit", "paged_adamw", "adamw")
SCHEDULES = ("cosine", "linear", "constant")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class TrainConfig:
    """Keys of a ``fourbit train`` YAML file (see docs/cli.md for a commented example)."""

    model: str = field(default="", metadata={"help": "model directory (float, or 4-bit from `fourbit quantize`); "
                                                     "'minilm' is the packaged all-MiniLM-L6-v2"})
    output_dir: str = field(default="", metadata={"help": "checkpoints and the final adapter go here"})
    task: str = field(default="causal_lm", metadata={"help": "causal_lm or contrastive", "choices": TASKS})
    data: str = field(default="", metadata={"help": "training JSONL: `text`, or instruction/input/response "
                                                    "(causal_lm); technical/plain pairs (contrastive)"})
    eval_data: str = field(default="", metadata={"help": "held-out JSONL (contrastive: retrieval before/after)"})
    reference_model: str = field(default="", metadata={"help": "float model to compare with (contrastive)"})
    prompt_template: str = field(default="alpaca", metadata={"help": "alpaca, or a Python format string with "
                                                                     "{instruction} and {input}"})
    train_on_prompt: bool = field(default=False, metadata={"help": "also compute the loss on the prompt tokens"})
    quant_type: str = field(default="nf4", metadata={"choices": ("nf4", "fp4")})
    double_quant: bool = True
    compute_dtype: str = field(default="float32", metadata={"choices": DTYPES, "help": "4-bit matmul dtype"})
    precision: str = field(default="float32", metadata={"choices": DTYPES,
                                                        "help": "dtype of the model's float weights/activations"})
    prepare_kbit: bool = field(default=True, metadata={"help": "apply prepare_model_for_kbit_training"})
    lora_r: int = field(default=8, metadata={"min": 1})
    lora_alpha: float = field(default=16.0, metadata={"min": 0})
    lora_dropout: float = field(default=0.05, metadata={"min": 0, "max": 0.999})
    lora_targets: list = field(default_factory=lambda: ["all-linear"],
                               metadata={"help": "module-name patterns given LoRA; all-linear: every 4-bit layer"})
    seq_len: int = field(default=256, metadata={"min": 2})
    batch_size: int = field(default=4, metadata={"min": 1})
    grad_accum: int = field(default=1, metadata={"min": 1})
    lr: float = field(default=2e-4, metadata={"min": 0})
    lr_schedule: str = field(default="cosine", metadata={"choices": SCHEDULES})
    warmup_ratio: float = field(default=0.03, metadata={"min": 0, "max": 1})
    weight_decay: float = field(default=0.0, metadata={"min": 0})
    max_steps: int = field(default=100, metadata={"min": 1, "help": "optimizer steps"})
    optimizer: str = field(default="paged_adamw_8bit", metadata={"choices": OPTIMIZERS})
    grad_ckpt: bool = field(default=True, metadata={"help": "gradient checkpointing (causal_lm)"})
    scale: float = field(default=20.0, metadata={"min": 0, "help": "inverse temperature (contrastive)"})
    min_cosine: float = field(default=0.0, metadata={"min": -1, "max": 1,
                                                     "help": "contrastive: fail (exit 5) if the 4-bit model's mean "
                                                             "cosine to reference_model's embeddings is lower"})
    seed: int = 0
    log_steps: int = field(default=10, metadata={"min": 1})
    save_steps: int = field(default=0, metadata={"min": 0, "help": "checkpoint every N steps (0: only at the end)"})
    threads: int = field(default=0, metadata={"min": 0, "help": "torch CPU threads (0: all available)"})


def _base_type(f: dataclasses.Field):
    return {"str": str, "int": int, "float": float, "bool": bool, "list": list}[
        f.type if isinstance(f.type, str) else f.type.__name__]


def coerce(key: str, value: Any) -> Any:
    """``value`` as the type of key ``key``, range- and choice-checked."""
    spec = {f.name: f for f in fields(TrainConfig)}
    if key not in spec:
        close = [k for k in spec if k.split("_")[0] == key.split("_")[0]]
        raise CliError(f"unknown config key {key!r}" + (f" (did you mean {close}?)" if close else "")
                       + f"; known keys: {', '.join(spec)}", EXIT_USAGE)
    f = spec[key]
    kind = _base_type(f)
    bad = CliError(f"config key {key!r}: expected {kind.__name__}, got {value!r}", EXIT_USAGE)
    if kind is bool:
        if not isinstance(value, bool):
            raise bad
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        value = float(value)
    elif kind is str:
        if not isinstance(value, str):
            raise bad
    elif kind is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            raise CliError(f"config key {key!r}: expected a non-empty list of names, got {value!r}", EXIT_USAGE)
    meta = f.metadata
    if "choices" in meta and value not in meta["choices"]:
        raise CliError(f"config key {key!r}: {value!r} is not one of {list(meta['choices'])}", EXIT_USAGE)
    if "min" in meta and value < meta["min"] or "max" in meta and value > meta["max"]:
        raise CliError(f"config key {key!r}: {value!r} is outside [{meta.get('min', '-inf')}, "
                       f"{meta.get('max', 'inf')}]", EXIT_USAGE)
    return value


def load_config(path: Optional[Path], overrides: dict[str, Any]) -> TrainConfig:
    """The YAML file's keys (if a path is given), then ``overrides`` (flags given), checked."""
    import yaml

    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise CliError(f"config file {str(path)!r} does not exist", EXIT_INPUT)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise CliError(f"{path}: malformed YAML ({e})".replace("\n", " "), EXIT_USAGE) from None
        if not isinstance(raw, dict):
            raise CliError(f"{path}: the top level must be a mapping of keys to values, got "
                           f"{type(raw).__name__}", EXIT_USAGE)
    values = {k: coerce(str(k), v) for k, v in raw.items()}
    values.update({k: coerce(k, v) for k, v in overrides.items()})
    cfg = TrainConfig(**values)
    for key in ("model", "output_dir", "data"):
        if not getattr(cfg, key):
            raise CliError(f"config key {key!r} is required (in the YAML file or as --{key.replace('_', '-')})",
                           EXIT_USAGE)
    if cfg.task == "contrastive" and cfg.batch_size < 2:
        raise CliError(f"config key 'batch_size': contrastive training needs >= 2 pairs, got {cfg.batch_size}",
                       EXIT_USAGE)
    return cfg


def config_options(command):
    """Adds one flag per TrainConfig field to a click command (default None: not given)."""
    for f in reversed(fields(TrainConfig)):
        flag = "--" + f.name.replace("_", "-")
        kind = _base_type(f)
        help_ = f.metadata.get("help", "")
        if kind is bool:
            opt = click.option(f"{flag}/--no-{flag[2:]}", f.name, default=None, help=help_)
        elif kind is list:
            opt = click.option(flag, f.name, default=None, help=(help_ + " (comma-separated)").strip())
        else:
            choices = f.metadata.get("choices")
            opt = click.option(flag, f.name, type=click.Choice(choices) if choices else kind, default=None,
                               help=help_)
        command = opt(command)
    return command


def flags_given(params: dict) -> dict:
    names = {f.name for f in fields(TrainConfig)}
    return {k: v for k, v in params.items() if k in names and v is not None}


__all__ = ["TrainConfig", "load_config", "config_options", "flags_given", "coerce"]
