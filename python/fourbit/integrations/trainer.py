"""transformers' Trainer (and TRL's trainers) with fourbit's optimizers: one added argument.

The Trainer builds the optimizer named by ``TrainingArguments.optim``; for the bitsandbytes
names (``"paged_adamw_8bit"``, ...) that is bitsandbytes' optimizer, or an ImportError
without it. Its public ``optimizer_cls_and_kwargs`` argument takes a class and keyword
arguments instead, and ``optimizer_cls_and_kwargs(args)`` gives fourbit's for the same name::

    from fourbit.integrations.trainer import optimizer_cls_and_kwargs

    args = SFTConfig(..., optim="paged_adamw_8bit", learning_rate=2e-4, weight_decay=0.01)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds,
                         optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(args))   # the one line

The Trainer still builds its parameter groups (weight decay on all but biases and norms, as
usual) and saves and restores the optimizer's ``state_dict`` in its checkpoints, so
``trainer.train(resume_from_checkpoint=...)`` continues with fourbit's states.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from ..optim import AdamW, GlobalOptimManager

__all__ = ["optimizer_cls_and_kwargs", "OPTIMIZERS"]

# TrainingArguments.optim -> (optim_bits, is_paged) of fourbit's AdamW: transformers' names for
# bitsandbytes' AdamW variants, and the torch names that mean plain 32-bit AdamW.
OPTIMIZERS = {
    "adamw_bnb_8bit": (8, False),
    "adamw_8bit": (8, False),
    "paged_adamw_8bit": (8, True),
    "paged_adamw_32bit": (32, True),
    "adamw_torch": (32, False),
    "adamw_torch_fused": (32, False),
}
# optim_args keys (TrainingArguments.optim_args, "key=value,key=value") and their types.
_OPTIM_ARGS = {"min_8bit_size": int, "eps": float, "beta1": float, "beta2": float}


def _parse_optim_args(text) -> dict[str, Any]:
    if text is None or text == "":
        return {}
    if not isinstance(text, str):
        raise ValueError(f"optim_args must be a string 'key=value,key=value', got {text!r}")
    parsed = {}
    for item in text.replace(" ", "").split(","):
        key, sep, value = item.partition("=")
        if not sep or key not in _OPTIM_ARGS:
            raise ValueError(f"optim_args entry {item!r} is not one of {sorted(_OPTIM_ARGS)} as key=value "
                             f"(optim_args={text!r})")
        try:
            parsed[key] = _OPTIM_ARGS[key](value)
        except ValueError:
            raise ValueError(f"optim_args entry {item!r}: {value!r} is not a valid "
                             f"{_OPTIM_ARGS[key].__name__}") from None
    return parsed


def optimizer_cls_and_kwargs(args, model: Optional[nn.Module] = None) -> tuple[type, dict[str, Any]]:
    """``(fourbit.optim.AdamW, kwargs)`` for a ``TrainingArguments`` / ``SFTConfig``: the
    ``optim`` name (table ``OPTIMIZERS``) sets 8- or 32-bit and paged states;
    ``learning_rate``, ``weight_decay``, ``adam_beta1``, ``adam_beta2`` and ``adam_epsilon``
    are honoured, and ``optim_args`` may set ``min_8bit_size``, ``eps``, ``beta1`` and
    ``beta2``. Pass the result as the Trainer's ``optimizer_cls_and_kwargs``.

    With ``model``, every ``nn.Embedding`` weight of it keeps 32-bit states under an 8-bit
    ``optim`` (registered with ``fourbit.optim.GlobalOptimManager``), which is what the Trainer
    does for bitsandbytes' 8-bit optimizers.

    Raises ValueError naming an ``optim`` fourbit has no optimizer for, or a bad
    ``optim_args`` entry.
    """
    optim = getattr(args, "optim", None)
    optim = str(getattr(optim, "value", optim))
    if optim not in OPTIMIZERS:
        raise ValueError(f"optim={optim!r} has no fourbit optimizer; fourbit provides {sorted(OPTIMIZERS)}")
    optim_bits, is_paged = OPTIMIZERS[optim]
    extra = _parse_optim_args(getattr(args, "optim_args", None))
    kwargs = {
        "lr": args.learning_rate,
        "betas": (extra.pop("beta1", args.adam_beta1), extra.pop("beta2", args.adam_beta2)),
        "eps": extra.pop("eps", args.adam_epsilon),
        # The Trainer's parameter groups carry their own weight decay (0 for biases and norms).
        "weight_decay": args.weight_decay,
        "optim_bits": optim_bits,
        "is_paged": is_paged,
        **extra,
    }
    if model is not None and optim_bits == 8:
        manager = GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    return AdamW, kwargs
