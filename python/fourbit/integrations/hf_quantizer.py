"""fourbit as a transformers quantizer: ``FourbitConfig`` and ``FourbitHfQuantizer``.

Registered with transformers' public API (``register_quantization_config("fourbit")`` and
``register_quantizer("fourbit")``) when this module is imported (``fourbit.FourbitConfig``
imports it), so transformers' own loader builds fourbit layers::

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=fourbit.FourbitConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16), device_map="auto", attn_implementation="sdpa")

Every option of ``from_pretrained`` works as it does for bitsandbytes (device_map,
attn_implementation, low_cpu_mem_usage, trust_remote_code, revision, ...). Nothing here
imports bitsandbytes.

How the hooks are used:

- before the weights are read, every exact ``nn.Linear`` / ``Conv1D`` that transformers'
  rule selects (its default skips, ``llm_int8_skip_modules``, ``_keep_in_fp32_modules``)
  becomes an empty ``fourbit.nn.Linear4bit`` on the meta device;
- each float weight of those layers is quantized by ``FourbitQuantize`` as the loader
  streams it onto its device (``device_map``); a checkpoint that is already 4-bit is read by
  ``FourbitDeserialize`` (``Params4bit.from_prequantized``, bytes unchanged);
- after loading, the model has ``is_loaded_in_4bit = True`` (what PEFT reads) and
  ``num_parameters`` / ``get_memory_footprint`` that count a 4-bit weight as its real
  number of elements and its real bytes (packed codes plus statistics);
- ``model.dequantize()`` replaces every ``Linear4bit`` by an ``nn.Linear`` with the
  dequantized weight.

What ``config.json`` holds: ``FourbitConfig.to_dict()`` is bitsandbytes' own
``quantization_config`` (``quant_method: "bitsandbytes"``), so a model saved with
``save_pretrained`` loads in transformers + bitsandbytes without fourbit. fourbit reads
such a directory with ``fourbit.integrations.transformers.from_pretrained``.
"""

from __future__ import annotations

import types
from typing import Any, Optional

import torch
from torch import nn

try:
    from transformers.core_model_loading import ConversionOps
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
    from transformers.quantizers.quantizers_utils import should_convert_module
    from transformers.utils.quantization_config import QuantizationConfigMixin
except ImportError as e:  # fail loudly: this module is the transformers integration
    raise ImportError(f"fourbit's transformers quantizer needs transformers (5.x): {e}") from e

from .. import functional as F
from ..nn.linear import Linear4bit
from ..nn.params import Params4bit
from .transformers import QuantOptions, parse_quantization_config

try:  # PEFT on a fourbit-loaded model must pick fourbit's LoRA layer: install its dispatch with the quantizer
    import peft  # noqa: F401
except ImportError:
    pass
else:
    from . import peft as _peft_dispatch  # noqa: F401

__all__ = ["FourbitConfig", "FourbitHfQuantizer", "QUANT_METHOD"]

QUANT_METHOD = "fourbit"


def _dtype_or_none(value):
    if value is None or isinstance(value, torch.dtype):
        return value
    return getattr(torch, str(value).removeprefix("torch."))


class FourbitConfig(QuantizationConfigMixin):
    """The quantization config of fourbit: ``BitsAndBytesConfig``'s arguments, names and
    defaults (4-bit only), validated with a ValueError that names the option and value.

    ``FourbitConfig.from_bnb(cfg)`` converts a ``BitsAndBytesConfig``. ``to_dict()`` gives
    the ``quantization_config`` transformers + bitsandbytes write, so checkpoints saved from
    a fourbit model load in bitsandbytes as they are.
    """

    def __init__(self, load_in_8bit: bool = False, load_in_4bit: bool = True, llm_int8_threshold: float = 6.0,
                 llm_int8_skip_modules: Optional[list[str]] = None, llm_int8_enable_fp32_cpu_offload: bool = False,
                 llm_int8_has_fp16_weight: bool = False, bnb_4bit_compute_dtype=None, bnb_4bit_quant_type: str = "fp4",
                 bnb_4bit_use_double_quant: bool = False, bnb_4bit_quant_storage=None, **kwargs: Any):
        method = kwargs.pop("quant_method", QUANT_METHOD)
        if str(getattr(method, "value", method)) not in (QUANT_METHOD, "bitsandbytes"):
            raise ValueError(f"quant_method must be 'fourbit' or 'bitsandbytes', got quant_method={method!r}")
        options = dict(load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit, llm_int8_threshold=llm_int8_threshold,
                       llm_int8_skip_modules=llm_int8_skip_modules,
                       llm_int8_enable_fp32_cpu_offload=llm_int8_enable_fp32_cpu_offload,
                       llm_int8_has_fp16_weight=llm_int8_has_fp16_weight, bnb_4bit_compute_dtype=bnb_4bit_compute_dtype,
                       bnb_4bit_quant_type=bnb_4bit_quant_type, bnb_4bit_use_double_quant=bnb_4bit_use_double_quant)
        if bnb_4bit_quant_storage is not None:
            options["bnb_4bit_quant_storage"] = bnb_4bit_quant_storage
        options.update(kwargs)  # unknown keys: parse_quantization_config names them
        opts = parse_quantization_config(options)
        self.quant_method = QUANT_METHOD
        self.load_in_4bit, self.load_in_8bit = True, False
        self.llm_int8_threshold = llm_int8_threshold
        self.llm_int8_has_fp16_weight = llm_int8_has_fp16_weight
        self.llm_int8_enable_fp32_cpu_offload = False
        self.llm_int8_skip_modules = None if opts.skip_modules is None else list(opts.skip_modules)
        self.bnb_4bit_quant_type = opts.quant_type
        self.bnb_4bit_use_double_quant = opts.use_double_quant
        self.bnb_4bit_compute_dtype = opts.compute_dtype
        self.bnb_4bit_quant_storage = opts.quant_storage

    @classmethod
    def from_bnb(cls, config) -> "FourbitConfig":
        """A FourbitConfig with the options of a ``transformers.BitsAndBytesConfig`` (or its dict)."""
        if isinstance(config, FourbitConfig):
            return config
        if not isinstance(config, dict):
            to_dict = getattr(config, "to_dict", None)
            if not callable(to_dict):
                raise ValueError(f"quantization_config must be a FourbitConfig, a transformers.BitsAndBytesConfig "
                                 f"or a dict of its options, got {type(config).__name__}")
            config = to_dict()
        return cls(**config)

    @property
    def options(self) -> QuantOptions:
        """The validated options (quant type, double quantization, compute and storage dtypes, skips)."""
        return QuantOptions(self.bnb_4bit_quant_type, self.bnb_4bit_use_double_quant,
                            _dtype_or_none(self.bnb_4bit_compute_dtype) or torch.float32,
                            _dtype_or_none(self.bnb_4bit_quant_storage) or torch.uint8,
                            None if self.llm_int8_skip_modules is None else tuple(self.llm_int8_skip_modules))

    def quantization_method(self) -> str:
        """``"nf4"`` or ``"fp4"`` (what ``BitsAndBytesConfig.quantization_method()`` says for 4-bit)."""
        return self.bnb_4bit_quant_type

    def is_quantizable(self) -> bool:
        return True

    def to_dict(self) -> dict[str, Any]:
        """bitsandbytes' ``quantization_config`` for these options (what ``config.json`` gets)."""
        return self.options.to_bnb_dict()

    def to_loader_dict(self) -> dict[str, Any]:
        """The options under ``quant_method: "fourbit"``: a ``config.quantization_config`` that
        makes transformers' loader pick this quantizer for an already-quantized checkpoint."""
        d = {k: v for k, v in self.to_dict().items() if k not in ("load_in_4bit", "load_in_8bit", "_load_in_4bit",
                                                                   "_load_in_8bit")}
        d["quant_method"] = QUANT_METHOD
        return d

    def __deepcopy__(self, memo):
        return type(self)(**self.to_dict())


register_quantization_config(QUANT_METHOD)(FourbitConfig)


# ---------------------------------------------------------------------------------------- conversion ops

class FourbitQuantize(ConversionOps):
    """Quantizes a float weight as transformers' loader delivers it (on its target device)."""

    def __init__(self, hf_quantizer: "FourbitHfQuantizer"):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: dict[str, Any], model: Optional[nn.Module] = None, **kwargs: Any) -> dict:
        out = {}
        for name, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            module = model.get_submodule(name.rpartition(".")[0])
            if getattr(module, "_fourbit_transposed", False):  # Conv1D stores [in, out]
                value = value.t()
            old = module.weight
            param = Params4bit(value.contiguous(), requires_grad=False, blocksize=old.blocksize,
                               compress_statistics=old.compress_statistics, quant_type=old.quant_type,
                               quant_storage=old.quant_storage)
            out[name] = param.quantize(value.device)
            module._gemm_cache = None
            module._is_hf_initialized = True
        return out


class FourbitDeserialize(ConversionOps):
    """Rebuilds a 4-bit weight from a checkpoint's packed bytes and statistics (either library's)."""

    def __init__(self, hf_quantizer: "FourbitHfQuantizer"):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: dict[str, Any], model: Optional[nn.Module] = None,
                full_layer_name: Optional[str] = None, **kwargs: Any) -> dict:
        if len(input_dict) == 1:  # a float weight (a layer left in full precision)
            return input_dict
        entries = {k: (v[0] if isinstance(v, list) else v) for k, v in input_dict.items()}
        weight = entries.pop("weight")
        module = model.get_submodule(full_layer_name.rpartition(".")[0])
        param = Params4bit.from_prequantized(weight, entries, device=weight.device, module=module)
        module._gemm_cache = None
        module._is_hf_initialized = True
        return {"weight": param}


# ---------------------------------------------------------------------------------------- model methods

def _num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
    """``PreTrainedModel.num_parameters`` counting a quantized 4-bit weight as its real number
    of elements (``quant_state.shape``), without importing bitsandbytes."""
    embeddings = set()
    if exclude_embeddings:
        embeddings = {f"{n}.weight" for n, m in self.named_modules() if isinstance(m, nn.Embedding)}
    total = 0
    for name, p in self.named_parameters():
        if name in embeddings or (only_trainable and not p.requires_grad):
            continue
        total += _logical_numel(p)
    return total


def _logical_numel(p: torch.Tensor) -> int:
    qs = getattr(p, "quant_state", None) if isinstance(p, Params4bit) and p.bnb_quantized else None
    return qs.shape.numel() if qs is not None and qs.shape is not None else p.numel()


def _state_bytes(qs: F.QuantState) -> int:
    tensors = [qs.absmax, qs.code]
    if qs.nested:
        tensors += [qs.offset, qs.state2.absmax, qs.state2.code]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _get_memory_footprint(self, return_buffers: bool = True) -> int:
    """``PreTrainedModel.get_memory_footprint`` plus the 4-bit weights' statistics (absmax,
    codebooks, nested state), which are neither parameters nor buffers."""
    total = sum(p.numel() * p.element_size() for p in self.parameters())
    if return_buffers:
        total += sum(b.numel() * b.element_size() for b in self.buffers())
    seen = set()
    for m in self.modules():
        if isinstance(m, Linear4bit) and m.quant_state is not None and id(m.quant_state) not in seen:
            seen.add(id(m.quant_state))
            total += _state_bytes(m.quant_state)
    return total


def mark_loaded_in_4bit(model: nn.Module) -> None:
    """What a fourbit-loaded model carries: ``is_loaded_in_4bit`` (PEFT reads it) and the
    counting methods above in place of transformers' (which import bitsandbytes for it)."""
    model.is_loaded_in_4bit = True
    model.num_parameters = types.MethodType(_num_parameters, model)
    model.get_memory_footprint = types.MethodType(_get_memory_footprint, model)


def _unmark(model: nn.Module) -> None:
    for name in ("is_loaded_in_4bit", "num_parameters", "get_memory_footprint"):
        model.__dict__.pop(name, None)


def dequantize_model(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Replaces every ``Linear4bit`` of ``model`` by an ``nn.Linear`` holding its dequantized
    weight (in ``dtype``, default the dtype it was quantized from) and its bias."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, Linear4bit):
            continue
        if not module.weight.bnb_quantized:
            raise ValueError(f"{name} is a Linear4bit whose weight was never quantized; nothing to dequantize")
        weight = F.dequantize_4bit(module.weight.data, module.quant_state)
        if dtype is not None:
            weight = weight.to(_dtype_or_none(dtype))
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if module.bias is not None:
            linear.bias = module.bias
        linear.train(module.training)
        model.set_submodule(name, linear)
    _unmark(model)
    return model


# ---------------------------------------------------------------------------------------- the quantizer

class FourbitHfQuantizer(HfQuantizer):
    """transformers' quantizer for ``FourbitConfig`` (module docstring)."""

    requires_calibration = False
    serialized_names = {"weight": ["weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                                   "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4",
                                   "weight.quant_state.bitsandbytes__fp4"]}

    def __init__(self, quantization_config, **kwargs: Any):
        super().__init__(FourbitConfig.from_bnb(quantization_config), **kwargs)

    @property
    def quantized_element_size(self) -> float:
        return 0.5

    def validate_environment(self, *args: Any, device_map=None, **kwargs: Any) -> None:
        if isinstance(device_map, dict):
            bad = sorted({str(v) for v in device_map.values()} & {"disk"})
            if bad:
                raise ValueError(f"device_map places modules on {bad}: fourbit's 4-bit layers live on a device "
                                 "(cuda or cpu); give them a device in device_map")

    def update_device_map(self, device_map):
        if device_map is None:
            device_map = {"": torch.cuda.current_device() if torch.cuda.is_available() else "cpu"}
        return device_map

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        module_name, _, leaf = param_name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            return False
        return isinstance(module, Linear4bit) and leaf == "weight" and not module.weight.bnb_quantized

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        opts = self.quantization_config.options
        keep = list(getattr(model, "_keep_in_fp32_modules", None) or ())
        keep += list(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
        skip = self.get_modules_to_not_convert(model, None if opts.skip_modules is None else list(opts.skip_modules),
                                               keep)
        for name, module in list(model.named_modules()):
            if not name or not (type(module) is nn.Linear or isinstance(module, Conv1D)):
                continue
            if not should_convert_module(name, skip):
                continue
            if isinstance(module, Conv1D):
                in_features, out_features = module.weight.shape
            else:
                in_features, out_features = module.in_features, module.out_features
            new = Linear4bit(in_features, out_features, bias=module.bias is not None, compute_dtype=opts.compute_dtype,
                             compress_statistics=opts.use_double_quant, quant_type=opts.quant_type,
                             quant_storage=opts.quant_storage, device="meta")
            if self.pre_quantized:  # the checkpoint's packed bytes, in their storage dtype
                new.weight.data = new.weight.data.to(opts.quant_storage)
            new._fourbit_transposed = isinstance(module, Conv1D)
            new.weight.requires_grad_(False)
            new.train(module.training)
            model.set_submodule(name, new)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        self._quantize_initialized_weights(model)
        # Saving writes Linear4bit's own state dict (bitsandbytes' keys): no conversion to undo.
        conversions = getattr(model, "_weight_conversions", None)
        if conversions:
            model._weight_conversions = [c for c in conversions if not any(
                isinstance(op, (FourbitQuantize, FourbitDeserialize)) for op in getattr(c, "operations", ()))]
        mark_loaded_in_4bit(model)
        return model

    def _quantize_initialized_weights(self, model: nn.Module) -> None:
        """A 4-bit layer whose float weight the checkpoint lacks gets transformers' treatment
        of a missing weight (freshly initialized, reported as MISSING), then is quantized like
        the rest. In an already-quantized checkpoint a layer left without its 4-bit weight
        (missing, or its entries failed to load: transformers reports why) is a ValueError
        naming the layers, as is one still on the meta device."""
        opts = self.quantization_config.options
        left = []
        for name, module in model.named_modules():
            if not isinstance(module, Linear4bit):
                continue
            w = module.weight
            if isinstance(w, Params4bit) and w.bnb_quantized:
                continue
            if self.pre_quantized or w.device.type == "meta" or not w.is_floating_point():
                left.append(name)  # a 4-bit checkpoint's layer never gets random weights
                continue
            module.weight = Params4bit(w.detach(), requires_grad=False, compress_statistics=opts.use_double_quant,
                                       quant_type=opts.quant_type, quant_storage=opts.quant_storage).quantize()
            module._gemm_cache = None
        if left:
            raise ValueError(f"the checkpoint did not provide the weights of {len(left)} 4-bit layer(s), e.g. "
                             f"{left[:3]}; the checkpoint is incomplete or for another model")

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True

    def get_quantize_ops(self) -> FourbitQuantize:
        return FourbitQuantize(self)

    def get_load_operations(self) -> dict:
        return {"deserialize": FourbitDeserialize}

    def _dequantize(self, model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
        return dequantize_model(model, dtype)


register_quantizer(QUANT_METHOD)(FourbitHfQuantizer)
