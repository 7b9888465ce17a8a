"""``replace_linear``: turn a model's ``nn.Linear`` layers into ``Linear4bit``, in place, streaming.

The conversion is one layer at a time: build an empty ``Linear4bit`` (on the meta device, so
no second float weight is allocated), wrap the layer's float weight in a ``Params4bit``,
quantize it on the target device, put the new layer where the old one was, and drop the old
one before the next. Nothing outside the loop holds a reference to a converted layer (the
selection is kept as names, not modules), so each float weight is freed as soon as its
layer is replaced, and the memory in use on the target device is the 4-bit layers built so
far plus one float layer (and the quantization's few temporaries, about 1/16 of it).

Which layers: every ``nn.Linear`` (subclasses included, ``Linear4bit`` itself excluded, so a
second call converts only what the first left) whose name is selected by ``include`` and
not by ``exclude``. The matching rule, one function for both lists:

- a pattern *matches* a module name if ``fnmatch.fnmatchcase`` accepts the full dotted name
  or one of its dotted suffixes: ``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``,
  ``"lm_head"`` matches ``lm_head``, ``"layers.1.*"`` matches every module under
  ``model.layers.1``, ``"*.mlp.*_proj"`` the MLP projections. A suffix starts after a dot,
  so ``"proj"`` does not match ``q_proj``, and ``"*"`` in a pattern also crosses dots.
- a layer is *selected* by a list if a pattern matches its name or the name of one of its
  parents: ``exclude=("vision_tower",)`` keeps every layer inside the vision tower.

``include=None`` means every ``nn.Linear``; ``exclude`` wins over ``include``. The default
``exclude=("lm_head",)`` keeps the output head in full precision, as transformers'
``llm_int8_skip_modules`` default does for causal LMs.
"""

from __future__ import annotations

import fnmatch
from typing import Iterable, Optional, Union

import torch
from torch import nn

from .linear import _COMPUTE_DTYPES, Linear4bit
from .params import Params4bit, _check_blocksize, _check_quant_storage, _check_quant_type

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

Patterns = Union[str, Iterable[str], None]


def _patterns(value: Patterns, name: str) -> Optional[tuple[str, ...]]:
    """None, one pattern or an iterable of patterns -> a tuple of non-empty strings."""
    if value is None:
        return None
    if isinstance(value, str):
        value = (value,)
    try:
        patterns = tuple(value)
    except TypeError:
        raise ValueError(f"{name} must be None, a module-name pattern or a list of them, "
                         f"got {value!r}") from None
    for p in patterns:
        if not isinstance(p, str) or not p:
            raise ValueError(f"{name} must hold non-empty module-name patterns (str), got {p!r} in {value!r}")
    return patterns


def _name_matches(name: str, pattern: str) -> bool:
    """``pattern`` matches the full dotted ``name`` or one of its dotted suffixes."""
    if fnmatch.fnmatchcase(name, pattern):
        return True
    start = name.find(".")
    while start != -1:
        if fnmatch.fnmatchcase(name[start + 1:], pattern):
            return True
        start = name.find(".", start + 1)
    return False


def _selected(name: str, patterns: tuple[str, ...]) -> bool:
    """A pattern matches ``name`` or one of its parents' names."""
    parts = name.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(_name_matches(prefix, p) for prefix in prefixes for p in patterns)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _convert(old: nn.Linear, target: torch.device, quant_type: str, compress_statistics: bool, blocksize: int,
             compute_dtype: Optional[torch.dtype], quant_storage: torch.dtype) -> Linear4bit:
    """A quantized Linear4bit with ``old``'s weight (quantized on ``target``) and bias."""
    # Built on meta: the constructor's float weight would be a second full-size allocation.
    new = Linear4bit(old.in_features, old.out_features, bias=False, compute_dtype=compute_dtype,
                     compress_statistics=compress_statistics, quant_type=quant_type,
                     quant_storage=quant_storage, device="meta")
    # Shares old.weight's storage until quantize() swaps in the packed codes.
    new.weight = Params4bit(old.weight.data, requires_grad=False, blocksize=blocksize,
                            compress_statistics=compress_statistics, quant_type=quant_type,
                            quant_storage=quant_storage)
    new.weight.quantize(target)
    if old.bias is not None:
        bias = old.bias
        if bias.device != target:
            bias = nn.Parameter(bias.data.to(target), requires_grad=bias.requires_grad)
        new.bias = bias  # the same Parameter (dtype and requires_grad kept) when it is already there
    new.train(old.training)
    return new


@torch.no_grad()
def replace_linear(model: nn.Module, *, quant_type: str = "nf4", compress_statistics: bool = True,
                   blocksize: int = 64, compute_dtype: Optional[torch.dtype] = None,
                   quant_storage: torch.dtype = torch.uint8, include: Patterns = None,
                   exclude: Patterns = ("lm_head",), device=None) -> nn.Module:
    """Replaces, in place and one layer at a time, the ``nn.Linear`` layers of ``model`` by
    quantized ``fourbit.nn.Linear4bit`` layers; returns ``model``.

    Args:
        model: any ``nn.Module`` (a transformers model or a plain one) holding the layers.
        quant_type: ``"nf4"`` (default here: the QLoRA choice) or ``"fp4"``.
        compress_statistics: double-quantize the absmax (8-bit, blocks of 256).
        blocksize: elements per absmax block: 32, 64, ..., 4096.
        compute_dtype: the layers' ``compute_dtype`` (None: from the first input, as
            bitsandbytes does).
        quant_storage: dtype of the packed weight (uint8; the model's float dtype for FSDP).
        include: module-name patterns of the layers to convert (module docstring for the
            rule); None converts every ``nn.Linear``. Each pattern given must match a module
            that is or contains an ``nn.Linear``, or the call fails before changing anything.
        exclude: patterns of layers to keep as they are; wins over ``include``. A pattern that
            matches nothing is fine (the default ``"lm_head"`` on a model without one).
        device: where the weights are quantized and the new layers live (e.g. ``"cuda"`` for
            a model loaded on the CPU: only one float layer is ever on the GPU). None: each
            weight's own device. Only the converted layers move; move the rest of the model
            (embeddings, norms, excluded layers) yourself.

    The quantized weight keeps the float weight's dtype in its QuantState and is frozen
    (``requires_grad=False``). The bias is the old layer's bias Parameter, same dtype and
    ``requires_grad`` (a copy on ``device`` if it was elsewhere). Hooks registered on a
    replaced layer are not carried over. A weight tied to another module (an ``lm_head``
    tied to the embeddings, if included) stays alive in that module: it is still
    quantized here, but its float bytes are not freed.

    Raises:
        ValueError: a bad argument (naming it and its value), ``model`` itself an
            ``nn.Linear``, an ``include`` pattern matching no module or only modules with no
            ``nn.Linear`` in them, a selected layer whose weight is on the meta device or
            not float32/float16/bfloat16. All are checked before any layer changes.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Linear):
        raise ValueError(f"model is itself a {type(model).__name__}; replace_linear replaces the layers inside "
                         "a model: build a fourbit.nn.Linear4bit directly (or wrap the layer in a module)")
    _check_quant_type(quant_type)
    _check_blocksize(blocksize)
    _check_quant_storage(quant_storage)
    if not isinstance(compress_statistics, bool):
        raise ValueError(f"compress_statistics must be True or False, got {compress_statistics!r}")
    if compute_dtype is not None and compute_dtype not in _COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be None, torch.float32, torch.float16 or torch.bfloat16, "
                         f"got {compute_dtype!r}")
    include_p = _patterns(include, "include")
    exclude_p = _patterns(exclude, "exclude") or ()
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be None or a torch device (e.g. 'cuda', 'cpu'), got {device!r}") from None
        if device.type == "meta":
            raise ValueError("device must be a real device to quantize on, got device='meta'")

    # Names only: holding the modules here would keep every float weight alive to the end.
    # remove_duplicate=False: a layer registered under two names is replaced under both.
    names_of: dict[int, list[str]] = {}
    linear_names: list[str] = []
    all_names: list[str] = []
    for name, module in model.named_modules(remove_duplicate=False):
        if not name:
            continue
        all_names.append(name)
        if isinstance(module, nn.Linear):
            linear_names.append(name)
            if not isinstance(module, Linear4bit):
                names_of.setdefault(id(module), []).append(name)
    del module

    if include_p is not None:
        for pattern in include_p:
            hits = [n for n in all_names if _name_matches(n, pattern)]
            if not hits:
                example = linear_names[0] if linear_names else (all_names[0] if all_names else "<none>")
                raise ValueError(f"include pattern {pattern!r} matches no module of the model (names are dotted "
                                 f"paths such as {example!r})")
            if not any(_selected(n, (pattern,)) for n in linear_names):
                raise ValueError(f"include pattern {pattern!r} matches {hits[0]!r} "
                                 f"({type(model.get_submodule(hits[0])).__name__}), which is not an nn.Linear "
                                 "and has none inside")

    groups = []
    for names in names_of.values():
        if any((include_p is None or _selected(n, include_p)) and not _selected(n, exclude_p) for n in names):
            groups.append(names)

    for names in groups:  # checked before anything changes
        weight = model.get_submodule(names[0]).weight
        if weight.device.type == "meta":
            raise ValueError(f"{names[0]}.weight is on the meta device; load real values before replace_linear")
        if weight.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{names[0]}.weight is {weight.dtype}; only float32, float16 or bfloat16 weights "
                             "can be quantized")
    weight = None

    for names in groups:
        old = model.get_submodule(names[0])
        new = _convert(old, old.weight.device if device is None else device, quant_type, compress_statistics,
                       blocksize, compute_dtype, quant_storage)
        for name in names:
            _set_submodule(model, name, new)
        del old, new  # the old layer (and its float weight) goes now, not at the end
    return model
