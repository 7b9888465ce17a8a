"""PEFT's LoRA on fourbit ``Linear4bit`` layers, through fourbit's fused LoRA op.

Usage: import this module once, then use PEFT as usual::

    import fourbit, fourbit.integrations.peft  # noqa: F401  (registers the dispatcher)
    from peft import LoraConfig, get_peft_model, PeftModel

    model = fourbit.replace_linear(model, quant_type="nf4")
    model = get_peft_model(model, LoraConfig(r=16, target_modules=["q_proj", "v_proj"]))
    ...
    model.save_pretrained("adapter")          # a standard PEFT adapter
    model = PeftModel.from_pretrained(base, "adapter")

The entry point: importing this module wraps PEFT's LoRA dispatch (``LoraModel._create_new_module``,
the function that picks the LoRA layer class for a target module) so that every target whose
base layer is a ``fourbit.nn.Linear4bit`` gets ``LoraLinear4bitPeft``; every other target goes
to PEFT's own dispatch unchanged. Why a dispatcher and not only PEFT's custom-module API
(``LoraConfig._register_custom_module``): that mapping lives on one config object and is not
saved with it, so ``PeftModel.from_pretrained``, ``load_adapter`` and TRL (which build configs
themselves) would silently fall back to PEFT's plain ``lora.Linear``, which treats the packed
4-bit bytes as a float weight (unfused forward; merging fails on the packed weight). The wrapper
is installed once (importing again is a no-op) and defers to a user's own custom-module
mapping when one matches the layer. ``LoraLinear4bitPeft`` also follows that custom-module
convention, so ``config._register_custom_module({fourbit.nn.Linear4bit: LoraLinear4bitPeft})``
works too. Tested with PEFT 0.21.

What the layer supports (it subclasses PEFT's ``LoraLayer``, so PEFT's model-level API works):
``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora``, ``rank_pattern``/``alpha_pattern``,
``init_lora_weights`` True / False / ``"gaussian"``, ``lora_bias``, several adapters
(``add_adapter``, ``set_adapter``, ``delete_adapter``, mixed-batch ``adapter_names``),
``disable_adapter()``, ``merge``/``unmerge``/``merge_and_unload`` and ``save_pretrained``.

- Forward: with one active, unmerged adapter (no ``lora_bias``, no extra forward arguments) the
  whole layer is one call of ``fourbit.functional._lora_4bit`` (the fused LoRA op), in the base
  layer's compute dtype (the adapter weights are cast to it for the product; gradients reach
  them in their own dtype). Otherwise the general path: the base layer's output plus each active
  adapter's ``scaling * lora_B(lora_A(dropout(x)))`` computed in the adapter's dtype, as PEFT's
  bitsandbytes layer does.
- Merge: as PEFT does for bitsandbytes, the weight is dequantized, the adapter's delta added in
  fp32 and the sum re-quantized into a new 4-bit weight with the same settings (quant type,
  blocksize, double quantization, storage dtype and the float dtype recorded in the
  QuantState). Merging and unmerging therefore round to 4 bits each time (a warning says so);
  ``merge_and_unload`` returns the model with fourbit ``Linear4bit`` layers holding the merged
  weights. For a full-precision merge use ``fourbit.nn.LoraLinear4bit.merge_and_unload``.
- Not supported, rejected with a ValueError naming the option when the adapter is created:
  DoRA and PEFT's other LoRA variants (aLoRA, Arrow, VeLoRA, MonteCLoRA, BD-LoRA, KaSA, MiCA),
  QA-LoRA, and the initialisations that read or rewrite the base weight (PiSSA, CorDA, OLoRA,
  LoftQ, LoRA-GA, orthogonal, EVA).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Optional

import torch
from torch import nn

import fourbit.functional as F
from fourbit.nn.linear import Linear4bit
from fourbit.nn.lora import lora_linear_4bit_forward
from fourbit.nn.params import Params4bit

try:
    from peft.tuners.lora import LoraLayer, LoraModel
    from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
except ImportError as e:  # pragma: no cover - exercised only without peft
    raise ImportError("fourbit.integrations.peft needs the 'peft' package (pip install peft)") from e

_SUPPORTED_INITS = (True, False, "gaussian")
_MERGE_WARNING = ("Merging or unmerging a LoRA adapter into a 4-bit weight re-quantizes it: the result is rounded "
                  "to 4 bits, so outputs differ slightly from the unmerged adapter's.")


def _unsupported_options(config) -> list[str]:
    """The options of ``config`` this layer cannot honour, as ``name=value`` strings."""
    bad = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name, None)
        if field.metadata.get("is_lora_variant") and value:
            bad.append(f"{field.name}={value!r}")  # DoRA, aLoRA, Arrow, VeLoRA, ...
    init = config.init_lora_weights
    if not any(init is s or (isinstance(s, str) and init == s) for s in _SUPPORTED_INITS):
        bad.append(f"init_lora_weights={init!r}")
    if getattr(config, "use_qalora", False):
        bad.append("use_qalora=True")
    return bad


class LoraLinear4bitPeft(nn.Module, LoraLayer):
    """PEFT's LoRA layer over a fourbit ``Linear4bit`` (module docstring for what it supports).

    Built by PEFT's dispatch (``get_peft_model``, ``PeftModel.from_pretrained``,
    ``add_adapter``), with the constructor signature of PEFT's LoRA layers.

    Args:
        base_layer: the fourbit ``Linear4bit`` (or a PEFT layer wrapping one).
        adapter_name: name of the first adapter. config: its ``LoraConfig``.
        r, lora_alpha: its rank and alpha (PEFT resolves ``rank_pattern``/``alpha_pattern``).
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0, lora_alpha: int = 1,
                 **kwargs: Any) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        base = self.get_base_layer()
        if not isinstance(base, Linear4bit):
            raise ValueError(f"base_layer must be a fourbit.nn.Linear4bit, got {type(base).__name__}")
        if config.fan_in_fan_out:
            warnings.warn("fan_in_fan_out=True does not apply to a Linear4bit ([out_features, in_features] "
                          "weight); using fan_in_fan_out=False", UserWarning, stacklevel=2)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config, **kwargs: Any) -> None:
        """PEFT's ``update_layer`` after rejecting the options this layer does not support."""
        bad = _unsupported_options(config)
        if bad:
            raise ValueError(
                f"fourbit's LoRA layer for PEFT does not support {', '.join(bad)} (adapter {adapter_name!r}, "
                f"layer {kwargs.get('target_name') or type(self.get_base_layer()).__name__}); supported: plain "
                f"LoRA with init_lora_weights in {list(_SUPPORTED_INITS)}, lora_dropout, use_rslora, lora_bias")
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    # ------------------------------------------------------------------ forward
    def _fused_adapter(self, args, kwargs) -> Optional[str]:
        """The adapter for the fused path, or None when the general path is needed."""
        if args or kwargs or self.merged:
            return None
        active = [name for name in self.active_adapters if name in self.lora_A]
        if len(active) != 1:
            return None
        name = active[0]
        if name in self.lora_variant or self.lora_bias.get(name, False):
            return None
        return name

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        name = self._fused_adapter(args, kwargs)
        if name is not None:
            return self._fused_forward(x, name)
        return self._general_forward(x, *args, **kwargs)

    def _fused_forward(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """The base product and the adapter in one ``_lora_4bit`` call (compute dtype)."""
        return lora_linear_4bit_forward(self.get_base_layer(), x, self.lora_A[name].weight,
                                        self.lora_B[name].weight, self.scaling[name], self.lora_dropout[name],
                                        self.training)

    def _general_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Base output plus every active adapter, each in its weights' dtype (PEFT's bnb rule)."""
        result = self.base_layer(x, *args, **kwargs)
        cast = not torch.is_autocast_enabled()
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            x_a = self._cast_input_dtype(x, lora_A.weight.dtype) if cast else x
            delta = lora_B(lora_A(self.lora_dropout[name](x_a))) * self.scaling[name]
            result = result + (delta.to(result.dtype) if cast else delta)
        return result

    # ------------------------------------------------------------------ merging
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``scaling * lora_B @ lora_A`` in fp32, ``[out_features, in_features]``."""
        return (self.lora_B[adapter].weight.float() @ self.lora_A[adapter].weight.float()) * self.scaling[adapter]

    def _dequantized_weight(self) -> torch.Tensor:
        base = self.get_base_layer()
        return F.dequantize_4bit(base.weight, base.quant_state).float()

    def _set_weight(self, w: torch.Tensor) -> None:
        """Re-quantizes ``w`` with the current weight's settings and installs it."""
        base = self.get_base_layer()
        old = base.weight
        qs = old.quant_state
        new = Params4bit(w.to(qs.dtype), requires_grad=False, blocksize=qs.blocksize,
                         compress_statistics=qs.nested, quant_type=qs.quant_type, quant_storage=old.dtype)
        base.weight = new.quantize(old.device)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Adds the adapters' deltas (the active ones by default) into the 4-bit weight
        (re-quantized). ``safe_merge`` checks the result for NaN/inf before installing it."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.lora_A:
                continue
            warnings.warn(_MERGE_WARNING, UserWarning, stacklevel=2)
            w = self._dequantized_weight() + self.get_delta_weight(name).to(base.weight.device)
            bias = None
            if self.lora_bias[name]:
                if base.bias is None:
                    raise ValueError(f"cannot merge adapter {name!r}: it has a lora_B bias (lora_bias=True) but the "
                                     "base layer has no bias")
                bias = base.bias.data + (self.lora_B[name].bias * self.scaling[name]).to(base.bias.dtype)
            if safe_merge and not (torch.isfinite(w).all() and (bias is None or torch.isfinite(bias).all())):
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            self._set_weight(w)
            if bias is not None:
                base.bias.data = bias
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtracts the merged adapters' deltas again (re-quantized), last merged first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name not in self.lora_A:
                continue
            warnings.warn(_MERGE_WARNING, UserWarning, stacklevel=2)
            self._set_weight(self._dequantized_weight() - self.get_delta_weight(name).to(base.weight.device))
            if self.lora_bias[name]:
                base.bias.data -= (self.lora_B[name].bias * self.scaling[name]).to(base.bias.dtype)

    def __repr__(self) -> str:
        return "fourbit.lora." + super().__repr__()


def _dispatch(target: nn.Module, adapter_name: str, config, **kwargs: Any) -> Optional[nn.Module]:
    """fourbit's LoRA layer for a target whose base layer is a fourbit ``Linear4bit``, else None."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if not isinstance(base, Linear4bit):
        return None
    custom = getattr(config, "_custom_modules", None) or {}
    if any(isinstance(base, cls) for cls in custom):
        return None  # the user's own mapping wins; PEFT's dispatch applies it
    return LoraLinear4bitPeft(target, adapter_name, config=config, **kwargs)


def _install() -> None:
    """Wraps ``LoraModel._create_new_module`` once (module docstring for why)."""
    original = LoraModel.__dict__.get("_create_new_module")
    if original is None:
        raise ImportError("fourbit.integrations.peft: this PEFT version has no LoraModel._create_new_module "
                          "(tested with PEFT 0.21); register the layer with "
                          "LoraConfig._register_custom_module({fourbit.nn.Linear4bit: LoraLinear4bitPeft}) instead")
    original = original.__func__ if isinstance(original, staticmethod) else original
    if getattr(original, "_fourbit_dispatch", False):
        return

    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        new_module = _dispatch(target, adapter_name, lora_config, **kwargs)
        if new_module is None:
            new_module = original(lora_config, adapter_name, target, **kwargs)
        return new_module

    _create_new_module._fourbit_dispatch = True
    _create_new_module.__wrapped__ = original
    _create_new_module.__doc__ = original.__doc__
    LoraModel._create_new_module = staticmethod(_create_new_module)


_install()

__all__ = ["LoraLinear4bitPeft"]
