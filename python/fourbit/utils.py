"""Helpers with the names and behaviour of ``bitsandbytes.utils``, for code that imports them
(``import fourbit.utils as utils`` in place of ``bitsandbytes.utils``).

- ``pack_dict_to_tensor`` / ``unpack_tensor_to_dict``: a dict as a uint8 tensor of its UTF-8
  JSON and back (how a QuantState's non-tensor fields are stored in a state dict).
- ``replace_linear``: bitsandbytes' module swap (every ``nn.Linear`` child not named in
  ``skip_modules`` becomes ``linear_replacement(in_features, out_features, bias)``).
  For quantizing a model, ``fourbit.replace_linear`` is the streaming, checked version.
- ``sync_gpu``: synchronizes the device of a tensor (a no-op on the CPU).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .functional import _pack_dict_to_tensor, _unpack_tensor_to_dict

__all__ = ["pack_dict_to_tensor", "unpack_tensor_to_dict", "replace_linear", "sync_gpu"]


def pack_dict_to_tensor(source_dict: dict) -> torch.Tensor:
    """``source_dict`` as a uint8 tensor holding its JSON (bitsandbytes' byte format)."""
    if not isinstance(source_dict, dict):
        raise ValueError(f"source_dict must be a dict, got {type(source_dict).__name__}")
    return _pack_dict_to_tensor(source_dict)


def unpack_tensor_to_dict(tensor_data: torch.Tensor) -> dict:
    """The dict a ``pack_dict_to_tensor`` tensor holds; ValueError if it is not JSON of a dict."""
    return _unpack_tensor_to_dict(tensor_data, "tensor_data")


def replace_linear(model: torch.nn.Module, linear_replacement: Callable[..., torch.nn.Module],
                   skip_modules: Sequence[str] = ("lm_head",), copy_weights: bool = False,
                   post_processing_function: Optional[str] = None) -> torch.nn.Module:
    """bitsandbytes' ``utils.replace_linear``: replaces, depth first, every ``nn.Linear``
    child whose own name is not in ``skip_modules`` by
    ``linear_replacement(in_features, out_features, bias is not None)``; ``copy_weights``
    moves the old weight and bias onto it; ``post_processing_function`` names a method of
    the old module to call (if it has one). Returns ``model`` (changed in place)."""
    if not callable(linear_replacement):
        raise ValueError(f"linear_replacement must be callable, got {linear_replacement!r}")
    for name, child in list(model.named_children()):
        if next(child.children(), None) is not None:
            replace_linear(child, linear_replacement, skip_modules, copy_weights, post_processing_function)
        if isinstance(child, torch.nn.Linear) and name not in skip_modules:
            new = linear_replacement(child.in_features, child.out_features, child.bias is not None)
            if copy_weights:
                new.weight = child.weight
                new.bias = child.bias
            model._modules[name] = new
            hook = getattr(child, post_processing_function, None) if post_processing_function else None
            if hook is not None:
                hook(child)
    return model


def sync_gpu(t: torch.Tensor) -> None:
    """Waits for the work queued on ``t``'s device (CUDA or XPU); nothing to do on the CPU."""
    if t.device.type == "cuda":
        torch.cuda.synchronize(t.device)
    elif t.device.type == "xpu":
        torch.xpu.synchronize(t.device)
