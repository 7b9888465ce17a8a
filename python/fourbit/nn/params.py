"""``Params4bit``: a frozen weight that becomes 4-bit on its first move to a device.

Same constructor, attributes and move semantics as ``bitsandbytes.nn.Params4bit``:

- Built from a float tensor it is *not yet quantized* (``bnb_quantized=False``). The first
  ``.to(device)`` / ``.cuda()`` / ``.cpu()`` to a real (non-meta) device quantizes it there,
  in place, and returns it; ``quantize()`` does the same explicitly. Quantizing on the CPU
  works (fourbit has CPU kernels), so ``.cpu()`` or ``quantize()`` is the CPU path.
- Once quantized, ``data`` holds the packed codes ``[(numel + 1) // (2 * itemsize), 1]`` of
  ``quant_storage`` and ``quant_state`` (a ``fourbit.functional.QuantState``) everything
  else. A move carries both: the packed bytes and the QuantState (moved in place, as
  bitsandbytes does, so every holder of the state sees the new device).

Where it differs from bitsandbytes, on purpose:

- A quantized weight ignores dtype casts in ``.to()``: the packed bytes are codes, not
  numbers, and casting them (bitsandbytes does) silently destroys the weight.
- A not-yet-quantized weight moved with a dtype (``.to("cpu", torch.bfloat16)``) is cast
  first and then quantized, so ``quant_state.dtype`` is the requested dtype.
- ``copy.deepcopy`` keeps ``module.quant_state is module.weight.quant_state`` (one state,
  copied once), and pickling keeps the ``Params4bit`` type and its attributes.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch

from .. import functional as F
from ..functional import _check_blocksize, _check_quant_type  # noqa: F401 (re-exported to nn)

def _check_quant_storage(quant_storage, name="quant_storage"):
    if (not isinstance(quant_storage, torch.dtype) or quant_storage.is_complex
            or quant_storage == torch.bool):
        raise ValueError(f"{name} must be a real torch dtype (torch.uint8 by default, or the model's "
                         f"float dtype for FSDP), got {quant_storage!r}")


# The attributes a Params4bit carries besides its data (bitsandbytes' names).
_ATTRS = ("blocksize", "compress_statistics", "quant_type", "quant_state", "quant_storage", "bnb_quantized",
          "module")


def _rebuild_params4bit(cls, data, requires_grad, attrs):
    """Unpickling target of Params4bit.__reduce_ex__ (module level, so pickle finds it)."""
    self = torch.Tensor._make_subclass(cls, data, requires_grad)
    self.__dict__.update(attrs)
    return self


class Params4bit(torch.nn.Parameter):
    """A 4-bit weight parameter, a drop-in for ``bitsandbytes.nn.Params4bit`` (module docstring).

    Args:
        data: the float weight ``[out_features, in_features]`` (or already packed codes when
            ``bnb_quantized=True`` with ``quant_state``).
        requires_grad: False by default: the base weight of QLoRA is frozen (fourbit's matmul
            has no weight gradient).
        quant_state: the QuantState of already-quantized ``data``.
        blocksize: 64 when None; one of 32, 64, ..., 4096.
        compress_statistics: double-quantize the absmax (8-bit, blocks of 256).
        quant_type: ``"fp4"`` (bitsandbytes' default) or ``"nf4"``.
        quant_storage: dtype of the packed tensor (uint8; a float dtype lets FSDP shard it).
        module: stored for bitsandbytes compatibility; fourbit does not use it.
        bnb_quantized: whether ``data`` is already packed.
    """

    def __new__(cls, data: Optional[torch.Tensor] = None, requires_grad: bool = False,
                quant_state: Optional[F.QuantState] = None, blocksize: Optional[int] = None,
                compress_statistics: bool = True, quant_type: str = "fp4",
                quant_storage: torch.dtype = torch.uint8, module: Optional[torch.nn.Module] = None,
                bnb_quantized: bool = False, **kwargs: Any) -> "Params4bit":
        # **kwargs: transformers rebuilds a Params4bit with Params4bit(data, **old.__dict__).
        if data is None:
            data = torch.empty(0)
        blocksize = 64 if blocksize is None else blocksize
        _check_blocksize(blocksize)
        _check_quant_type(quant_type)
        _check_quant_storage(quant_storage)
        if bnb_quantized and quant_state is None:
            raise ValueError("bnb_quantized=True needs the quant_state of the packed data, got quant_state=None")
        self = torch.Tensor._make_subclass(cls, data, requires_grad)
        self.blocksize = blocksize
        self.compress_statistics = compress_statistics
        self.quant_type = quant_type
        self.quant_state = quant_state
        self.quant_storage = quant_storage
        self.bnb_quantized = bnb_quantized
        self.module = module
        return self

    # ------------------------------------------------------------------ QuantState proxies
    # "weight.absmax" and friends are state_dict keys; FSDP resolves them with getattr on the
    # parameter. Properties (not __getattr__) keep torch.compile free of graph breaks.
    def _qs(self, name, nested=False):
        qs = self.__dict__.get("quant_state")
        if qs is None or (nested and qs.state2 is None):
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
        return qs

    absmax = property(lambda self: self._qs("absmax").absmax)
    code = property(lambda self: self._qs("code").code)
    quant_map = property(lambda self: self._qs("quant_map").code)
    offset = property(lambda self: self._qs("offset").offset)
    state2 = property(lambda self: self._qs("state2").state2)
    nested_offset = property(lambda self: self._qs("nested_offset").offset)
    nested_absmax = property(lambda self: self._qs("nested_absmax", True).state2.absmax)
    nested_blocksize = property(lambda self: self._qs("nested_blocksize", True).state2.blocksize)
    nested_quant_map = property(lambda self: self._qs("nested_quant_map", True).state2.code)
    nested_dtype = property(lambda self: self._qs("nested_dtype", True).state2.dtype)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_prequantized(cls, data: torch.Tensor, quantized_stats: dict[str, Any], requires_grad: bool = False,
                          device="cuda", module: Optional[torch.nn.Module] = None, **kwargs: Any) -> "Params4bit":
        """A quantized Params4bit from packed ``data`` and a QuantState dict (``as_dict``
        output, packed or not, as saved by either library). ``quant_storage`` is ``data``'s
        dtype. Malformed stats raise ValueError naming the key."""
        quant_state = F.QuantState.from_dict(quantized_stats, device=device)
        _check_packed_data(data, quant_state, "data")
        return cls(data.to(device), requires_grad=requires_grad, quant_state=quant_state,
                   blocksize=quant_state.blocksize, compress_statistics=quant_state.nested,
                   quant_type=quant_state.quant_type, quant_storage=data.dtype, module=module,
                   bnb_quantized=True)

    def _attrs(self) -> dict[str, Any]:
        return {k: self.__dict__.get(k) for k in _ATTRS}

    def _like(self, data: torch.Tensor) -> "Params4bit":
        """A new Params4bit over ``data`` with this one's attributes (the QuantState shared)."""
        new = torch.Tensor._make_subclass(type(self), data, self.requires_grad)
        new.__dict__.update(self._attrs())
        return new

    # ------------------------------------------------------------------ quantization
    def quantize(self, device=None) -> "Params4bit":
        """Quantizes the float weight in place on ``device`` (default: where it is) and
        returns self. The explicit form of what the first ``.to(device)`` does; on an
        already-quantized weight it is an error, not a silent second quantization."""
        if self.bnb_quantized:
            raise RuntimeError("Params4bit is already quantized (bnb_quantized=True); quantize() needs the "
                               "float weight")
        return self._quantize(self.device if device is None else torch.device(device), None)

    def _quantize(self, device: torch.device, dtype: Optional[torch.dtype]) -> "Params4bit":
        if device.type == "meta" or self.device.type == "meta":
            raise RuntimeError(f"cannot quantize a weight on or to the meta device (weight on {self.device}, "
                               f"target {device}); load real values first")
        w = self.data
        if dtype is not None:
            w = w.to(dtype)
        if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"only a float32, float16 or bfloat16 weight can be quantized, got {w.dtype}")
        w = w.to(device).contiguous()
        packed, quant_state = F.quantize_4bit(w, blocksize=self.blocksize, compress_statistics=self.compress_statistics,
                                              quant_type=self.quant_type, quant_storage=self.quant_storage)
        self.data = packed
        self.quant_state = quant_state
        self.bnb_quantized = True
        return self

    # ------------------------------------------------------------------ moves
    def cpu(self) -> "Params4bit":
        return self.to(device="cpu")

    def cuda(self, device=None, non_blocking: bool = False) -> "Params4bit":
        if isinstance(device, int):
            device = torch.device("cuda", device)
        return self.to(device="cuda" if device is None else device, non_blocking=non_blocking)

    def to(self, *args, **kwargs) -> "Params4bit":
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if not self.bnb_quantized:
            if device is not None and device.type != "meta":
                return self._quantize(device, dtype)
            return self._like(torch.Tensor.to(self.data, device=device, dtype=dtype, non_blocking=non_blocking))
        # Quantized: the packed bytes move as they are (never cast), with their QuantState.
        if device is None:
            return self
        if self.quant_state is not None:
            self.quant_state.to(device)
        data = self.data.to(device=device, non_blocking=non_blocking)
        return self if data.device == self.device else self._like(data)

    # ------------------------------------------------------------------ sharding
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        """``torch.chunk`` / ``torch.split`` of a Params4bit give Params4bit pieces carrying
        its attributes and (shared) QuantState, as in bitsandbytes (#1424: FSDP2 shards
        parameters with them); every other function behaves as for ``nn.Parameter``."""
        with torch._C.DisableTorchFunctionSubclass():
            result = func(*args, **(kwargs or {}))
        if func in _SHARDING_FUNCTIONS and args and isinstance(args[0], Params4bit):
            return tuple(args[0]._like(piece) for piece in result)
        return result

    # ------------------------------------------------------------------ copies
    def __deepcopy__(self, memo):
        if id(self) in memo:
            return memo[id(self)]
        new = torch.Tensor._make_subclass(type(self), copy.deepcopy(self.data, memo), self.requires_grad)
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self._attrs(), memo))
        return new

    def __copy__(self):
        return self._like(self.data)

    def __reduce_ex__(self, protocol):
        return _rebuild_params4bit, (type(self), self.data, self.requires_grad, self._attrs())

    def __repr__(self):
        state = "quantized" if self.bnb_quantized else "not quantized"
        return (f"Params4bit({state}, quant_type={self.quant_type!r}, blocksize={self.blocksize}, "
                f"compress_statistics={self.compress_statistics}, quant_storage={self.quant_storage}, "
                f"data shape={list(self.shape)}, device={self.device})")


_SHARDING_FUNCTIONS = (torch.chunk, torch.split)


def _check_packed_data(data, quant_state: F.QuantState, name: str) -> None:
    """``data`` must hold exactly the packed bytes that ``quant_state`` describes."""
    if not isinstance(data, torch.Tensor):
        raise ValueError(f"'{name}' must be a tensor of packed 4-bit codes, got {type(data).__name__}")
    if not isinstance(quant_state.shape, (list, tuple, torch.Size)):
        raise ValueError(f"'{name}': its quant_state has no shape (got {quant_state.shape!r}); the packed "
                         "bytes cannot be checked or used without it")
    numel = 1
    for d in quant_state.shape:
        numel *= d
    itemsize = data.element_size()
    rows = (numel + 2 * itemsize - 1) // (2 * itemsize)
    if data.dim() != 2 or data.shape[1] != 1 or data.shape[0] != rows:
        raise ValueError(f"'{name}' has shape {list(data.shape)}, but packed 4-bit codes of a "
                         f"{list(quant_state.shape)} weight in {data.dtype} storage have shape [{rows}, 1]")
