"""bitsandbytes-compatible functional API: 4-bit and 8-bit blockwise quantization and
``QuantState``.

Signatures follow ``bitsandbytes.functional`` so that code written for it runs unchanged;
the serialized form of a ``QuantState`` (``as_dict(packed=True)``) is byte-compatible in
both directions. Byte layout and rounding rules: docs/format.md.
"""

from __future__ import annotations

import json
import math
import warnings
from typing import Any, Optional

import torch

from . import _C, _ops

_VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_VALID_QUANT_TYPES = ("nf4", "fp4")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Blocksize of the second-level (nested) quantization of absmax, as in bitsandbytes.
NESTED_BLOCKSIZE = 256

_dynamic_map_cache: dict[tuple[bool, int, int], torch.Tensor] = {}


def get_4bit_type(typename: str, device=None, blocksize: int = 64) -> torch.Tensor:
    """The 16 fp32 values of the ``"nf4"`` or ``"fp4"`` codebook, in code order."""
    if typename not in _VALID_QUANT_TYPES:
        raise ValueError(f"typename must be 'nf4' or 'fp4', got {typename!r}")
    return torch.tensor(_C.codebook_4bit(typename), dtype=torch.float32, device=device or "cpu")


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic quantization map: 256 fp32 values sorted ascending."""
    return torch.tensor(_C.create_dynamic_map(signed, max_exponent_bits, total_bits), dtype=torch.float32)


def _default_dynamic_map(device) -> torch.Tensor:
    key = (True, 7, 8)
    if key not in _dynamic_map_cache:
        _dynamic_map_cache[key] = create_dynamic_map()
    return _dynamic_map_cache[key].to(device)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_blocksize(blocksize, name="blocksize"):
    if blocksize not in _VALID_BLOCKSIZES:
        raise ValueError(f"{name} must be one of {_VALID_BLOCKSIZES}, got {blocksize!r}")


def _check_quant_type(quant_type, name="quant_type"):
    if quant_type not in _VALID_QUANT_TYPES:
        raise ValueError(f"{name} must be 'nf4' or 'fp4', got {quant_type!r}")


def _check_float_dtype(dtype, name):
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be torch.float32, torch.float16 or torch.bfloat16, got {dtype}")


class QuantState:
    """Everything needed to dequantize a blockwise-quantized tensor (bitsandbytes' layout).

    For 4-bit tensors: ``absmax`` (fp32 per block, or uint8 when ``nested``), ``shape``,
    ``code`` (the 16-value codebook), ``blocksize``, ``quant_type``, ``dtype``; when nested,
    ``offset`` (fp32 scalar tensor) and ``state2`` (the QuantState of the absmax).
    """

    valid_quant_types = _VALID_QUANT_TYPES
    valid_qs_type_keys = [f"bitsandbytes__{x}" for x in _VALID_QUANT_TYPES]
    valid_qs_keys = [
        "absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state", "quant_type",
        "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset",
    ]

    def __init__(self, absmax, shape=None, code=None, blocksize=None, quant_type=None, dtype=None,
                 offset=None, state2=None):
        self.absmax = absmax
        self.shape = shape
        self.code = code
        self.dtype = dtype
        self.blocksize = blocksize
        self.quant_type = quant_type
        self.offset = offset
        self.state2 = state2
        self.nested = state2 is not None

    def __getattr__(self, name):
        # "quant_state.bitsandbytes__nf4" state_dict keys resolve through getattr (FSDP FQNs).
        if name.startswith("bitsandbytes__"):
            packed = self.as_dict(packed=True)
            key = "quant_state." + name
            if key in packed:
                return packed[key]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def __getitem__(self, idx):
        """The legacy list layout [absmax, shape, dtype, blocksize, [offset, state2] | None, quant_type]."""
        nested = [self.offset, self.state2] if self.nested else None
        return [self.absmax, self.shape, self.dtype, self.blocksize, nested, self.quant_type][idx]

    # ------------------------------------------------------------------ serialization
    @classmethod
    def from_dict(cls, qs_dict: dict[str, Any], device) -> "QuantState":
        """Rebuild a QuantState from ``as_dict()`` output, packed or not, with or without key
        prefixes. Malformed input raises ValueError naming the offending key."""
        if not isinstance(qs_dict, dict):
            raise ValueError(f"qs_dict must be a dict, got {type(qs_dict).__name__}")
        qs_dict = dict(qs_dict)
        packed_keys = [k for k, v in qs_dict.items() if "quant_state" in k and isinstance(v, torch.Tensor)]
        if "quant_type" not in qs_dict and not packed_keys:
            raise ValueError("expected packed or unpacked quant_state items, found neither "
                             f"(keys: {sorted(qs_dict)})")
        if packed_keys:
            if len(packed_keys) != 1 or packed_keys[0].split(".")[-1] not in cls.valid_qs_type_keys:
                raise ValueError(f"there must be exactly one 'quant_state.bitsandbytes__nf4' or "
                                 f"'quant_state.bitsandbytes__fp4' tensor, found {packed_keys}")
            key = packed_keys[0]
            fields = _unpack_tensor_to_dict(qs_dict.pop(key), key)
            # The key names the codebook as well as the JSON does: they must agree.
            suffix = key.split(".")[-1].removeprefix("bitsandbytes__")
            if fields.get("quant_type") in _VALID_QUANT_TYPES and fields["quant_type"] != suffix:
                raise ValueError(f"quant_state key '{key}' names quant_type {suffix!r} but its JSON says "
                                 f"quant_type={fields['quant_type']!r}; the checkpoint is inconsistent")
            both = sorted({k.split(".")[-1] for k in qs_dict} & set(fields))
            if both:
                raise ValueError(f"quant_state keys {both} are given both as entries and in '{key}'")
            qs_dict.update(fields)
        qs_dict = {k.split(".")[-1]: v for k, v in qs_dict.items()}
        unknown = sorted(set(qs_dict) - set(cls.valid_qs_keys))
        if unknown:
            raise ValueError(f"unexpected quant_state keys {unknown}; valid keys are {cls.valid_qs_keys}")

        to_real_device = device is not None and torch.device(device).type != "meta"

        def need(key, kind):
            if key not in qs_dict:
                raise ValueError(f"quant_state is missing key '{key}'")
            value = qs_dict[key]
            if kind is torch.Tensor and not isinstance(value, torch.Tensor):
                raise ValueError(f"quant_state key '{key}' must be a tensor, got {type(value).__name__}")
            if kind is torch.Tensor and value.is_meta and to_real_device:
                raise ValueError(f"quant_state key '{key}' is on the meta device (it has no values)")
            if kind is int and (not isinstance(value, int) or isinstance(value, bool)):
                raise ValueError(f"quant_state key '{key}' must be an int, got {value!r}")
            return value

        quant_type = need("quant_type", None)  # None: an unpacked 8-bit blockwise state, as bitsandbytes reads
        if quant_type not in _VALID_QUANT_TYPES and (quant_type is not None or packed_keys):
            raise ValueError(f"quant_state key 'quant_type' must be 'nf4' or 'fp4', got {quant_type!r} (None only in "
                             "an unpacked 8-bit blockwise state)")
        blocksize = need("blocksize", int)
        _check_blocksize(blocksize, "quant_state key 'blocksize'")
        dtype = _parse_dtype(need("dtype", str), "dtype")
        shape = qs_dict.get("shape")
        if shape is not None:
            if not isinstance(shape, (list, tuple, torch.Size)) or not all(
                    isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
                raise ValueError(f"quant_state key 'shape' must be a list of non-negative ints, got {shape!r}")
            shape = torch.Size(shape)
        absmax = need("absmax", torch.Tensor)
        code = need("quant_map", torch.Tensor)

        if "nested_absmax" in qs_dict:
            nested_blocksize = need("nested_blocksize", int)
            _check_blocksize(nested_blocksize, "quant_state key 'nested_blocksize'")
            offset = need("nested_offset", None)
            if isinstance(offset, torch.Tensor) and offset.numel() == 1 and offset.is_floating_point():
                offset = offset.item()
            if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
                raise ValueError(f"quant_state key 'nested_offset' must be a finite number, got {offset!r}")
            offset = torch.tensor(float(offset), device=device)
            state2 = cls(absmax=need("nested_absmax", torch.Tensor).to(device).contiguous(),
                         blocksize=nested_blocksize,
                         code=need("nested_quant_map", torch.Tensor).to(device).contiguous(),
                         dtype=_parse_dtype(need("nested_dtype", str), "nested_dtype"))
        else:
            stray = sorted(k for k in qs_dict if k.startswith("nested_"))
            if stray:
                raise ValueError(f"quant_state keys {stray} describe a double-quantized absmax, but key "
                                 "'nested_absmax' is missing")
            offset, state2 = None, None
        state = cls(quant_type=quant_type, absmax=absmax.to(device).contiguous(), blocksize=blocksize,
                    code=code.to(device).contiguous(), dtype=dtype, shape=shape, offset=offset, state2=state2)
        state._validate_sizes()
        return state

    def as_dict(self, packed: bool = False) -> dict[str, Any]:
        """The state as a dict; ``packed=True`` gives tensors only (safetensors-ready), with
        the non-tensor fields as UTF-8 JSON in ``quant_state.bitsandbytes__<quant_type>``."""
        qs = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": self.code,
            "dtype": _dtype_name(self.dtype),
            "shape": tuple(self.shape) if self.shape is not None else None,
        }
        if self.nested:
            qs.update({
                "nested_absmax": self.state2.absmax,
                "nested_blocksize": self.state2.blocksize,
                # A separate copy: safetensors refuses tensors that share storage.
                "nested_quant_map": self.state2.code.clone(),
                "nested_dtype": _dtype_name(self.state2.dtype),
                "nested_offset": self.offset.item(),
            })
        if not packed or self.quant_type is None:
            return qs
        tensors = {k: v for k, v in qs.items() if isinstance(v, torch.Tensor)}
        extras = {k: v for k, v in qs.items() if not isinstance(v, torch.Tensor)}
        tensors["quant_state.bitsandbytes__" + self.quant_type] = _pack_dict_to_tensor(extras)
        return tensors

    def _validate_sizes(self):
        """Cross-checks tensor dtypes, and sizes against shape/blocksize when there is a shape
        (catches truncated or inconsistent checkpoints)."""
        blocks = None
        if self.shape is not None:
            numel = 1
            for d in self.shape:
                numel *= d
            blocks = (numel + self.blocksize - 1) // self.blocksize
        if blocks is not None and self.absmax.numel() != blocks:
            raise ValueError(f"quant_state key 'absmax' has {self.absmax.numel()} elements, but shape "
                             f"{list(self.shape)} with blocksize {self.blocksize} needs {blocks}")
        codes = 256 if self.quant_type is None else 16  # the 8-bit map, or the 4-bit codebook
        if self.code.numel() != codes:
            raise ValueError(f"quant_state key 'quant_map' must have {codes} elements, got {self.code.numel()}")
        # The kernels decode with the codebook of quant_type, not with quant_map: they must agree.
        if self.quant_type in _VALID_QUANT_TYPES and not self.code.is_meta and not torch.equal(
                self.code.cpu(), get_4bit_type(self.quant_type)):
            raise ValueError(f"quant_state key 'quant_map' is not the {self.quant_type} codebook "
                             f"(quant_type={self.quant_type!r}); the checkpoint is inconsistent")
        if self.nested:
            if self.absmax.dtype != torch.uint8:
                raise ValueError(f"quant_state key 'absmax' must be uint8 when nested, got {self.absmax.dtype}")
            if self.state2.absmax.dtype != torch.float32:
                raise ValueError("quant_state key 'nested_absmax' must be float32, got "
                                 f"{self.state2.absmax.dtype}")
            nested_blocks = self.state2.absmax.numel() if blocks is None else (
                (blocks + self.state2.blocksize - 1) // self.state2.blocksize)
            if self.state2.absmax.numel() != nested_blocks:
                raise ValueError(f"quant_state key 'nested_absmax' has {self.state2.absmax.numel()} elements, "
                                 f"but {blocks} blocks with nested_blocksize {self.state2.blocksize} need "
                                 f"{nested_blocks}")
            if self.state2.code.numel() != 256:
                raise ValueError("quant_state key 'nested_quant_map' must have 256 elements, got "
                                 f"{self.state2.code.numel()}")
            if self.state2.code.dtype != torch.float32:
                raise ValueError("quant_state key 'nested_quant_map' must be float32, got "
                                 f"{self.state2.code.dtype}")
        elif self.absmax.dtype != torch.float32:
            raise ValueError(f"quant_state key 'absmax' must be float32, got {self.absmax.dtype}")

    def to(self, device):
        """Moves every tensor of the state to ``device`` in place (as bitsandbytes does)."""
        self.code = self.code.to(device)
        self.absmax = self.absmax.to(device)
        if self.nested:
            self.offset = self.offset.to(device)
            self.state2.absmax = self.state2.absmax.to(device)
            self.state2.code = self.state2.code.to(device)

    def __eq__(self, other):
        if not isinstance(other, QuantState):
            return False
        same_offset = (self.offset == other.offset if self.offset is not None and other.offset is not None
                       else self.offset is other.offset)
        same_state2 = (self.state2 == other.state2 if self.state2 is not None and other.state2 is not None
                       else self.state2 is other.state2)
        return (torch.allclose(self.absmax.float(), other.absmax.float(), atol=1e-6)
                and self.shape == other.shape
                and torch.allclose(self.code, other.code, atol=1e-6)
                and self.dtype == other.dtype and self.blocksize == other.blocksize
                and self.quant_type == other.quant_type and bool(same_offset) and same_state2)

    __hash__ = None


def _parse_dtype(name, key):
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"quant_state key '{key}' must be 'float32', 'float16' or 'bfloat16', got {name!r}")
    return dtype


def _pack_dict_to_tensor(d: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(d).encode("utf-8")), dtype=torch.uint8)


# The JSON of a quant state is a few hundred bytes; anything far larger is not one.
_MAX_QS_JSON_BYTES = 1 << 16


class _HugeInt(str):
    """A JSON integer too long for int() (Python's digit limit): kept as its text, so that
    the key check that meets it names the key instead of failing inside the parser."""

    def __repr__(self):
        return f"<a {len(self)}-digit integer>"


def _parse_json_int(text: str):
    return int(text) if len(text) <= 20 else _HugeInt(text)


def _unpack_tensor_to_dict(t, key) -> dict:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8:
        raise ValueError(f"quant_state key '{key}' must be a uint8 tensor of JSON bytes")
    if t.numel() > _MAX_QS_JSON_BYTES:
        raise ValueError(f"quant_state key '{key}' holds {t.numel()} bytes; a quant state's JSON is at most "
                         f"{_MAX_QS_JSON_BYTES}")
    try:
        d = json.loads(bytes(t.cpu().flatten().tolist()).decode("utf-8"), parse_int=_parse_json_int)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"quant_state key '{key}' does not hold valid JSON ({e}); the checkpoint "
                         "may be truncated") from None
    except RecursionError:
        raise ValueError(f"quant_state key '{key}' holds JSON nested too deeply to be a quant state") from None
    if not isinstance(d, dict):
        raise ValueError(f"quant_state key '{key}' must hold a JSON object, got {type(d).__name__}")
    return d


# ---------------------------------------------------------------------------- 8-bit blockwise

def quantize_blockwise(A: torch.Tensor, code: Optional[torch.Tensor] = None, absmax: Optional[torch.Tensor] = None,
                       out: Optional[torch.Tensor] = None, blocksize: int = 4096,
                       nested: bool = False) -> tuple[torch.Tensor, QuantState]:
    """8-bit blockwise quantization with the dynamic map (or ``code``)."""
    _check_blocksize(blocksize)
    _check_float_dtype(A.dtype, "A.dtype")
    if code is None:
        code = _default_dynamic_map(A.device)
    q, _absmax = torch.ops.fourbit.quantize_blockwise(A, code.to(A.device), blocksize)
    if nested:
        offset = _absmax.mean()
        qabsmax, state2 = quantize_blockwise(_absmax - offset, blocksize=blocksize, nested=False)
        state = QuantState(absmax=qabsmax, code=code.to(A.device, copy=True), blocksize=blocksize,
                           dtype=A.dtype, offset=offset, state2=state2)
    else:
        state = QuantState(absmax=_absmax, code=code.to(A.device, copy=True), blocksize=blocksize, dtype=A.dtype)
    _check_out(out, q, "out")
    _check_out(absmax, state.absmax, "absmax")
    out = out.copy_(q) if out is not None else q
    if absmax is not None:
        state.absmax = absmax.copy_(state.absmax)
    return out, state


def dequantize_blockwise(A: torch.Tensor, quant_state: Optional[QuantState] = None,
                         absmax: Optional[torch.Tensor] = None, code: Optional[torch.Tensor] = None,
                         out: Optional[torch.Tensor] = None, blocksize: int = 4096,
                         nested: bool = False) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`."""
    if quant_state is None and absmax is None:
        raise ValueError("dequantize_blockwise needs quant_state or absmax")
    if A.dtype != torch.uint8:
        raise ValueError(f"A must be uint8, got {A.dtype}")
    if quant_state is None:
        quant_state = QuantState(absmax=absmax, code=code if code is not None else _default_dynamic_map(A.device),
                                 blocksize=blocksize, dtype=torch.float32)
    absmax = quant_state.absmax
    if quant_state.nested:
        absmax = dequantize_blockwise(quant_state.absmax, quant_state.state2) + quant_state.offset
        absmax = absmax.float()
    result = torch.ops.fourbit.dequantize_blockwise(A, absmax, quant_state.code.to(A.device),
                                                    quant_state.blocksize, quant_state.dtype)
    if out is not None:
        return out.copy_(result)
    return result


# ---------------------------------------------------------------------------- 4-bit

def quantize_4bit(A: torch.Tensor, absmax: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
                  blocksize: Optional[int] = None, compress_statistics: bool = False, quant_type: str = "fp4",
                  quant_storage: torch.dtype = torch.uint8) -> tuple[torch.Tensor, QuantState]:
    """Blockwise 4-bit quantization (NF4 or FP4), bitsandbytes' byte layout.

    Returns the packed codes ``[(numel + 1) // (2 * itemsize), 1]`` of ``quant_storage``
    and the QuantState. ``compress_statistics=True`` double-quantizes absmax: the mean is
    subtracted and the rest quantized to 8 bits in blocks of 256.
    """
    blocksize = 64 if blocksize is None else blocksize
    _check_blocksize(blocksize)
    _check_quant_type(quant_type)
    _check_float_dtype(A.dtype, "A.dtype")
    packed, _absmax = torch.ops.fourbit.quantize_4bit(A, blocksize, quant_type, quant_storage)
    code = get_4bit_type(quant_type, device=A.device)
    if compress_statistics:
        offset = _absmax.mean()
        qabsmax, state2 = quantize_blockwise(_absmax - offset, blocksize=NESTED_BLOCKSIZE)
        state = QuantState(absmax=qabsmax, shape=A.shape, dtype=A.dtype, blocksize=blocksize, code=code,
                           quant_type=quant_type, offset=offset, state2=state2)
    else:
        state = QuantState(absmax=_absmax, shape=A.shape, dtype=A.dtype, blocksize=blocksize, code=code,
                           quant_type=quant_type)
    _check_out(out, packed, "out")
    _check_out(absmax, state.absmax, "absmax")
    out = out.copy_(packed) if out is not None else packed
    if absmax is not None:
        state.absmax = absmax.copy_(state.absmax)
    return out, state


def _check_out(out: Optional[torch.Tensor], result: torch.Tensor, name: str) -> None:
    """An ``out=`` buffer receives ``result`` as it is: same dtype, shape and device (a float
    ``out`` for packed codes would hold the codes as numbers)."""
    if out is None:
        return
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(out).__name__}")
    if out.dtype != result.dtype or out.shape != result.shape or out.device != result.device:
        raise ValueError(f"{name} must be a {result.dtype} tensor of shape {list(result.shape)} on "
                         f"{result.device}, got {out.dtype} {list(out.shape)} on {out.device}")


def quantize_nf4(A, absmax=None, out=None, blocksize=None, compress_statistics=False, quant_storage=torch.uint8):
    return quantize_4bit(A, absmax, out, blocksize, compress_statistics, "nf4", quant_storage)


def quantize_fp4(A, absmax=None, out=None, blocksize=None, compress_statistics=False, quant_storage=torch.uint8):
    return quantize_4bit(A, absmax, out, blocksize, compress_statistics, "fp4", quant_storage)


def dequantize_4bit(A: torch.Tensor, quant_state: Optional[QuantState] = None, absmax: Optional[torch.Tensor] = None,
                    out: Optional[torch.Tensor] = None, blocksize: Optional[int] = None,
                    quant_type: str = "fp4") -> torch.Tensor:
    """Inverse of :func:`quantize_4bit`. The nested absmax is decoded inside the same kernel."""
    blocksize = 64 if blocksize is None else blocksize
    if quant_state is None:
        if absmax is None or out is None:
            raise ValueError("dequantize_4bit needs quant_state, or both absmax and out")
        quant_state = QuantState(absmax=absmax, shape=out.shape, dtype=out.dtype, blocksize=blocksize,
                                 quant_type=quant_type)
    qs = quant_state
    _check_blocksize(qs.blocksize, "quant_state.blocksize")
    _check_quant_type(qs.quant_type)
    _check_float_dtype(qs.dtype, "quant_state.dtype")
    if not isinstance(qs.shape, (list, tuple, torch.Size)):
        raise ValueError(f"quant_state.shape must be the shape of the quantized tensor, got {qs.shape!r}")
    shape = list(qs.shape)
    if qs.nested and qs.state2.dtype == torch.float32:
        args = (A, qs.absmax, qs.state2.absmax, qs.state2.code, qs.offset, qs.blocksize, qs.state2.blocksize,
                qs.quant_type, shape, qs.dtype)
        if out is not None:
            torch.ops.fourbit.dequantize_4bit_nested.out(*args, out=out)
        else:
            out = torch.ops.fourbit.dequantize_4bit_nested(*args)
    else:
        scales = qs.absmax
        if qs.nested:  # unusual state2 dtype: decode absmax in a separate pass
            scales = (dequantize_blockwise(qs.absmax, qs.state2) + qs.offset).float()
        if out is not None:
            torch.ops.fourbit.dequantize_4bit.out(A, scales, qs.blocksize, qs.quant_type, shape, qs.dtype, out=out)
        else:
            out = torch.ops.fourbit.dequantize_4bit(A, scales, qs.blocksize, qs.quant_type, shape, qs.dtype)
    # bitsandbytes compatibility: a packed weight passed transposed ([1, n]) comes back transposed.
    if A.dim() == 2 and A.shape[0] == 1 and out.dim() <= 2:
        return out.t()
    return out


def dequantize_nf4(A, quant_state=None, absmax=None, out=None, blocksize=None):
    return dequantize_4bit(A, quant_state, absmax, out, blocksize, "nf4")


def dequantize_fp4(A, quant_state=None, absmax=None, out=None, blocksize=None):
    return dequantize_4bit(A, quant_state, absmax, out, blocksize, "fp4")


# ---------------------------------------------------------------------------- 4-bit matmul

def _weight_args(B: torch.Tensor, quant_state: QuantState) -> tuple:
    """The weight arguments of torch.ops.fourbit.gemm_4bit*: (W, absmax, nested_absmax,
    nested_code, offset, blocksize, nested_blocksize, quant_type, N, K)."""
    qs = quant_state
    if qs.shape is None or len(qs.shape) != 2:
        raise ValueError(f"quant_state.shape must be the 2-D weight shape [out_features, in_features], "
                         f"got {None if qs.shape is None else list(qs.shape)}")
    N, K = int(qs.shape[0]), int(qs.shape[1])
    if qs.nested and qs.state2.dtype == torch.float32:
        return (B, qs.absmax, qs.state2.absmax, qs.state2.code, qs.offset, qs.blocksize, qs.state2.blocksize,
                qs.quant_type, N, K)
    absmax = qs.absmax
    if qs.nested:  # unusual state2 dtype: decode absmax in a separate pass
        absmax = (dequantize_blockwise(qs.absmax, qs.state2) + qs.offset).float()
    return (B, absmax, None, None, None, qs.blocksize, NESTED_BLOCKSIZE, qs.quant_type, N, K)


def matmul_4bit(A: torch.Tensor, B: torch.Tensor, quant_state: QuantState, out: Optional[torch.Tensor] = None,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``A @ dequantize_4bit(B)^T + bias`` without materialising the dequantized weight.

    Call-compatible with ``bitsandbytes.matmul_4bit``: ``B`` is the packed weight, passed
    as stored (``[n, 1]``) or transposed (``B.t()``, what ``Linear4bit`` passes); either
    way the weight is ``quant_state.shape`` = ``[out_features, in_features]`` and the
    result has shape ``A.shape[:-1] + [out_features]`` and ``A``'s dtype. Products
    accumulate in fp32 with the fp32-decoded weight (bitsandbytes rounds the weight to
    ``A.dtype`` first, so results differ by at most that rounding). Differentiable in
    ``A`` and ``bias``; the weight is frozen.
    """
    if quant_state is None:
        raise ValueError("matmul_4bit needs the weight's quant_state, got None")
    if not isinstance(A, torch.Tensor):
        raise ValueError(f"A must be a tensor, got {type(A).__name__}")
    _check_float_dtype(A.dtype, "A.dtype")
    if bias is not None and bias.dtype != A.dtype:
        bias = bias.to(A.dtype)
    shape = quant_state.shape
    if shape is not None and len(shape) == 2 and A.shape[-1] == shape[0] != shape[1]:
        return _matmul_4bit_kn(A, B, quant_state, out, bias)
    W, absmax, nested_absmax, nested_code, offset, *config = _weight_args(B, quant_state)
    result = _ops.gemm_4bit(A, W, absmax, nested_absmax, nested_code, offset, bias, *config, "auto")
    if out is not None:
        return out.copy_(result)
    return result


def _matmul_4bit_kn(A, B, quant_state, out, bias):
    """bitsandbytes' deprecated orientation: a weight quantized from a ``[K, N]`` tensor
    (``quant_state.shape[0]`` is A's inner dimension): ``A @ deq(B) + bias``, dequantized
    first, with bitsandbytes' DeprecationWarning."""
    if not torch.compiler.is_compiling():
        warnings.warn(f"matmul_4bit: weight was quantized from a [K, N] tensor (quant_state.shape="
                      f"{list(quant_state.shape)}). Re-quantize from the weight in [N, K] (out_features, "
                      "in_features) orientation. This will be an error in a future version.",
                      DeprecationWarning, stacklevel=3)
    weight = dequantize_4bit(B.reshape(-1, 1), quant_state).to(A.dtype)
    result = torch.nn.functional.linear(A, weight.t(), bias)
    return out.copy_(result) if out is not None else result


def gemv_4bit(A: torch.Tensor, B: torch.Tensor, out: Optional[torch.Tensor] = None, transposed_A: bool = False,
              transposed_B: bool = False, state: Optional[QuantState] = None) -> torch.Tensor:
    """bitsandbytes' ``gemv_4bit``: ``A @ dequantize_4bit(B)^T`` for the packed weight ``B``
    (as stored or transposed) and its QuantState ``state``, computed by ``matmul_4bit``
    (any number of rows in ``A``). ``transposed_A`` /
    ``transposed_B`` are accepted and ignored, as in bitsandbytes. No bias; not
    differentiable in the weight."""
    if state is None:
        raise ValueError("state cannot be None. gemv_4bit() requires the state from quantize_4bit()")
    return matmul_4bit(A, B, state, out=out)


# ---------------------------------------------------------------------------- LoRA on a 4-bit weight

def _lora_4bit(x: torch.Tensor, W: torch.Tensor, weight_args: tuple, lora_A: torch.Tensor, lora_B: torch.Tensor,
               scaling: float, bias: Optional[torch.Tensor], x_lora: Optional[torch.Tensor]) -> torch.Tensor:
    """``x @ deq(W)^T + bias + scaling * (x_lora @ lora_A^T) @ lora_B^T`` (``x_lora`` defaults
    to ``x``; it is the dropped-out input when LoRA dropout is on). ``weight_args`` are
    gemm_4bit's arguments after ``W``; every tensor is already in ``x``'s dtype and device.
    Differentiable in x, x_lora, lora_A, lora_B and bias. The one place the LoRA product is
    computed, for ``lora_matmul_4bit``, ``nn.LoraLinear4bit`` and the PEFT layer: the fused
    op ``torch.ops.fourbit.lora_4bit`` (docs/kernels.md, "LoRA"), or, for ranks above its
    limit (``r > 1024``), the same product composed of gemm_4bit and two matmuls."""
    absmax, nested_absmax, nested_code, offset, *config = weight_args
    if lora_A.shape[0] <= _ops.LORA_MAX_RANK:
        y, _ = _ops.lora_4bit(x, W, absmax, nested_absmax, nested_code, offset, bias, *config,
                              lora_A, lora_B, scaling, x_lora)
        return y
    y = _ops.gemm_4bit(x, W, absmax, nested_absmax, nested_code, offset, bias, *config, "auto")
    xa = torch.nn.functional.linear(x if x_lora is None else x_lora, lora_A)
    return torch.addmm(y.reshape(-1, y.shape[-1]), xa.reshape(-1, xa.shape[-1]), lora_B.t(),
                       alpha=scaling).view(y.shape)


def lora_matmul_4bit(A: torch.Tensor, B: torch.Tensor, quant_state: QuantState, lora_A: torch.Tensor,
                     lora_B: torch.Tensor, scaling: float, bias: Optional[torch.Tensor] = None,
                     A_lora: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``matmul_4bit(A, B, quant_state, bias=bias) + scaling * (A_lora @ lora_A^T) @ lora_B^T``:
    a 4-bit linear layer with a LoRA adapter (``lora_A``: ``[r, in_features]``, ``lora_B``:
    ``[out_features, r]``), ``A_lora`` defaulting to ``A`` (pass the dropped-out input for
    LoRA dropout). The adapter weights are cast to ``A.dtype`` for the product (gradients
    flow back to them in their own dtype). Differentiable in A, A_lora, lora_A, lora_B and
    bias; the 4-bit weight is frozen."""
    if quant_state is None:
        raise ValueError("lora_matmul_4bit needs the weight's quant_state, got None")
    for name, t in (("A", A), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    _check_float_dtype(A.dtype, "A.dtype")
    W, *weight_args = _weight_args(B, quant_state)
    N, K = weight_args[-2], weight_args[-1]
    if lora_A.dim() != 2 or lora_A.shape[1] != K:
        raise ValueError(f"lora_A must be [r, in_features={K}], got shape {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if lora_B.dim() != 2 or tuple(lora_B.shape) != (N, r):
        raise ValueError(f"lora_B must be [out_features={N}, r={r}], got shape {tuple(lora_B.shape)}")
    if A_lora is not None and A_lora.shape != A.shape:
        raise ValueError(f"A_lora must have A's shape {tuple(A.shape)}, got {tuple(A_lora.shape)}")
    dtype = A.dtype
    bias = None if bias is None else bias.to(dtype)
    A_lora = None if A_lora is None else A_lora.to(dtype)
    return _lora_4bit(A, W, tuple(weight_args), lora_A.to(dtype), lora_B.to(dtype), float(scaling), bias, A_lora)


__all__ = [
    "QuantState", "get_4bit_type", "create_dynamic_map", "quantize_blockwise", "dequantize_blockwise",
    "quantize_4bit", "dequantize_4bit", "quantize_nf4", "quantize_fp4", "dequantize_nf4", "dequantize_fp4",
    "matmul_4bit", "lora_matmul_4bit", "gemv_4bit",
]
