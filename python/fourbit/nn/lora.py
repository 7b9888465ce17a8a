"""``LoraLinear4bit``: a frozen ``Linear4bit`` plus a trainable LoRA adapter, and the model-level
helpers ``add_lora``, ``lora_state_dict``, ``load_lora_state_dict``, ``merge_and_unload``.

The layer computes ``base(x) + scaling * lora_B(lora_A(dropout(x)))`` as PEFT's LoRA layer
on a bitsandbytes ``Linear4bit`` does, with PEFT's initialisation (``lora_A`` Kaiming-uniform
with a=sqrt(5), ``lora_B`` zero, so a new adapter leaves the output unchanged) and scaling
(``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``). The whole product goes
through ``fourbit.functional._lora_4bit`` (the fused LoRA op). The adapter weights keep
their own dtype (fp32 by default) and are cast to the compute dtype for the product.

For PEFT's own ``get_peft_model`` / ``save_pretrained`` on a model of fourbit layers, see
``fourbit.integrations.peft``; this module is the PEFT-free path (and its state dicts use
plain ``lora_A.weight`` / ``lora_B.weight`` keys under each layer's name).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import functional as F
from .convert import Patterns, _patterns, _selected, _set_submodule
from .linear import Linear4bit


def _check_lora_args(r, lora_alpha, lora_dropout) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"r must be a positive int, got {r!r}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha):
        raise ValueError(f"lora_alpha must be a finite number, got {lora_alpha!r}")
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)) or not 0 <= lora_dropout < 1:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")


def lora_linear_4bit_forward(base: Linear4bit, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                             scaling: float, dropout: nn.Module, training: bool) -> torch.Tensor:
    """One LoRA layer's forward on a ``Linear4bit`` base, in one ``_lora_4bit`` call: the base
    layer's compute-dtype rule, the adapter weights cast to the compute dtype for the product
    (their gradients come back in their own dtype), dropout on the adapter's input only.
    Shared by ``LoraLinear4bit`` and the PEFT layer (``fourbit.integrations.peft``)."""
    x_lora = dropout(x) if training and isinstance(dropout, nn.Dropout) else None
    x, inp_dtype, weight, args, bias = base._gemm_inputs(x)
    dtype = x.dtype
    if x_lora is not None:
        x_lora = x_lora.to(dtype)
    out = F._lora_4bit(x, weight, args, lora_A.to(dtype), lora_B.to(dtype), scaling, bias, x_lora)
    return out if out.dtype == inp_dtype else out.to(inp_dtype)


class LoraLinear4bit(nn.Module):
    """A ``Linear4bit`` base layer (frozen) with a LoRA adapter of rank ``r``.

    Args:
        base_layer: a quantized ``fourbit.nn.Linear4bit`` (its weight and bias stay frozen).
        r: adapter rank. lora_alpha: scaling numerator. lora_dropout: dropout on the adapter's
            input only, as in PEFT. use_rslora: scaling ``lora_alpha / sqrt(r)``.
        init_lora_weights: True (PEFT's default: Kaiming-uniform A, zero B), "gaussian"
            (A ~ N(0, 1/r), zero B) or False (both random: for tests, the adapter is not a no-op).
        dtype: dtype of the adapter weights (fp32 by default, as PEFT keeps them).
    """

    def __init__(self, base_layer: Linear4bit, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights=True, dtype: torch.dtype = torch.float32):
        super().__init__()
        if not isinstance(base_layer, Linear4bit):
            raise ValueError(f"base_layer must be a fourbit.nn.Linear4bit, got {type(base_layer).__name__}")
        _check_lora_args(r, lora_alpha, lora_dropout)
        if init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}")
        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.lora_alpha, self.use_rslora = r, lora_alpha, use_rslora
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        device = base_layer.weight.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.reset_lora_parameters(init_lora_weights)

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights=True) -> None:
        """PEFT's initialisation (see the class docstring)."""
        if init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        if init_lora_weights is False:
            nn.init.kaiming_uniform_(self.lora_B.weight, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lora_linear_4bit_forward(self.base_layer, x, self.lora_A.weight, self.lora_B.weight, self.scaling,
                                        self.lora_dropout, self.training)

    @torch.no_grad()
    def merged_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``deq(W) + scaling * lora_B @ lora_A`` in ``dtype`` (computed in fp32)."""
        base = self.base_layer
        w = F.dequantize_4bit(base.weight, base.quant_state).float()
        w += self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())
        return w.to(dtype)

    @torch.no_grad()
    def merge_and_unload(self, dtype: torch.dtype = torch.float32) -> nn.Linear:
        """A full-precision ``nn.Linear`` (``dtype``, on the weight's device) whose output is this
        layer's: base weight dequantized plus the adapter's product, bias copied."""
        base = self.base_layer
        has_bias = base.bias is not None
        merged = nn.Linear(self.in_features, self.out_features, bias=has_bias, device=base.weight.device, dtype=dtype)
        merged.weight.copy_(self.merged_weight(dtype))
        if has_bias:
            merged.bias.copy_(base.bias.to(dtype))
        return merged

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}"


def add_lora(model: nn.Module, target_modules: Patterns = None, r: int = 8, lora_alpha: float = 8,
             lora_dropout: float = 0.0, use_rslora: bool = False, init_lora_weights=True,
             dtype: torch.dtype = torch.float32) -> nn.Module:
    """Wraps every ``Linear4bit`` of ``model`` selected by ``target_modules`` (the name patterns
    of ``replace_linear``; None: all) in a ``LoraLinear4bit``, in place; freezes every other
    parameter, as PEFT does. Returns ``model``. Raises if nothing matched."""
    include = _patterns(target_modules, "target_modules")
    _check_lora_args(r, lora_alpha, lora_dropout)
    names = [name for name, m in model.named_modules()
             if isinstance(m, Linear4bit) and not _is_lora_base(model, name)
             and (include is None or _selected(name, include))]
    if not names:
        raise ValueError(f"target_modules={target_modules!r} matched no fourbit.nn.Linear4bit in the model "
                         "(convert it first with fourbit.replace_linear)")
    model.requires_grad_(False)
    for name in names:
        _set_submodule(model, name, LoraLinear4bit(model.get_submodule(name), r, lora_alpha, lora_dropout,
                                                   use_rslora, init_lora_weights, dtype))
    return model


def _is_lora_base(model: nn.Module, name: str) -> bool:
    parent_name, _, child = name.rpartition(".")
    return child == "base_layer" and isinstance(model.get_submodule(parent_name), LoraLinear4bit)


def _lora_layers(model: nn.Module):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLinear4bit)]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights only: ``<layer>.lora_A.weight`` and ``<layer>.lora_B.weight`` for
    every ``LoraLinear4bit`` (detached; a few MB where the whole model is GBs)."""
    out = {}
    for name, layer in _lora_layers(model):
        prefix = f"{name}." if name else ""
        out[prefix + "lora_A.weight"] = layer.lora_A.weight.detach()
        out[prefix + "lora_B.weight"] = layer.lora_B.weight.detach()
    return out


def load_lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Loads what ``lora_state_dict`` saved. Every key must belong to an adapter of the model and
    every adapter weight must be present with its shape; otherwise a ValueError names the key
    and nothing is changed."""
    expected = {k: v for k, v in lora_state_dict(model).items()}
    unexpected = sorted(set(state_dict) - set(expected))
    missing = sorted(set(expected) - set(state_dict))
    if unexpected or missing:
        raise ValueError(f"adapter state_dict does not match the model's adapters: missing keys {missing}, "
                         f"unexpected keys {unexpected}")
    staged = {}
    for key, param in expected.items():
        value = state_dict[key]
        if not isinstance(value, torch.Tensor) or value.shape != param.shape:
            got = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{key}: expected shape {list(param.shape)}, got {got}")
        if not (value.is_floating_point() and value.device.type != "meta"):
            raise ValueError(f"{key}: must be a floating-point tensor with values, got {value.dtype} on "
                             f"{value.device}")
        # Every value is converted before any adapter changes, so a failure leaves them all as they were.
        staged[param] = value.detach().to(param.device, param.dtype, copy=True)
    with torch.no_grad():
        for param, value in staged.items():
            param.copy_(value)


def merge_and_unload(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replaces every ``LoraLinear4bit`` of ``model`` by its merged full-precision ``nn.Linear``
    (in place, one layer at a time). Returns ``model`` (the merged layer if ``model`` is itself
    a ``LoraLinear4bit``)."""
    if isinstance(model, LoraLinear4bit):
        return model.merge_and_unload(dtype)
    for name in [name for name, _ in _lora_layers(model)]:
        _set_submodule(model, name, model.get_submodule(name).merge_and_unload(dtype))
    return model


__all__ = ["LoraLinear4bit", "add_lora", "lora_state_dict", "load_lora_state_dict", "merge_and_unload"]
