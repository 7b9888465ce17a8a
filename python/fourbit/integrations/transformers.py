"""Hugging Face transformers checkpoints in and out of fourbit 4-bit layers.

``from_pretrained(path, quantization_config)`` loads a local checkpoint directory
(``config.json`` + ``model.safetensors``, or shards listed in
``model.safetensors.index.json``) straight into ``fourbit.nn.Linear4bit`` layers:

1. the model is built from its config with every *parameter* on the meta device (buffers,
   which are small and often computed in ``__init__``, such as rotary frequencies, stay
   real), so no float weight is allocated;
2. the linear layers to quantize become empty ``Linear4bit`` layers (on meta);
3. the checkpoint is checked from the safetensors headers alone (missing, unexpected and
   mis-shaped entries, packed sizes of 4-bit entries) before any tensor is read;
4. tensors are then read one module at a time (``safe_open`` maps the files; a read copies
   one tensor) and each linear weight is quantized on ``device`` as it arrives, so the
   memory in use is the 4-bit model built so far plus one float layer.

The options are those of transformers' ``BitsAndBytesConfig`` (an instance, its dict, or
keyword arguments), with the same defaults and the same choice of layers: every exact
``nn.Linear`` (and transformers' ``Conv1D``) except ``llm_int8_skip_modules`` (by default
transformers' own list: the output head, tied modules and the last module) and
``_keep_in_fp32_modules``, with transformers' name matching. A weight tied to another
parameter is never quantized (the embedding it shares cannot be 4-bit).

A directory that transformers saved with bitsandbytes 4-bit quantization (its config has a
``quantization_config`` with ``quant_method: "bitsandbytes"``) loads as it is: the packed
bytes and statistics are taken unchanged, the layers to build are read from the checkpoint
(a module with a ``weight.quant_state.bitsandbytes__*`` entry is 4-bit, any other stays
float), and options passed by the caller are checked but not used, with a warning, as in
transformers.

``save_pretrained(model, path)`` writes the checkpoint transformers + bitsandbytes load:
``config.json`` with the ``quantization_config`` transformers writes, and safetensors with
bitsandbytes' keys and bytes (fourbit's ``Linear4bit.state_dict``).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Union

import torch
from torch import nn

try:
    import transformers
    from safetensors import SafetensorError, safe_open
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module
except ImportError as e:  # fail loudly: this module is the transformers integration
    raise ImportError(f"fourbit.integrations.transformers needs transformers (5.x) and safetensors: {e}") from e

from ..functional import _dtype_name
from ..nn.convert import _set_submodule
from ..nn.linear import _COMPUTE_DTYPES, _QS_KEY_PREFIX, Linear4bit
from ..nn.lora import LoraLinear4bit
from ..nn.params import Params4bit, _check_quant_storage
from .shards import INDEX_FILE, read_weight_map

__all__ = ["from_pretrained", "save_pretrained", "QuantOptions"]

_SINGLE_FILE = "model.safetensors"
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# safetensors header dtype names -> torch dtypes (the float ones we read, plus what packs 4-bit codes).
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
              "BOOL": torch.bool}
# Checkpoints often still hold buffers that were persistent once (transformers skips them too).
_STALE_BUFFER_PATTERNS = (r"rotary_emb\.inv_freq$", r"(^|\.)position_ids$")

# ---------------------------------------------------------------------------------------- options

# BitsAndBytesConfig.to_dict() keys. The 8-bit-only knobs below have no effect on 4-bit loading
# in transformers either, so any value is accepted and ignored.
_IGNORED_8BIT_KEYS = ("llm_int8_threshold", "llm_int8_has_fp16_weight")
_KNOWN_KEYS = ("load_in_4bit", "load_in_8bit", "_load_in_4bit", "_load_in_8bit", "quant_method",
               "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype",
               "bnb_4bit_quant_storage", "llm_int8_skip_modules", "llm_int8_enable_fp32_cpu_offload",
               *_IGNORED_8BIT_KEYS)


@dataclass(frozen=True)
class QuantOptions:
    """The 4-bit options fourbit honours, with ``BitsAndBytesConfig``'s defaults."""

    quant_type: str = "fp4"
    use_double_quant: bool = False
    compute_dtype: torch.dtype = torch.float32
    quant_storage: torch.dtype = torch.uint8
    skip_modules: Optional[tuple[str, ...]] = None

    def to_bnb_dict(self) -> dict[str, Any]:
        """The ``quantization_config`` entry transformers writes to ``config.json``."""
        return {
            "_load_in_4bit": True, "_load_in_8bit": False,
            "bnb_4bit_compute_dtype": _dtype_name(self.compute_dtype),
            "bnb_4bit_quant_storage": _dtype_name(self.quant_storage),
            "bnb_4bit_quant_type": self.quant_type,
            "bnb_4bit_use_double_quant": self.use_double_quant,
            "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
            "llm_int8_skip_modules": None if self.skip_modules is None else list(self.skip_modules),
            "llm_int8_threshold": 6.0, "load_in_4bit": True, "load_in_8bit": False,
            "quant_method": "bitsandbytes",
        }


def _to_dtype(value, name: str) -> torch.dtype:
    """A torch dtype from a dtype or its name ("bfloat16", "torch.bfloat16")."""
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        dtype = getattr(torch, value.removeprefix("torch."), None)
        if isinstance(dtype, torch.dtype):
            return dtype
    raise ValueError(f"{name} must be a torch dtype or its name (e.g. 'bfloat16'), got {value!r}")


def _as_dict(quantization_config, name: str = "quantization_config") -> dict[str, Any]:
    if quantization_config is None:
        return {}
    if isinstance(quantization_config, dict):
        return dict(quantization_config)
    to_dict = getattr(quantization_config, "to_dict", None)
    if callable(to_dict) and hasattr(quantization_config, "quant_method"):
        return to_dict()
    raise ValueError(f"{name} must be None, a transformers.BitsAndBytesConfig or a dict of its options, "
                     f"got {type(quantization_config).__name__}")


def _bool_option(options: dict, key: str, default: bool) -> bool:
    value = options.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be True or False, got {value!r}")
    return value


def parse_quantization_config(quantization_config=None, **options) -> QuantOptions:
    """``QuantOptions`` from a ``BitsAndBytesConfig``, its dict and/or keyword arguments (which
    win over the config's entries). Raises ValueError naming an unknown option, a bad value,
    or an option fourbit cannot honour (8-bit loading, CPU offload, another quant_method)."""
    merged = _as_dict(quantization_config)
    merged.update(options)
    method = merged.get("quant_method", "bitsandbytes")
    if method not in ("bitsandbytes", "fourbit"):
        raise ValueError(f"quant_method must be 'bitsandbytes' or 'fourbit' (fourbit reads bitsandbytes' 4-bit "
                         f"format), got quant_method={method!r}")
    unknown = sorted(k for k in merged if k not in _KNOWN_KEYS)
    if unknown:
        raise ValueError(f"unknown quantization option(s) {unknown}; fourbit takes BitsAndBytesConfig's 4-bit "
                         f"options: {sorted(k for k in _KNOWN_KEYS if not k.startswith('_'))}")
    for key in ("load_in_8bit", "_load_in_8bit"):
        if _bool_option(merged, key, False):
            raise ValueError(f"{key}=True is not supported: fourbit loads 4-bit weights only "
                             "(use load_in_4bit=True)")
    for key in ("load_in_4bit", "_load_in_4bit"):
        if not _bool_option(merged, key, True):
            raise ValueError(f"{key}=False is not supported: fourbit only loads in 4 bits (load the float model "
                             "with transformers' from_pretrained instead)")
    if _bool_option(merged, "llm_int8_enable_fp32_cpu_offload", False):
        raise ValueError("llm_int8_enable_fp32_cpu_offload=True is not supported: fourbit loads the whole model on "
                         "one device (no device_map offload)")
    quant_type = merged.get("bnb_4bit_quant_type", "fp4")
    if quant_type not in ("fp4", "nf4"):
        raise ValueError(f"bnb_4bit_quant_type must be 'fp4' or 'nf4', got {quant_type!r}")
    double_quant = _bool_option(merged, "bnb_4bit_use_double_quant", False)
    compute = merged.get("bnb_4bit_compute_dtype")
    compute = torch.float32 if compute is None else _to_dtype(compute, "bnb_4bit_compute_dtype")
    if compute not in _COMPUTE_DTYPES:
        raise ValueError(f"bnb_4bit_compute_dtype must be float32, float16 or bfloat16, got {compute}")
    storage = _to_dtype(merged.get("bnb_4bit_quant_storage", torch.uint8), "bnb_4bit_quant_storage")
    _check_quant_storage(storage, "bnb_4bit_quant_storage")
    skip = merged.get("llm_int8_skip_modules")
    if skip is not None:
        if isinstance(skip, str) or not isinstance(skip, (list, tuple)) or not all(
                isinstance(s, str) and s for s in skip):
            raise ValueError(f"llm_int8_skip_modules must be None or a list of module names, got {skip!r}")
        skip = tuple(skip)
    return QuantOptions(quant_type, double_quant, compute, storage, skip)


# ---------------------------------------------------------------------------------------- checkpoint files

class _Checkpoint:
    """The safetensors files of a checkpoint directory, mapped (not read): key -> file, and
    each tensor's shape and dtype from the headers."""

    def __init__(self, path: str):
        index = os.path.join(path, INDEX_FILE)
        single = os.path.join(path, _SINGLE_FILE)
        if os.path.isfile(index):
            weight_map = read_weight_map(path)
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(single):
            weight_map, files = None, [_SINGLE_FILE]
        else:
            present = sorted(os.listdir(path))
            raise FileNotFoundError(f"{path}: no {_SINGLE_FILE} or {INDEX_FILE} (found {present}); fourbit loads "
                                    "safetensors checkpoints only (save with safe_serialization=True)")
        self.handles = {}
        self.file_of: dict[str, str] = {}
        for name in files:
            full = os.path.join(path, name)
            if not os.path.isfile(full):
                raise FileNotFoundError(f"{full}: listed in {INDEX_FILE} but missing; the checkpoint is incomplete")
            try:
                handle = safe_open(full, framework="pt", device="cpu")
            except (SafetensorError, OSError) as e:
                raise ValueError(f"{full}: not a readable safetensors file ({e}); the file is truncated or "
                                 "corrupt") from None
            self.handles[name] = handle
            for key in handle.keys():
                self.file_of[key] = name
        if weight_map is not None:
            lost = sorted(k for k, name in weight_map.items() if self.file_of.get(k) != name)
            if lost:
                raise ValueError(f"{path}: {len(lost)} tensor(s) listed in {INDEX_FILE} are not in their shard, "
                                 f"e.g. {lost[:3]}; the checkpoint is truncated")

    def keys(self):
        return self.file_of.keys()

    def shape(self, key: str) -> list[int]:
        return list(self.handles[self.file_of[key]].get_slice(key).get_shape())

    def dtype(self, key: str) -> Optional[torch.dtype]:
        return _ST_DTYPES.get(self.handles[self.file_of[key]].get_slice(key).get_dtype())

    def read(self, key: str) -> torch.Tensor:
        """One tensor, copied out of the mapped file."""
        return self.handles[self.file_of[key]].get_tensor(key)


# ---------------------------------------------------------------------------------------- model skeleton

def _params_on_meta():
    """A context in which every parameter registered on a module is replaced by a meta tensor
    (buffers are left real). nn.Linear's ``torch.empty`` weight is never written, so it costs
    no memory before it is dropped here."""

    class _Ctx:
        def __enter__(self):
            def to_meta(module, name, param):
                if param is None or param.device.type == "meta":
                    return None
                return type(param)(param.to("meta"), requires_grad=param.requires_grad)

            self.handle = nn.modules.module.register_module_parameter_registration_hook(to_meta)
            return self

        def __exit__(self, *exc):
            self.handle.remove()
            return False

    return _Ctx()


def model_class_of(config, model_class=None):
    if model_class is not None:
        if not (isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)):
            raise ValueError(f"model_class must be a transformers PreTrainedModel class, got {model_class!r}")
        return model_class
    names = getattr(config, "architectures", None) or []
    for name in names:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    raise ValueError(f"cannot pick the model class: config.architectures is {names!r} and none of them is a "
                     "transformers model class; pass model_class= (e.g. transformers.LlamaForCausalLM)")


def _resolve_dtype(dtype, torch_dtype, config, checkpoint: _Checkpoint) -> torch.dtype:
    """transformers 5's rule: "auto" is config.dtype, else the checkpoint's first float dtype."""
    if torch_dtype is not None:
        if dtype not in ("auto", None) and _to_dtype(dtype, "dtype") != _to_dtype(torch_dtype, "torch_dtype"):
            raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; pass only dtype")
        dtype = torch_dtype
    if dtype is None or dtype == "auto":
        dtype = getattr(config, "dtype", None)
        if dtype is None:
            dtype = next((d for k in checkpoint.keys() if (d := checkpoint.dtype(k)) in _FLOAT_DTYPES),
                         torch.get_default_dtype())
        name = "config.dtype"
    else:
        name = "dtype"
    dtype = _to_dtype(dtype, name)
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {dtype}")
    return dtype


def _linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a transformers Conv1D (weight [in, out])."""
    if isinstance(module, Conv1D):
        in_features, out_features = module.weight.shape
        return in_features, out_features
    return module.in_features, module.out_features


def _is_convertible(module: nn.Module) -> bool:
    return type(module) is nn.Linear or isinstance(module, Conv1D)


# ---------------------------------------------------------------------------------------- loading

@dataclass
class _Plan:
    """What ``_load`` reads into the model ``_plan`` built and checked."""

    model: nn.Module
    quantized: dict[str, str]  # module name -> "quantize" (float checkpoint) or "load" (4-bit entries)
    present: dict[str, str]  # model key -> checkpoint key
    tied: dict[str, list[str]]  # first parameter name -> the other names sharing it


def _key_map(model: nn.Module, model_keys: set[str], ckpt_keys) -> dict[str, str]:
    """checkpoint key -> model key, with transformers' base-model-prefix rule: a base model
    (``LlamaModel``) loads a checkpoint saved from a head model (keys under ``model.``; the
    head's own entries are ignored), and a head model loads a base checkpoint (keys without
    the prefix)."""
    prefix = getattr(model, "base_model_prefix", "") + "."
    if prefix == ".":
        return {k: k for k in ckpt_keys}
    ckpt_has = any(k.startswith(prefix) for k in ckpt_keys)
    model_has = any(k.startswith(prefix) for k in model_keys)
    if ckpt_has and not model_has:
        return {k: k[len(prefix):] for k in ckpt_keys if k.startswith(prefix)}
    if model_has and not ckpt_has:
        def owner(key):  # the model entry a key belongs to ("x.weight" for "x.weight.absmax")
            return key.split(".weight.")[0] + ".weight" if ".weight." in key else key
        return {k: prefix + k if prefix + owner(k) in model_keys else k for k in ckpt_keys}
    return {k: k for k in ckpt_keys}


# Keyword arguments that are quantization options (BitsAndBytesConfig's); every other keyword
# of from_pretrained is one of transformers' loading arguments.
_OPTION_PREFIXES = ("bnb_4bit_", "llm_int8_", "load_in_", "_load_in_", "quant_method")
# Loading arguments that also locate the config (AutoConfig.from_pretrained takes them too).
_HUB_KWARGS = ("revision", "token", "trust_remote_code", "cache_dir", "local_files_only", "subfolder",
               "force_download", "proxies")


def from_pretrained(path: Union[str, os.PathLike], quantization_config=None, *, dtype="auto", torch_dtype=None,
                    device=None, model_class=None, **options) -> nn.Module:
    """Loads a Hugging Face checkpoint into a model whose linear layers are fourbit
    ``Linear4bit`` (module docstring for the steps and the choice of layers).

    Args:
        path: directory with ``config.json`` and ``model.safetensors`` (or shards + index).
        quantization_config: a ``fourbit.FourbitConfig``, a ``transformers.BitsAndBytesConfig``
            or a dict of its options; option keywords (``bnb_4bit_*``, ``llm_int8_*``,
            ``load_in_*``) are the same options (they win). Defaults are
            ``BitsAndBytesConfig``'s: ``bnb_4bit_quant_type="fp4"``, no double quantization,
            float32 compute, uint8 storage (QLoRA uses ``"nf4"`` + ``use_double_quant=True``).
            Ignored (with a warning) for a checkpoint that is already 4-bit.
        dtype: dtype of the float parameters and of the quantized weights' ``quant_state``:
            ``"auto"`` (default, as transformers 5: ``config.dtype``, else the checkpoint's),
            a torch dtype or its name. ``torch_dtype`` is its old name.
        device: where the model is built and each weight quantized (default CPU).
        model_class: the transformers class to build; default: the first of
            ``config.architectures`` that transformers has (e.g. ``LlamaForCausalLM``).
        any other keyword (``device_map``, ``attn_implementation``, ``low_cpu_mem_usage``,
            ``trust_remote_code``, ``revision``, ...): the model is then loaded by
            transformers' own ``from_pretrained`` through fourbit's registered quantizer
            (``fourbit.integrations.hf_quantizer``), with those arguments; ``path`` may then
            be a Hub name.

    Returns the model in eval mode with ``is_loaded_in_4bit = True`` (what PEFT looks for),
    ``model.dequantize()`` working, ``num_parameters()`` counting 4-bit weights at their real
    size, and ``config.quantization_config`` set to the options used (so ``save_pretrained``
    round-trips).

    Raises:
        FileNotFoundError: no directory, no config.json, no safetensors file, a missing shard.
        ValueError: a bad option (naming it and its value), a truncated or corrupt file,
            missing, unexpected or mis-shaped checkpoint entries (named), a non-bitsandbytes
            quantized checkpoint, a shard outside the directory, an error while filling a
            layer (naming the layer). Everything but the last is checked before any tensor is
            read.
    """
    path = os.fspath(path)
    loader_kwargs = {k: options.pop(k) for k in list(options) if not k.startswith(_OPTION_PREFIXES)}
    if loader_kwargs:
        return _from_pretrained_by_transformers(path, quantization_config, options, dtype, torch_dtype, device,
                                                model_class, loader_kwargs)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"path {path!r} is not a directory (fourbit loads local checkpoint directories)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path}: no config.json")
    user = parse_quantization_config(quantization_config, **options)
    device = torch.device("cpu" if device is None else device)
    if device.type == "meta":
        raise ValueError("device must be a real device, got device='meta'")
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    saved = getattr(config, "quantization_config", None)
    if saved is not None:
        opts = parse_quantization_config(_as_dict(saved, "config.json quantization_config"))
        if quantization_config is not None or options:
            _warn_options_ignored(path)
    else:
        opts = user
    checkpoint = _Checkpoint(path)
    dtype = _resolve_dtype(dtype, torch_dtype, config, checkpoint)
    cls = model_class_of(config, model_class)

    with _params_on_meta():
        model = cls._from_config(config, dtype=dtype)
    for module in model.modules():  # buffers were built on the CPU
        for name, buf in module._buffers.items():
            if buf is not None and buf.device != device:
                module._buffers[name] = buf.to(device)

    plan = _plan(model, checkpoint, opts, pre_quantized=saved is not None)
    _load(plan, checkpoint, dtype, device)
    model.config.quantization_config = opts.to_bnb_dict()
    _attach_quantizer(model, opts)
    return model.eval()


def _warn_options_ignored(path: str) -> None:
    warnings.warn(f"{path} is already quantized with bitsandbytes 4-bit: its own quantization_config is "
                  "used and the options passed are ignored (as transformers does)", UserWarning, stacklevel=3)


def _attach_quantizer(model: nn.Module, opts: QuantOptions) -> None:
    """What transformers' loader gives a model loaded through fourbit's quantizer: the
    quantizer (``dequantize()``, the Trainer's checks), ``is_quantized``, ``is_loaded_in_4bit``
    and counting methods that know 4-bit weights."""
    from .hf_quantizer import QUANT_METHOD, FourbitConfig, FourbitHfQuantizer, mark_loaded_in_4bit

    model.hf_quantizer = FourbitHfQuantizer(FourbitConfig(**opts.to_bnb_dict()), pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    mark_loaded_in_4bit(model)


def _from_pretrained_by_transformers(path: str, quantization_config, options: dict, dtype, torch_dtype, device,
                                     model_class, loader_kwargs: dict) -> nn.Module:
    """``from_pretrained`` through transformers' own loader and fourbit's registered quantizer."""
    from .hf_quantizer import FourbitConfig

    user = parse_quantization_config(quantization_config, **options)
    config = transformers.AutoConfig.from_pretrained(path, **{k: loader_kwargs[k] for k in _HUB_KWARGS
                                                              if k in loader_kwargs})
    saved = getattr(config, "quantization_config", None)
    kwargs = dict(loader_kwargs)
    if saved is not None:  # bitsandbytes' config on disk: read it with fourbit's quantizer instead
        config.quantization_config = FourbitConfig(**_as_dict(saved, "config.json quantization_config")
                                                   ).to_loader_dict()
        if quantization_config is not None or options:
            _warn_options_ignored(path)
    else:
        kwargs["quantization_config"] = FourbitConfig(**user.to_bnb_dict())
    if torch_dtype is not None:
        if dtype not in ("auto", None) and _to_dtype(dtype, "dtype") != _to_dtype(torch_dtype, "torch_dtype"):
            raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; pass only dtype")
        dtype = torch_dtype
    if device is not None:
        if "device_map" in kwargs:
            raise ValueError(f"pass device or device_map, not both (got device={device!r} and "
                             f"device_map={kwargs['device_map']!r})")
        kwargs["device_map"] = {"": torch.device(device)}
    model = model_class_of(config, model_class).from_pretrained(path, config=config, dtype=dtype, **kwargs)
    return model.eval()


def _plan(model: nn.Module, checkpoint: _Checkpoint, opts: QuantOptions, pre_quantized: bool) -> _Plan:
    """Replaces the linear layers to quantize by meta Linear4bit layers and checks the whole
    checkpoint against the model from the headers. Nothing is read yet."""
    named_params = list(model.named_parameters(remove_duplicate=False))
    groups: dict[int, list[str]] = {}
    for name, p in named_params:
        groups.setdefault(id(p), []).append(name)
    tied_names = {n for names in groups.values() if len(names) > 1 for n in names}
    model_keys = set(model.state_dict().keys())
    ckpt_keys = list(checkpoint.keys())
    present = {m: c for c, m in _key_map(model, model_keys, ckpt_keys).items()}  # model key -> checkpoint key

    # Which modules become 4-bit.
    quantized: dict[str, str] = {}
    if pre_quantized:
        for mkey in present:
            if _QS_KEY_PREFIX in mkey and mkey.endswith((".weight." + _QS_KEY_PREFIX + "nf4",
                                                         ".weight." + _QS_KEY_PREFIX + "fp4")):
                name = mkey[:mkey.index(".weight." + _QS_KEY_PREFIX)]
                try:
                    module = model.get_submodule(name)
                except AttributeError:
                    raise ValueError(f"checkpoint entry {present[mkey]!r}: the model has no module {name!r}") from None
                if not _is_convertible(module):
                    raise ValueError(f"checkpoint entry {present[mkey]!r}: 4-bit weights for {name!r}, which is a "
                                     f"{type(module).__name__}, not an nn.Linear")
                quantized[name] = "load"
    else:
        skip = list(opts.skip_modules) if opts.skip_modules is not None else get_keys_to_not_convert(model)
        skip += sorted(getattr(model, "_keep_in_fp32_modules", None) or ())
        skip += sorted(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
        for name, module in model.named_modules():
            if name and _is_convertible(module) and should_convert_module(name, skip) \
                    and name + ".weight" not in tied_names:
                quantized[name] = "quantize"

    # Replace (on meta). A module registered under two names is replaced under both.
    by_id: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name in quantized or any(n in quantized for n in by_id.get(id(module), ())):
            by_id.setdefault(id(module), []).append(name)
    for names in by_id.values():
        old = model.get_submodule(names[0])
        in_features, out_features = _linear_shape(old)
        quant_type, nested, storage = opts.quant_type, opts.use_double_quant, opts.quant_storage
        if quantized[names[0]] == "load":
            quant_type, nested, storage = _saved_format(checkpoint, present, names[0])
        new = Linear4bit(in_features, out_features, bias=old.bias is not None, compute_dtype=opts.compute_dtype,
                         compress_statistics=nested, quant_type=quant_type, quant_storage=storage, device="meta")
        new._fourbit_transposed = isinstance(old, Conv1D)
        new.train(old.training)
        for name in names:
            _set_submodule(model, name, new)
            quantized[name] = quantized[names[0]]

    # Check every entry against the model, from the headers.
    expected: dict[str, tuple] = {}  # model key -> (shape, kind)
    for name, p in model.named_parameters(remove_duplicate=False):
        module_name, _, leaf = name.rpartition(".")
        if module_name in quantized and leaf == "weight":
            module = model.get_submodule(module_name)
            shape = [module.out_features, module.in_features]
            if getattr(module, "_fourbit_transposed", False):
                shape = shape[::-1]
            expected[name] = (shape, quantized[module_name])
        else:
            expected[name] = (list(p.shape), "float")
    persistent_buffers = set(model_keys) - {n for n, _ in named_params}
    non_persistent = {n for n, _ in model.named_buffers()} - persistent_buffers

    errors = []
    for mkey, (shape, kind) in expected.items():
        if mkey not in present:
            continue
        ckey = present[mkey]
        got = checkpoint.shape(ckey)
        if kind == "load":
            continue  # packed: checked below with its quant_state
        if got != shape:
            errors.append(f"{ckey}: shape {got} in the checkpoint, but the model's is {shape}")
        elif checkpoint.dtype(ckey) not in _FLOAT_DTYPES and _is_float_param(model, mkey):
            errors.append(f"{ckey}: dtype {checkpoint.handles[checkpoint.file_of[ckey]].get_slice(ckey).get_dtype()} "
                          "in the checkpoint, but the model's parameter is a float")
    for name, kind in quantized.items():
        if kind == "load":
            errors += _check_packed_entries(checkpoint, present, model.get_submodule(name), name)
    for mkey in sorted(persistent_buffers & present.keys()):
        got = checkpoint.shape(present[mkey])
        want = list(model.get_buffer(mkey).shape)
        if got != want:
            errors.append(f"{present[mkey]}: shape {got} in the checkpoint, but the model's buffer is {want}")
    if errors:
        raise ValueError(f"checkpoint does not match {type(model).__name__}: " + "; ".join(errors[:8]) +
                         (f"; and {len(errors) - 8} more" if len(errors) > 8 else ""))

    # Missing and unexpected entries.
    tied: dict[str, list[str]] = {}
    missing = []
    for names in groups.values():
        have = [n for n in names if n in present]
        if not have:
            if not _ignored(model, names[0], "_keys_to_ignore_on_load_missing"):
                missing.append(names[0])
            continue
        tied[have[0]] = [n for n in names if n != have[0]]
    missing += sorted(k for k in persistent_buffers if k not in present
                      and not _ignored(model, k, "_keys_to_ignore_on_load_missing"))
    allowed = set(expected) | persistent_buffers
    for name, kind in quantized.items():
        if kind == "load":
            allowed |= {k for k in present if k.startswith(name + ".weight.")}
    unexpected = sorted(present[k] for k in present if k not in allowed and k not in non_persistent
                        and not _ignored(model, k, "_keys_to_ignore_on_load_unexpected")
                        and not any(re.search(p, k) for p in _STALE_BUFFER_PATTERNS))
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} entr{'y' if len(missing) == 1 else 'ies'} of "
                         f"{type(model).__name__}: {missing[:8]}{' ...' if len(missing) > 8 else ''}; the checkpoint "
                         "is truncated or for another model")
    if unexpected:
        raise ValueError(f"checkpoint has {len(unexpected)} entr{'y' if len(unexpected) == 1 else 'ies'} that "
                         f"{type(model).__name__} does not have: {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    return _Plan(model, quantized, present, tied)


def _is_float_param(model: nn.Module, name: str) -> bool:
    return model.get_parameter(name).is_floating_point()


def _ignored(model: nn.Module, key: str, attr: str) -> bool:
    patterns = getattr(model, attr, None) or ()
    return any(re.search(p, key) for p in patterns)


def _qs_key(present: dict[str, str], name: str) -> Optional[str]:
    for kind in ("nf4", "fp4"):
        if f"{name}.weight.{_QS_KEY_PREFIX}{kind}" in present:
            return f"{name}.weight.{_QS_KEY_PREFIX}{kind}"
    return None


def _saved_json(checkpoint: _Checkpoint, present: dict[str, str], name: str) -> dict:
    ckey = present[_qs_key(present, name)]
    try:
        return json.loads(bytes(checkpoint.read(ckey).tolist()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, TypeError) as e:
        raise ValueError(f"{ckey}: not the JSON of a bitsandbytes quant_state ({e})") from None


def _saved_format(checkpoint: _Checkpoint, present: dict[str, str], name: str) -> tuple[str, bool, torch.dtype]:
    """(quant_type, nested, quant_storage) of a 4-bit module in the checkpoint."""
    state = _saved_json(checkpoint, present, name)
    quant_type = state.get("quant_type")
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"{present[_qs_key(present, name)]}: quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    nested = f"{name}.weight.nested_absmax" in present or "nested_offset" in state
    wkey = f"{name}.weight"
    storage = checkpoint.dtype(present[wkey]) if wkey in present else torch.uint8
    return quant_type, nested, storage or torch.uint8


def _check_packed_entries(checkpoint: _Checkpoint, present: dict[str, str], module: Linear4bit, name: str) -> list:
    """Header-level checks of one 4-bit module's entries: its shape in the quant_state JSON
    and the packed weight's size. Linear4bit's loader checks the rest as it loads."""
    wkey = f"{name}.weight"
    if wkey not in present:
        return [f"{wkey}: missing, but the checkpoint holds its 4-bit statistics; the checkpoint is truncated"]
    state = _saved_json(checkpoint, present, name)
    shape = state.get("shape")
    want = [module.out_features, module.in_features]
    if shape != want:
        return [f"{present[_qs_key(present, name)]}: the checkpoint's weight shape is {shape}, but the model's "
                f"{name} is {want} (out_features, in_features)"]
    itemsize = torch.empty(0, dtype=checkpoint.dtype(present[wkey]) or torch.uint8).element_size()
    rows = (want[0] * want[1] + 2 * itemsize - 1) // (2 * itemsize)
    got = checkpoint.shape(present[wkey])
    if got != [rows, 1]:
        return [f"{present[wkey]}: packed shape {got} in the checkpoint, but 4-bit codes of a {want} weight are "
                f"[{rows}, 1]"]
    for key in ("absmax", "quant_map"):
        if f"{wkey}.{key}" not in present:
            return [f"{wkey}.{key}: missing, but the checkpoint holds {wkey}; the checkpoint is truncated"]
    return []


def _module_params(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Modules with their own parameters or persistent buffers, in registration order."""
    for name, module in model.named_modules():
        if module._parameters or module._buffers:
            yield name, module


def _load(plan: _Plan, checkpoint: _Checkpoint, dtype: torch.dtype, device: torch.device) -> None:
    """Reads the checkpoint one module at a time into the model planned by ``_plan``."""
    model = plan.model
    present = plan.present
    loaded: dict[str, nn.Parameter] = {}  # parameter name -> the Parameter put there (for ties)
    done = set()
    for mname, module in _module_params(model):
        if id(module) in done:
            continue
        done.add(id(module))
        try:
            if mname in plan.quantized:
                _load_linear4bit(module, mname, plan.quantized[mname], checkpoint, present, dtype, device)
            else:
                _load_plain(module, mname + "." if mname else "", plan, checkpoint, dtype, device, loaded)
        except (ValueError, RuntimeError, TypeError, KeyError, OSError) as e:
            raise ValueError(f"while loading layer {mname or type(model).__name__!r}: {type(e).__name__}: {e}") from e
    # Ties: every other name of a shared parameter gets the one loaded.
    for first, others in plan.tied.items():
        if first not in loaded:  # a shared module's parameters (one object under two names)
            continue
        for other in others:
            module_name, _, leaf = other.rpartition(".")
            model.get_submodule(module_name)._parameters[leaf] = loaded[first]
    left = [n for n, p in model.named_parameters(remove_duplicate=False) if p.device.type == "meta"]
    if left:  # _plan reports missing entries first; this guards the invariant
        raise RuntimeError(f"internal error: parameters left on the meta device after loading: {left[:8]}")


def _load_plain(module: nn.Module, prefix: str, plan: _Plan, checkpoint: _Checkpoint, dtype: torch.dtype,
                device: torch.device, loaded: dict[str, nn.Parameter]) -> None:
    """Reads one module's own float parameters and persistent buffers."""
    present = plan.present
    for leaf, param in list(module._parameters.items()):
        name = prefix + leaf
        if param is None or name not in plan.tied:
            continue
        value = checkpoint.read(present[name])
        if value.is_floating_point():
            value = value.to(dtype)
        new = nn.Parameter(value.to(device), requires_grad=param.requires_grad)
        module._parameters[leaf] = new
        loaded[name] = new
        del value, new
    for leaf, buf in list(module._buffers.items()):
        name = prefix + leaf
        if buf is None or leaf in module._non_persistent_buffers_set or name not in present:
            continue
        value = checkpoint.read(present[name])
        module._buffers[leaf] = value.to(device=device, dtype=buf.dtype)


def _load_linear4bit(module: Linear4bit, name: str, kind: str, checkpoint: _Checkpoint, present: dict[str, str],
                     dtype: torch.dtype, device: torch.device) -> None:
    wkey = name + ".weight"
    if kind == "quantize":
        weight = checkpoint.read(present[wkey])
        if getattr(module, "_fourbit_transposed", False):
            weight = weight.t()
        weight = weight.to(device=device, dtype=dtype)
        param = Params4bit(weight, requires_grad=False, blocksize=64,
                           compress_statistics=module.weight.compress_statistics,
                           quant_type=module.weight.quant_type, quant_storage=module.weight.quant_storage)
        del weight  # only the Params4bit holds the float weight now; quantize() swaps in the codes
        module.weight = param.quantize()
        if module.bias is not None:
            bias = checkpoint.read(present[name + ".bias"]).to(device=device, dtype=dtype)
            module.bias = nn.Parameter(bias, requires_grad=module.bias.requires_grad)
    else:
        entries = {k[len(name) + 1:]: checkpoint.read(c).to(device) for k, c in present.items()
                   if k == wkey or k.startswith(wkey + ".")}
        if module.bias is not None:
            entries["bias"] = checkpoint.read(present[name + ".bias"]).to(device=device, dtype=dtype)
        module.load_state_dict(entries, strict=True, assign=True)
    module._gemm_cache = None


# ---------------------------------------------------------------------------------------- saving

def quantization_options_of(model: nn.Module, module_name=None) -> QuantOptions:
    """The ``QuantOptions`` that describe a model's 4-bit layers (one format for all), with
    ``skip_modules`` listing the linear layers left in full precision (None when they are
    exactly transformers' default skips, so the config reads as transformers writes it).
    Layers prepared for FSDP (``prepare_fsdp``) are described by their flat layout.
    ``module_name(name)``: a module's name in the saved model, None to leave it out (the
    sharded saver maps LoRA wrappers to the base model's names); default: as it is."""
    from .distributed import flat_layout
    rename = module_name if module_name is not None else (lambda name: name)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    if not layers:
        raise ValueError("model has no fourbit Linear4bit layer: nothing 4-bit to save (quantize it with "
                         "fourbit.replace_linear or load it with fourbit.integrations.transformers.from_pretrained)")
    formats = {}
    for name, m in layers:
        layout = flat_layout(m)
        if layout is not None:
            formats.setdefault((layout.quant_type, layout.nested, layout.quant_storage, layout.blocksize), name)
            continue
        if not m.weight.bnb_quantized:
            raise ValueError(f"{name} is a Linear4bit whose weight is not quantized yet; quantize it first "
                             "(.to(device) or .quantize())")
        qs = m.quant_state
        formats.setdefault((qs.quant_type, qs.nested, m.weight.dtype, qs.blocksize), name)
    if len(formats) > 1:
        raise ValueError(f"model's Linear4bit layers use {len(formats)} formats "
                         f"{[f'{n}: ' + str(f) for f, n in formats.items()]} (quant_type, nested, quant_storage, "
                         "blocksize); a transformers quantization_config describes one")
    (quant_type, nested, storage, blocksize), = formats
    if blocksize != 64:
        raise ValueError(f"model's Linear4bit layers use blocksize={blocksize}; transformers + bitsandbytes load "
                         "4-bit checkpoints with blocksize 64 only")
    computes = {m.compute_dtype for _, m in layers if m.compute_dtype is not None}
    compute = computes.pop() if len(computes) == 1 else torch.float32
    kept = sorted(rename(n) for n, m in model.named_modules() if _is_convertible(m) and rename(n) is not None)
    skip = None
    if isinstance(model, transformers.PreTrainedModel):
        default = get_keys_to_not_convert(model)
        default += sorted(getattr(model, "_keep_in_fp32_modules", None) or ())
        would_convert = [n for n in kept if should_convert_module(n, default)]
        if would_convert:
            skip = tuple(kept)
    return QuantOptions(quant_type, nested, compute, storage, skip)


def save_pretrained(model: nn.Module, path: Union[str, os.PathLike], **kwargs) -> None:
    """Writes ``model`` (a transformers model with fourbit ``Linear4bit`` layers) as a checkpoint
    that ``transformers.AutoModelForCausalLM.from_pretrained(path)`` with bitsandbytes loads,
    and that ``from_pretrained`` here reads back bytes-equal: ``config.json`` with the
    ``quantization_config`` transformers writes, ``model.safetensors`` (or shards) with
    bitsandbytes' keys and bytes. ``kwargs`` go to transformers' ``save_pretrained``
    (e.g. ``max_shard_size``); safetensors is always used.

    Raises ValueError for a model that is not a transformers model, has no (or unquantized)
    Linear4bit layers, mixes 4-bit formats, or holds LoRA layers (save the adapter with
    PEFT, or merge it first).
    """
    if not isinstance(model, transformers.PreTrainedModel):
        raise ValueError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    lora = [n for n, m in model.named_modules() if isinstance(m, LoraLinear4bit)]
    if lora:
        raise ValueError(f"model holds LoRA layers ({lora[0]!r}, ...): save the adapter on its own "
                         "(fourbit.nn.lora_state_dict or PEFT's save_pretrained), or remove it before saving the base")
    if kwargs.get("safe_serialization") is False:
        raise ValueError("safe_serialization=False is not supported: fourbit writes and reads safetensors only")
    kwargs.pop("safe_serialization", None)
    opts = quantization_options_of(model)
    config = model.config
    had, old = hasattr(config, "quantization_config"), getattr(config, "quantization_config", None)
    config.quantization_config = opts.to_bnb_dict()
    try:
        model.save_pretrained(os.fspath(path), **kwargs)
    finally:
        if had:
            config.quantization_config = old
        else:
            del config.quantization_config
