"""``prepare_model_for_kbit_training``: PEFT's function of that name, for fourbit models.

It does what ``peft.prepare_model_for_kbit_training`` does, in the same order:

1. freezes every parameter (``requires_grad=False``);
2. casts every float16/bfloat16 parameter that is not a 4-bit weight (``Params4bit``,
   fourbit's or bitsandbytes') to float32: norms, embeddings, an unquantized ``lm_head``,
   biases. That is PEFT's rule (not only the layer norms); a 4-bit weight stored in a float
   dtype (``quant_storage=torch.bfloat16``) holds codes and is never cast;
3. with ``use_gradient_checkpointing``: if the checkpointing is reentrant (no
   ``use_reentrant`` in ``gradient_checkpointing_kwargs``, or ``use_reentrant=True``), makes
   the input embeddings' output require grad (``model.enable_input_require_grads()``, or a
   forward hook on ``model.get_input_embeddings()``) so that the frozen layers' checkpointed
   segments still carry gradients to adapters inside them; then enables gradient
   checkpointing with ``gradient_checkpointing_kwargs``.

Differences from PEFT, on purpose:

- PEFT does step 3 only for models that report being quantized (``is_loaded_in_4bit`` and
  friends, set by transformers' quantizers); a model converted by
  ``fourbit.nn.replace_linear`` carries no such flag, so here step 3 follows
  ``use_gradient_checkpointing`` alone.
- Plain ``nn.Module`` models: step 3 applies what the model supports. Input grads need
  ``enable_input_require_grads`` or ``get_input_embeddings``; checkpointing needs
  ``activation_checkpointing_enable`` / ``gradient_checkpointing_enable``. What a model
  lacks is skipped (the model is returned frozen and upcast) and no error is raised.
- On transformers versions that have ``activation_checkpointing_enable`` (the successor of
  the deprecated ``gradient_checkpointing_enable``), that is what is called, so no
  deprecation warning is raised; the kwargs go to ``torch.utils.checkpoint`` either way.
- ``gradient_checkpointing_kwargs=None``: PEFT passes ``{}`` to transformers, which leaves
  ``use_reentrant`` to torch's default (and torch warns that it must be passed); here None
  is passed on, so the model's own default applies (transformers 4.35+ fills in
  ``use_reentrant``). The input-grad hook is installed for None, as in PEFT.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
from torch import nn

from .nn.params import Params4bit

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _is_4bit_weight(param: torch.Tensor) -> bool:
    # bitsandbytes' Params4bit is recognized by name, as PEFT does, without importing it.
    return isinstance(param, Params4bit) or type(param).__name__ == "Params4bit"


def _make_output_require_grad(module, inputs, output):
    if isinstance(output, torch.Tensor) and output.is_floating_point():
        output.requires_grad_(True)


def _enable_input_require_grads(model: nn.Module) -> bool:
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
        return True
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    if embeddings is None:
        return False
    embeddings.register_forward_hook(_make_output_require_grad)
    return True


def _enable_checkpointing(model: nn.Module, kwargs: Optional[dict]) -> bool:
    """``kwargs=None`` leaves the checkpoint arguments to the model's default."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if callable(enable):
        enable(activation_checkpointing_kwargs=kwargs)
        return True
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if not callable(enable):
        return False
    if "gradient_checkpointing_kwargs" in inspect.signature(enable).parameters:
        enable(gradient_checkpointing_kwargs=kwargs)
    elif kwargs:
        raise ValueError(f"gradient_checkpointing_kwargs={kwargs!r}, but this model's gradient_checkpointing_enable "
                         "takes no kwargs (transformers older than 4.35); pass None or upgrade transformers")
    else:
        enable()
    return True


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: Optional[dict[str, Any]] = None) -> nn.Module:
    """Prepares a 4-bit model (e.g. converted by ``fourbit.nn.replace_linear``) for adapter
    training, as ``peft.prepare_model_for_kbit_training`` does (module docstring for the
    steps and the differences). Returns ``model``, changed in place.

    Args:
        model: a transformers model or any ``nn.Module``.
        use_gradient_checkpointing: enable gradient checkpointing (and the input-grad hook
            that reentrant checkpointing needs) where the model supports it.
        gradient_checkpointing_kwargs: passed to ``torch.utils.checkpoint.checkpoint``
            through the model, e.g. ``{"use_reentrant": False}``; None: the model's default.

    Raises:
        ValueError: ``model`` not an ``nn.Module``, ``gradient_checkpointing_kwargs`` not a
            dict (or non-empty for a model whose checkpointing takes none).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(use_gradient_checkpointing, bool):
        raise ValueError(f"use_gradient_checkpointing must be True or False, got {use_gradient_checkpointing!r}")
    if gradient_checkpointing_kwargs is not None and not isinstance(gradient_checkpointing_kwargs, dict):
        raise ValueError(f"gradient_checkpointing_kwargs must be None or a dict, got {gradient_checkpointing_kwargs!r}")

    for param in model.parameters():
        param.requires_grad_(False)
    for param in model.parameters():
        if param.dtype in _HALF_DTYPES and not _is_4bit_weight(param):
            param.data = param.data.to(torch.float32)

    if use_gradient_checkpointing:
        # Non-reentrant checkpointing propagates gradients without the hook.
        if (gradient_checkpointing_kwargs or {}).get("use_reentrant", True):
            _enable_input_require_grads(model)
        _enable_checkpointing(model, None if gradient_checkpointing_kwargs is None
                              else dict(gradient_checkpointing_kwargs))
    return model
