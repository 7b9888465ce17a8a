"""``Linear4bit`` (and ``LinearNF4`` / ``LinearFP4``): drop-ins for bitsandbytes' classes.

Same constructor arguments and defaults, same ``.to()``/``.cuda()`` behaviour (the weight
is quantized on its first move to a device, see ``params.py``), same compute-dtype rule
and warning, and the same ``state_dict`` keys and bytes, so checkpoints move both ways.

The forward is one call of ``torch.ops.fourbit.gemm_4bit`` (fused dequantize + matmul +
bias, autograd for the input and bias registered in ``fourbit._ops``). Its weight
arguments are unpacked from the QuantState once and cached; a call only checks that the
cached arguments still belong to the weight's current QuantState (two identity tests).

Differences from bitsandbytes, on purpose:

- The forward never changes a parameter: bitsandbytes rewrites ``bias.data`` to the compute
  dtype on the first call (which changes what ``state_dict()`` saves and what an optimizer
  holds); fourbit casts the bias for the product only, and only if its dtype differs.
- ``load_state_dict`` understands the quantized keys (bitsandbytes' Linear4bit has no
  loader; it needs ``Params4bit.from_prequantized``), checks every entry before changing
  anything, and reports a bad entry under its key.
- A forward on a weight that was never quantized is an error that says what to call.

For FSDP2, ``fourbit.integrations.distributed.prepare_fsdp`` turns the weight into one flat
byte parameter (codes and QuantState); the forward then computes on zero-copy views of the
gathered bytes (``_packed_weight``; docs/distributed.md).
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from .. import _ops
from .. import functional as F
from .params import Params4bit, _check_packed_data, _check_quant_storage, _check_quant_type

_COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_QS_KEY_PREFIX = "quant_state.bitsandbytes__"

# bitsandbytes' warnings for float16 inputs with a float32 (or unset) compute dtype, verbatim.
_FP16_WARNING_SINGLE = ("Input type into Linear4bit is torch.float16, but bnb_4bit_compute_dtype=torch.float32 "
                        "(default). This will lead to slow inference.")
_FP16_WARNING_BATCH = ("Input type into Linear4bit is torch.float16, but bnb_4bit_compute_dtype=torch.float32 "
                       "(default). This will lead to slow inference or training speed.")


class Linear4bit(nn.Linear):
    """A linear layer with a frozen 4-bit weight (QLoRA), a drop-in for
    ``bitsandbytes.nn.Linear4bit``.

    Build it, load float weights (``load_state_dict`` of an ``nn.Linear``), then move it:
    ``.cuda()`` / ``.to("cuda")`` quantizes on the GPU, ``.cpu()`` / ``.to("cpu")`` or
    ``quantize()`` on the CPU. Or load a quantized checkpoint saved by either library.

    Args:
        input_features, output_features: the weight is ``[output_features, input_features]``.
        bias: whether to add a (trainable) bias.
        compute_dtype: dtype of the product. None: taken from the first input (float32 and
            bfloat16 inputs set it; a float16 input leaves it unset and is computed in
            float16, with bitsandbytes' warning). Inputs are cast to it and the output back
            to the input's dtype.
        compress_statistics: double-quantize the absmax (bitsandbytes' default, True).
        quant_type: ``"fp4"`` (default, as in bitsandbytes) or ``"nf4"``.
        quant_storage: dtype of the packed weight tensor (uint8; the model's float dtype
            for FSDP).
        device: where the float weight is created (it is not quantized yet).
    """

    def __init__(self, input_features: int, output_features: int, bias: bool = True,
                 compute_dtype: Optional[torch.dtype] = None, compress_statistics: bool = True,
                 quant_type: str = "fp4", quant_storage: torch.dtype = torch.uint8, device=None):
        _check_quant_type(quant_type)
        _check_quant_storage(quant_storage)
        if compute_dtype is not None and compute_dtype not in _COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be None, torch.float32, torch.float16 or torch.bfloat16, "
                             f"got {compute_dtype!r}")
        super().__init__(input_features, output_features, bias, device)
        self.weight = Params4bit(self.weight.data, requires_grad=False, compress_statistics=compress_statistics,
                                 quant_type=quant_type, quant_storage=quant_storage)
        self.compute_dtype = compute_dtype
        self.compute_type_is_set = compute_dtype is not None
        self.quant_storage = quant_storage
        # (quant_state, quant_state.absmax, weight arguments of gemm_4bit after W): see forward.
        self._gemm_cache = None

    # ------------------------------------------------------------------ state
    @property
    def quant_state(self) -> Optional[F.QuantState]:
        """The weight's QuantState (None until quantized); one object with ``weight.quant_state``."""
        return getattr(self.weight, "quant_state", None)

    @quant_state.setter
    def quant_state(self, value: Optional[F.QuantState]) -> None:
        if not isinstance(self.weight, Params4bit):
            raise AttributeError(f"cannot set quant_state: weight is a {type(self.weight).__name__}, "
                                 "not a Params4bit")
        self.weight.quant_state = value

    def quantize(self, device=None) -> "Linear4bit":
        """Quantizes the float weight on ``device`` (default: where it is; the CPU works) and
        moves the bias there. Returns self. Same as the first ``.to(device)``."""
        self.weight.quantize(device)
        if self.bias is not None and device is not None:
            self.bias.data = self.bias.data.to(device)
        return self

    def set_compute_type(self, x: torch.Tensor) -> None:
        """bitsandbytes' rule: float32/bfloat16 inputs set the compute dtype; a float16 input
        with no (or a float32) compute dtype warns (a UserWarning with bitsandbytes' text;
        not while torch.compile traces) that it will be slow."""
        if x.dtype in (torch.float32, torch.bfloat16):
            self.compute_dtype = x.dtype
        elif (x.dtype == torch.float16 and self.compute_dtype in (None, torch.float32)
              and not torch.compiler.is_compiling()):  # Dynamo cannot trace warnings.warn
            single = x.numel() == x.shape[-1]
            warnings.warn(_FP16_WARNING_SINGLE if single else _FP16_WARNING_BATCH, stacklevel=3)

    def __getstate__(self):
        state = dict(super().__getstate__())
        state["_gemm_cache"] = None  # rebuilt on the next call; never saved
        state.pop("_flat_views", None)  # views of a prepare_fsdp flat weight: rebuilt likewise
        return state

    # ------------------------------------------------------------------ forward
    def _weight_args(self, quant_state: F.QuantState) -> tuple:
        """gemm_4bit's arguments after W: (absmax, nested_absmax, nested_code, offset,
        blocksize, nested_blocksize, quant_type, N, K)."""
        if quant_state.shape is None or tuple(quant_state.shape) != (self.out_features, self.in_features):
            raise RuntimeError(f"weight.quant_state.shape is {quant_state.shape}, but this Linear4bit is "
                               f"[{self.out_features}, {self.in_features}]")
        return F._weight_args(None, quant_state)[1:]

    def _packed_weight(self) -> tuple:
        """(packed codes, QuantState) the forward computes with: the Params4bit and its state,
        or, after ``fourbit.integrations.distributed.prepare_fsdp``, zero-copy views of the
        flat byte parameter that FSDP2 has all-gathered."""
        weight = self.weight
        quant_state = getattr(weight, "quant_state", None)
        if quant_state is not None:
            return weight, quant_state
        layout = self.__dict__.get("_flat_layout")
        if layout is None:
            raise RuntimeError("Linear4bit weight is not quantized yet: call .cuda(), .to(device), .cpu() or "
                               ".quantize() first, or load a quantized state_dict")
        from ..integrations.distributed import flat_weight_views
        return flat_weight_views(self, layout)

    def _gemm_inputs(self, x: torch.Tensor):
        """What a forward hands to the fused op: (x cast to the compute dtype, the input's
        dtype, the packed weight, gemm_4bit's weight arguments after W, the bias in the
        compute dtype or None). Shared with ``LoraLinear4bit``, whose base product is this
        layer's."""
        weight, quant_state = self._packed_weight()
        if torch.compiler.is_compiling():
            args = self._weight_args(quant_state)  # traced once, so free at run time
        else:
            cache = self._gemm_cache
            if cache is None or cache[0] is not quant_state or cache[1] is not quant_state.absmax:
                cache = self._gemm_cache = (quant_state, quant_state.absmax, self._weight_args(quant_state))
            args = cache[2]
        if not self.compute_type_is_set:
            self.set_compute_type(x)
            self.compute_type_is_set = True

        inp_dtype = x.dtype
        compute_dtype = self.compute_dtype
        if compute_dtype is not None and inp_dtype != compute_dtype:
            x = x.to(compute_dtype)
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        return x, inp_dtype, weight, args, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, inp_dtype, weight, args, bias = self._gemm_inputs(x)
        out = _ops.gemm_4bit(x, weight, args[0], args[1], args[2], args[3], bias, *args[4:], "auto")
        return out if out.dtype == inp_dtype else out.to(inp_dtype)

    # ------------------------------------------------------------------ checkpoints
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """``weight`` (packed), ``bias``, then ``weight.<k>`` for each entry of
        ``quant_state.as_dict(packed=True)``: bitsandbytes' keys and bytes."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        quant_state = self.quant_state
        if quant_state is not None:
            for key, value in quant_state.as_dict(packed=True).items():
                destination[prefix + "weight." + key] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Loads a float weight (before quantization, as into an ``nn.Linear``) or a quantized
        one (``weight`` + ``weight.*`` as either library saves them). Every entry present is
        checked before anything changes: an error is reported under its key and the module is
        left as it was. The packed weight and its QuantState are replaced together or not at
        all. A missing entry is a missing key, as for any module (torch passes strict=True
        here whatever the caller asked, so strictness is decided by load_state_dict)."""
        wkey = prefix + "weight"
        qs_entries = {k[len(wkey) + 1:]: v for k, v in state_dict.items() if k.startswith(wkey + ".")}
        weight = self.weight
        if qs_entries and self.__dict__.get("_flat_layout") is not None:
            error_msgs.append(f"{wkey}: this Linear4bit is prepared for FSDP (its weight is one flat byte "
                              "parameter), but the state_dict holds bitsandbytes-format entries "
                              f"{sorted(wkey + '.' + k for k in qs_entries)[:3]}...; load them before "
                              "fourbit.integrations.distributed.prepare_fsdp")
            return
        if not qs_entries:
            if wkey in state_dict and isinstance(weight, Params4bit) and weight.bnb_quantized:
                value = state_dict[wkey]
                error_msgs.append(
                    f"{wkey}: this Linear4bit is already quantized, but the state_dict holds an unquantized "
                    f"{list(getattr(value, 'shape', []))} {getattr(value, 'dtype', type(value).__name__)} weight "
                    f"without '{wkey}.quant_state.bitsandbytes__*' and the other '{wkey}.*' entries; load float "
                    "weights before quantizing (.to(device) / .quantize())")
                return
            assign = local_metadata.get("assign_to_params_buffers", False)
            error = (self._check_plain(state_dict, wkey, weight, assign)
                     or self._check_bias(state_dict, prefix, assign))
            if error:
                error_msgs.append(error)
                return
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
            return

        try:
            new_weight = self._parse_quantized(state_dict, wkey, qs_entries)
        except ValueError as e:
            error_msgs.append(str(e))
            return
        error = self._check_bias(state_dict, prefix, local_metadata.get("assign_to_params_buffers", False))
        if error:
            error_msgs.append(error)
            return
        # Commit: every check has passed.
        self.weight = new_weight
        self._gemm_cache = None
        rest = {k: v for k, v in state_dict.items() if not (k == wkey or k.startswith(wkey + "."))}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if wkey in missing_keys:
            missing_keys.remove(wkey)

    def _parse_quantized(self, state_dict, wkey: str, qs_entries: dict) -> Params4bit:
        if wkey not in state_dict:
            raise ValueError(f"{wkey}: missing, but the state_dict holds its quantization entries "
                             f"{sorted(wkey + '.' + k for k in qs_entries)}; the checkpoint is truncated")
        data = state_dict[wkey]
        qs_keys = [k for k in qs_entries if k.startswith(_QS_KEY_PREFIX)]
        if len(qs_keys) != 1:
            raise ValueError(f"{wkey}.{_QS_KEY_PREFIX}nf4 (or __fp4): expected exactly one, found "
                             f"{sorted(wkey + '.' + k for k in qs_keys)} among {sorted(qs_entries)}; the "
                             "checkpoint is truncated or not a 4-bit one")
        if not isinstance(data, torch.Tensor):
            raise ValueError(f"{wkey}: must be a tensor of packed 4-bit codes, got {type(data).__name__}")
        _check_quant_storage(data.dtype, f"{wkey}'s dtype (the quant_storage)")
        absmax = qs_entries.get("absmax")
        nested = [k for k in ("nested_absmax", "nested_quant_map") if k in qs_entries]
        if nested or (isinstance(absmax, torch.Tensor) and absmax.dtype == torch.uint8):
            for key in ("nested_absmax", "nested_quant_map"):
                if key not in qs_entries:
                    raise ValueError(f"{wkey}.{key}: missing, but the state_dict holds a double-quantized absmax "
                                     f"({sorted(wkey + '.' + k for k in qs_entries)}); the checkpoint is truncated")
        old = self.weight
        device = old.device if old.device.type != "meta" else data.device
        try:
            quant_state = F.QuantState.from_dict(dict(qs_entries), device=device)
        except ValueError as e:
            raise ValueError(f"{wkey}.*: {e}") from None
        if quant_state.quant_type != self.weight.quant_type:
            raise ValueError(f"{wkey}.{qs_keys[0]}: the checkpoint's quant_type is {quant_state.quant_type!r}, "
                             f"but this {type(self).__name__} was built with quant_type={self.weight.quant_type!r}")
        expected = (self.out_features, self.in_features)
        if quant_state.shape is None or tuple(quant_state.shape) != expected:
            raise ValueError(f"{wkey}.{qs_keys[0]}: the checkpoint's weight shape is "
                             f"{None if quant_state.shape is None else list(quant_state.shape)}, but this "
                             f"{type(self).__name__} is [{expected[0]}, {expected[1]}] "
                             f"(out_features, in_features)")
        try:
            _check_packed_data(data, quant_state, wkey)
        except ValueError as e:
            raise ValueError(f"{wkey}: {e}") from None
        if data.is_meta and device.type != "meta":
            raise ValueError(f"{wkey}: is on the meta device (it has no values to load)")
        return Params4bit(data.detach().to(device, copy=True), requires_grad=old.requires_grad,
                          quant_state=quant_state, blocksize=quant_state.blocksize,
                          compress_statistics=quant_state.nested, quant_type=quant_state.quant_type,
                          quant_storage=data.dtype, bnb_quantized=True)

    def _check_bias(self, state_dict, prefix, assign: bool) -> Optional[str]:
        if self.bias is None:
            return None  # a 'bias' entry is reported as an unexpected key by the base class under strict
        return self._check_plain(state_dict, prefix + "bias", self.bias, assign)

    @staticmethod
    def _check_plain(state_dict, key, param, assign: bool = False) -> Optional[str]:
        """The base class's checks for one entry, done up front so that nothing is half-loaded."""
        if key not in state_dict:
            return None
        value = state_dict[key]
        if not isinstance(value, torch.Tensor):
            return f"{key}: must be a tensor, got {type(value).__name__}"
        if value.shape != param.shape:
            name = key.rsplit(".", 1)[-1]
            return f"{key}: has shape {list(value.shape)}, but this module's {name} is {list(param.shape)}"
        if value.is_meta and not param.is_meta and not assign:
            return f"{key}: is on the meta device (it has no values to copy); load real values or use assign=True"
        return None

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, all or nothing: if it raises (a bad entry, or a missing or
        unexpected key under ``strict=True``), the weight (packed bytes and QuantState) and the
        bias are exactly what they were before the call. (Inside a larger model, torch's own
        ``load_state_dict`` drives ``_load_from_state_dict``, which checks every entry of this
        layer before changing it; missing keys elsewhere are torch's to report.)"""
        saved = [(module, name, param, param.detach().clone()) for module in self.modules()
                 for name, param in module._parameters.items() if param is not None]
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except BaseException:
            with torch.no_grad():
                for module, name, param, data in saved:
                    module._parameters[name] = param
                    param.copy_(data)
            self._gemm_cache = None
            raise

    def extra_repr(self) -> str:
        qs = self.quant_state
        layout = self.__dict__.get("_flat_layout")
        if layout is not None:
            state = (f"{layout.quant_type}, blocksize={layout.blocksize}, nested={layout.nested}, "
                     f"flat for FSDP ({layout.nbytes} bytes)")
        elif qs is None:
            state = "not quantized"
        else:
            state = f"{self.weight.quant_type}, blocksize={qs.blocksize}, nested={qs.nested}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{state}, compute_dtype={self.compute_dtype}")


class LinearFP4(Linear4bit):
    """``Linear4bit`` with ``quant_type="fp4"`` (bitsandbytes' ``LinearFP4``)."""

    def __init__(self, input_features: int, output_features: int, bias: bool = True,
                 compute_dtype: Optional[torch.dtype] = None, compress_statistics: bool = True,
                 quant_storage: torch.dtype = torch.uint8, device=None):
        super().__init__(input_features, output_features, bias, compute_dtype, compress_statistics, "fp4",
                         quant_storage, device)


class LinearNF4(Linear4bit):
    """``Linear4bit`` with ``quant_type="nf4"`` (bitsandbytes' ``LinearNF4``), the QLoRA default."""

    def __init__(self, input_features: int, output_features: int, bias: bool = True,
                 compute_dtype: Optional[torch.dtype] = None, compress_statistics: bool = True,
                 quant_storage: torch.dtype = torch.uint8, device=None):
        super().__init__(input_features, output_features, bias, compute_dtype, compress_statistics, "nf4",
                         quant_storage, device)
