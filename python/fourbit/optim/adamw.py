"""AdamW with 32-bit or 8-bit blockwise states, optionally paged: drop-in replacements for
bitsandbytes' AdamW / AdamW8bit / PagedAdamW / PagedAdamW32bit / PagedAdamW8bit.

A step runs ONE fused multi-tensor kernel per parameter group (torch.ops.fourbit.adamw_step):
all tensors of the group, 32-bit and 8-bit states, any mix of fp32 / fp16 / bf16 params.

State per parameter, with bitsandbytes' keys:
    step                 int, this parameter's step count
    state1, state2       fp32 [param shape] (32-bit states) or uint8 [param shape] (8-bit)
    absmax1, absmax2     fp32 [ceil(numel / 256)]          (8-bit only)
    qmap1, qmap2         fp32 [256], the signed / unsigned dynamic maps (8-bit only)
Tensors with fewer than ``min_8bit_size`` elements keep 32-bit states, as in bitsandbytes.
``state_dict()`` wraps the tensor entries under ``__bnb_optimizer_quant_state__`` exactly as
bitsandbytes 0.50 does, so state dicts move both ways between the libraries;
``load_state_dict`` also accepts unwrapped dicts and torch.optim.AdamW's (exp_avg,
exp_avg_sq, tensor step: loaded as 32-bit states).

Sharded parameters (DTensors, as FSDP2 makes them) step on their local shards; their
states are DTensors placed like the parameter (8-bit states: blockwise over the local
shard, carried in state dicts as fp32 DTensors so that they reshard; see _sharded.py).

Paged optimizers allocate the states of tensors with at least ``PAGED_MIN_NUMEL`` elements from
the page manager (fourbit.optim.paging): CUDA managed memory prefetched before each step, or
plain host memory on the CPU. Paging never changes results.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from itertools import chain

import torch

from .. import functional as F
from . import _sharded, paging
from .manager import GlobalOptimManager

BLOCKSIZE = 256
# bitsandbytes pages only states of tensors with >= 1e5 elements: smaller ones gain nothing
# from paging and would waste a managed allocation each.
PAGED_MIN_NUMEL = 100_000
_WRAP_KEY = "__bnb_optimizer_quant_state__"
_TENSOR_KEYS = ("state1", "state2", "absmax1", "absmax2", "qmap1", "qmap2")


def _check_hyper(lr, betas, eps, weight_decay):
    """ValueError naming the argument and value for every bad hyper-parameter."""
    def real(name, v):
        if isinstance(v, torch.Tensor):  # torch accepts a one-element tensor lr
            if v.numel() != 1:
                raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(v.shape)}")
            v = v.item()
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number, got {v!r}") from None
        if not math.isfinite(f):
            raise ValueError(f"Invalid {name}: {name} = {v} (must be finite)")
        return f

    if real("lr", lr) < 0.0:
        raise ValueError(f"Invalid learning rate: lr = {lr} (must be >= 0)")
    if len(betas) != 2:
        raise ValueError(f"betas must have two entries, got {betas!r}")
    for i, b in enumerate(betas):
        if not 0.0 <= real(f"betas[{i}]", b) < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: betas[{i}] = {b} (must be in [0, 1))")
    if real("eps", eps) <= 0.0:
        raise ValueError(f"Invalid epsilon value: eps = {eps} (must be > 0)")
    if real("weight_decay", weight_decay) < 0.0:
        raise ValueError(f"Invalid weight_decay value: weight_decay = {weight_decay} (must be >= 0)")


def _adamw_step_op(*args):
    """The one fused launch per parameter group and device (a seam the tests count calls at)."""
    torch.ops.fourbit.adamw_step(*args)


def _parse_betas(betas):
    if isinstance(betas, str):  # bitsandbytes accepts "(0.9, 0.999)"
        betas = [float(b) for b in betas.replace("(", "").replace(")", "").strip().split(",")]
    return tuple(betas)


class _AdamWBase(torch.optim.Optimizer):
    """Shared implementation; use AdamW, AdamW8bit, PagedAdamW, PagedAdamW32bit or PagedAdamW8bit."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                 optim_bits=32, args=None, min_8bit_size=4096, is_paged=False):
        betas = _parse_betas(betas)
        _check_hyper(lr, betas, eps, weight_decay)
        if amsgrad:
            raise ValueError("amsgrad=True is not supported (bitsandbytes' AdamW ignores it silently; "
                             "fourbit refuses instead)")
        if args is not None:  # bitsandbytes' args object (argparse namespace or MockArgs)
            optim_bits = getattr(args, "optim_bits", optim_bits)
            min_8bit_size = getattr(args, "min_8bit_size", min_8bit_size)
        if optim_bits not in (8, 32):
            raise ValueError(f"optim_bits must be 8 or 32, got {optim_bits!r}")
        if int(min_8bit_size) < 0:
            raise ValueError(f"min_8bit_size must be >= 0, got {min_8bit_size!r}")
        self.optim_bits = int(optim_bits)
        self.min_8bit_size = int(min_8bit_size)
        self.is_paged = bool(is_paged)
        # The dynamic maps, computed here once: state creation inside torch.compile(step) then
        # only copies them (fourbit._C.create_dynamic_map cannot be traced).
        self._qmap_host = (F.create_dynamic_map(signed=True), F.create_dynamic_map(signed=False))
        self._qmaps: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups and state
    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        g = self.param_groups[-1]
        g["betas"] = _parse_betas(g["betas"])
        try:
            _check_hyper(g["lr"], g["betas"], g["eps"], g["weight_decay"])
        except ValueError:
            self.param_groups.pop()
            raise

    def _qmap(self, device):
        if device not in self._qmaps:
            self._qmaps[device] = tuple(m.to(device, copy=True) for m in self._qmap_host)
        return self._qmaps[device]

    def _uses_8bit(self, p):
        overrides = GlobalOptimManager.get_instance().config_for(self, p)  # manager.py
        return (overrides.get("optim_bits", self.optim_bits) == 8
                and p.numel() >= overrides.get("min_8bit_size", self.min_8bit_size))

    def _buffer(self, p, dtype, shape=None):
        shape = p.shape if shape is None else shape
        if self.is_paged and p.numel() >= PAGED_MIN_NUMEL:
            return paging.paged_zeros(shape, dtype, p.device)
        return torch.zeros(shape, dtype=dtype, device=p.device)

    def _init_state(self, p, state):
        if not p.is_contiguous():
            p.data = p.data.contiguous()
        state["step"] = 0
        lp = _sharded.local(p)  # the local shard of a DTensor parameter (whole p otherwise)
        if self._uses_8bit(p):  # decided on the whole parameter, so every rank agrees
            blocks = (lp.numel() + BLOCKSIZE - 1) // BLOCKSIZE
            qmap1, qmap2 = self._qmap(lp.device)
            state["state1"] = _sharded.like(p, self._buffer(lp, torch.uint8))
            state["state2"] = _sharded.like(p, self._buffer(lp, torch.uint8))
            state["qmap1"], state["qmap2"] = qmap1, qmap2
            state["absmax1"] = torch.zeros(blocks, dtype=torch.float32, device=lp.device)
            state["absmax2"] = torch.zeros(blocks, dtype=torch.float32, device=lp.device)
            # All-zero codes with absmax 0 decode to 0 (as bitsandbytes initialises them).
        else:
            state["state1"] = _sharded.like(p, self._buffer(lp, torch.float32))
            state["state2"] = _sharded.like(p, self._buffer(lp, torch.float32))

    def _states(self):
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                if st:
                    yield p, st

    def prefetch_states(self):
        """Prefetches every paged state to its parameter's GPU (done by step() itself)."""
        for p, st in self._states():
            if p.is_cuda:
                paging.prefetch([_sharded.local(st["state1"]), _sharded.local(st["state2"])], p.device)

    def evict_states(self):
        """Moves every paged CUDA state to the host (what memory pressure would do)."""
        for p, st in self._states():
            if p.is_cuda:
                paging.evict([_sharded.local(st["state1"]), _sharded.local(st["state2"])])

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            by_device = defaultdict(lambda: ([], [], [], [], [], [], []))
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("fourbit AdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    self._init_state(p, state)
                state["step"] += 1
                ps, gs, s1, s2, a1, a2, steps = by_device[p.device]
                grad = _sharded.local(p.grad)
                ps.append(_sharded.local(p))
                gs.append(grad if grad.is_contiguous() else grad.contiguous())
                s1.append(_sharded.local(state["state1"]))
                s2.append(_sharded.local(state["state2"]))
                if state["state1"].dtype == torch.uint8:
                    a1.append(state["absmax1"])
                    a2.append(state["absmax2"])
                steps.append(state["step"])
            for device, (ps, gs, s1, s2, a1, a2, steps) in by_device.items():
                if self.is_paged and device.type == "cuda":
                    paging.prefetch(s1 + s2, device)
                if a1:
                    qmap1, qmap2 = self._qmap(device)
                else:
                    qmap1 = qmap2 = torch.empty(0, device=device)
                _adamw_step_op(ps, gs, s1, s2, a1, a2, qmap1, qmap2, steps, float(group["lr"]),
                               float(beta1), float(beta2), float(group["eps"]),
                               float(group["weight_decay"]))
        return loss

    # ------------------------------------------------------------------ state dicts
    def state_dict(self):
        """torch's state dict with bitsandbytes' layout: tensor entries wrapped under
        ``__bnb_optimizer_quant_state__`` (what bitsandbytes 0.50 writes)."""
        sd = super().state_dict()
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        wrapped = {}
        for k, v in sd["state"].items():
            v = dict(v)
            p = params[k] if isinstance(k, int) and k < len(params) else None
            if p is not None and _sharded.is_dtensor(p) and v["state1"].dtype == torch.uint8:
                # 8-bit states of a shard: codes and per-element scales, which reshard (_sharded.py).
                for i in (1, 2):
                    codes = _sharded.local(v[f"state{i}"])
                    v[f"scale{i}"] = _sharded.like(p, _sharded.to_scale(codes, v.pop(f"absmax{i}")))
                    v.pop(f"qmap{i}")
                v[_sharded.QBITS_KEY] = 8
            inner = {key: v.pop(key) for key in _TENSOR_KEYS if key in v}
            if inner:
                v[_WRAP_KEY] = inner
            wrapped[k] = v
        sd["state"] = wrapped
        return sd

    def load_state_dict(self, state_dict):
        """Loads a fourbit, bitsandbytes (wrapped or not) or torch.optim.AdamW state dict.

        States are copied into freshly allocated buffers on each parameter's device (paged
        when this optimizer is), so a dict saved on the CPU loads onto the GPU and back; the
        dtypes of the states are kept (8-bit stays 8-bit, even for a 32-bit optimizer).
        Everything is checked before anything changes (each state's dtype, shape, absmax and
        maps, each group's hyper-parameters): a bad dict raises ValueError naming the entry and
        leaves the optimizer exactly as it was.
        """
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        for key, kind in (("state", Mapping), ("param_groups", (list, tuple))):
            if not isinstance(state_dict.get(key), kind):
                raise ValueError(f"state_dict[{key!r}] must be a {'dict' if kind is Mapping else 'list'}, got "
                                 f"{type(state_dict.get(key)).__name__}")
        groups = self.param_groups
        saved_groups = state_dict["param_groups"]
        if len(groups) != len(saved_groups):
            raise ValueError(f"loaded state dict has {len(saved_groups)} parameter groups, "
                             f"the optimizer has {len(groups)}")
        for i, (g, sg) in enumerate(zip(groups, saved_groups)):
            if not isinstance(sg, Mapping) or not isinstance(sg.get("params"), (list, tuple)):
                raise ValueError(f"param_groups[{i}] must be a dict with a 'params' list, got {sg!r:.200}")
            if not all(isinstance(k, (int, str)) and not isinstance(k, bool) for k in sg["params"]):
                raise ValueError(f"param_groups[{i}]['params'] must hold parameter ids (ints), got {sg['params']!r:.200}")
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(f"loaded state dict's parameter group {i} has {len(sg['params'])} "
                                 f"parameters, the optimizer's has {len(g['params'])}")
        id_map = dict(zip(chain.from_iterable(g["params"] for g in saved_groups),
                          chain.from_iterable(g["params"] for g in groups)))
        new_groups = []
        for i, (g, sg) in enumerate(zip(groups, saved_groups)):
            ng = {k: v for k, v in sg.items() if k != "params"}
            ng["params"] = g["params"]
            for key in ("lr", "eps", "weight_decay"):
                if key not in ng:
                    raise ValueError(f"param_groups[{i}] lacks {key!r}")
            try:
                ng["betas"] = _parse_betas(ng.get("betas", g["betas"]))
                _check_hyper(ng["lr"], ng["betas"], ng["eps"], ng["weight_decay"])
            except (TypeError, ValueError) as e:
                raise ValueError(f"param_groups[{i}]: {e}") from None
            new_groups.append(ng)
        new_state = defaultdict(dict)
        for key, saved in state_dict["state"].items():
            if key not in id_map:
                continue
            if not isinstance(saved, Mapping):
                raise ValueError(f"state of parameter {key} must be a dict, got {type(saved).__name__}")
            p = id_map[key]
            new_state[p] = self._load_param_state(p, key, dict(saved))
        self.__setstate__({"state": new_state, "param_groups": new_groups})

    def _load_param_state(self, p, key, saved):
        if _WRAP_KEY in saved:
            inner = saved.pop(_WRAP_KEY)
            if not isinstance(inner, Mapping):
                raise ValueError(f"{_WRAP_KEY} of parameter {key} must be a dict, got {type(inner).__name__}")
            saved.update(inner)
        qbits = saved.pop(_sharded.QBITS_KEY, None)
        if qbits not in (None, 8):
            raise ValueError(f"{_sharded.QBITS_KEY} of parameter {key} must be 8 (or absent), got {qbits!r}")
        if _sharded.is_dtensor(p):
            return self._load_sharded_state(p, key, saved, qbits)
        if qbits is not None:
            raise ValueError(f"state of parameter {key} holds sharded 8-bit states ({_sharded.QBITS_KEY}=8), "
                             "but the parameter is not a DTensor; load it into the sharded (FSDP) model")
        if "exp_avg" in saved or "exp_avg_sq" in saved:  # torch.optim.AdamW
            for k in ("exp_avg", "exp_avg_sq"):
                if k not in saved:
                    raise ValueError(f"state of parameter {key} lacks {k!r}")
            saved["state1"] = saved.pop("exp_avg")
            saved["state2"] = saved.pop("exp_avg_sq")
        for k in ("step", "state1", "state2"):
            if k not in saved:
                raise ValueError(f"state of parameter {key} lacks {k!r}")
        out = {"step": _parse_step(saved["step"], key)}
        s1, s2 = saved["state1"], saved["state2"]
        for name, t in (("state1", s1), ("state2", s2)):
            if not isinstance(t, torch.Tensor) or t.is_meta:
                raise ValueError(f"{name} of parameter {key} must be a tensor with values, got "
                                 f"{t.device if isinstance(t, torch.Tensor) else type(t).__name__}")
            if t.shape != p.shape:
                raise ValueError(f"{name} of parameter {key} has shape {list(t.shape)} but the parameter "
                                 f"has {list(p.shape)}")
            if t.dtype != torch.uint8 and not t.is_floating_point():
                raise ValueError(f"{name} of parameter {key} has dtype {t.dtype}; expected float32 (32-bit "
                                 "states) or uint8 (8-bit states)")
        if (s1.dtype == torch.uint8) != (s2.dtype == torch.uint8):
            raise ValueError(f"state2 of parameter {key} has dtype {s2.dtype} but state1 has {s1.dtype}: both "
                             "must be uint8 (8-bit states) or both float (32-bit states)")
        if s1.dtype == torch.uint8:
            blocks = (p.numel() + BLOCKSIZE - 1) // BLOCKSIZE
            qmap1, qmap2 = self._qmap(p.device)
            for name, ref in (("qmap1", qmap1), ("qmap2", qmap2)):
                q = saved.get(name)
                if q is None:
                    continue
                if (not isinstance(q, torch.Tensor) or q.is_meta or q.numel() != ref.numel()
                        or not torch.equal(q.to(ref.device, torch.float32), ref)):
                    raise ValueError(f"{name} of parameter {key} is not bitsandbytes' "
                                     f"{'signed' if name == 'qmap1' else 'unsigned'} dynamic map")
            for name in ("absmax1", "absmax2"):
                a = saved.get(name)
                if a is None:
                    raise ValueError(f"8-bit state of parameter {key} lacks {name!r}")
                if not isinstance(a, torch.Tensor) or a.is_meta or not a.is_floating_point():
                    raise ValueError(f"{name} of parameter {key} must be a float tensor with values, got "
                                     f"{a.dtype if isinstance(a, torch.Tensor) else type(a).__name__}")
                if a.numel() != blocks:
                    raise ValueError(f"{name} of parameter {key} has {a.numel()} elements, "
                                     f"expected {blocks} (one per {BLOCKSIZE})")
                a = a.detach().to(p.device, torch.float32).reshape(blocks).clone()
                if not bool(torch.isfinite(a).all()) or bool((a < 0).any()):
                    raise ValueError(f"{name} of parameter {key} must hold finite values >= 0 (block scales)")
                out[name] = a
            out["qmap1"], out["qmap2"] = qmap1, qmap2
            dtype = torch.uint8
        else:
            dtype = torch.float32
        for name, t in (("state1", s1), ("state2", s2)):
            buf = self._buffer(p, dtype)
            buf.copy_(t.detach().reshape(p.shape).to(dtype))
            out[name] = buf
        return out


    def _load_sharded_state(self, p, key, saved, qbits):
        """A DTensor parameter's state: DTensor entries become local shards, 8-bit states
        saved as fp32 (``qbits``) are re-quantized over this rank's shard, then the usual
        checks and copies run on the local shard and the states are wrapped back."""
        lp = _sharded.local(p)
        for name in ("state1", "state2", "scale1", "scale2"):
            t = saved.get(name)
            if isinstance(t, torch.Tensor) and _sharded.is_dtensor(t):
                if t.shape != p.shape or t.placements != p.placements:
                    raise ValueError(f"{name} of parameter {key} is a DTensor {list(t.shape)} placed {t.placements}, "
                                     f"but the parameter is {list(p.shape)} placed {p.placements}")
                saved[name] = _sharded.local(t)
            elif isinstance(t, torch.Tensor) and t.shape == p.shape and t.shape != lp.shape:
                raise ValueError(f"{name} of parameter {key} is a whole (unsharded) tensor; a sharded parameter "
                                 "needs a DTensor state (load through torch.distributed.checkpoint)")
        if qbits == 8:
            qmap1, qmap2 = self._qmap(lp.device)
            for i, qmap in ((1, qmap1), (2, qmap2)):
                codes, scale = saved.get(f"state{i}"), saved.pop(f"scale{i}", None)
                for name, t, dtype in ((f"state{i}", codes, torch.uint8), (f"scale{i}", scale, torch.float32)):
                    if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.shape != lp.shape:
                        raise ValueError(f"{name} of parameter {key} must be a {dtype} tensor shaped like the local "
                                         f"shard {list(lp.shape)} when {_sharded.QBITS_KEY}=8, got "
                                         f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}"
                                         f"{list(t.shape) if isinstance(t, torch.Tensor) else ''}")
                saved[f"state{i}"], saved[f"absmax{i}"] = _sharded.from_scale(codes.to(lp.device),
                                                                              scale.to(lp.device), qmap)
        out = self._load_param_state(lp, key, saved)
        out["state1"] = _sharded.like(p, out["state1"])
        out["state2"] = _sharded.like(p, out["state2"])
        return out


def _parse_step(step, key) -> int:
    """A state's step count: a non-negative int, or a one-element tensor holding one (torch's
    AdamW saves a float tensor)."""
    value = step
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_meta:
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**62:
        raise ValueError(f"step of parameter {key} must be a non-negative integer below 2**62, got {step!r:.100}")
    return value


class AdamW(_AdamWBase):
    """bitsandbytes.optim.AdamW: 32-bit states unless optim_bits=8; is_paged for paged states."""


class AdamW32bit(_AdamWBase):
    """AdamW with 32-bit states (bitsandbytes.optim.AdamW32bit)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                 optim_bits=32, args=None, min_8bit_size=4096, is_paged=False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, 32, args, min_8bit_size, is_paged)


class AdamW8bit(_AdamWBase):
    """AdamW with 8-bit blockwise states (bitsandbytes.optim.AdamW8bit; optim_bits is ignored
    as there, tensors below min_8bit_size keep 32-bit states)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                 optim_bits=32, args=None, min_8bit_size=4096, is_paged=False):
        if optim_bits != 32:
            raise ValueError(f"AdamW8bit always uses 8-bit states; optim_bits must stay 32, got {optim_bits!r}")
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, 8, None, min_8bit_size, is_paged)
        if args is not None:
            self.min_8bit_size = int(getattr(args, "min_8bit_size", self.min_8bit_size))


class PagedAdamW(_AdamWBase):
    """bitsandbytes.optim.PagedAdamW: paged states, 32-bit unless optim_bits=8."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                 optim_bits=32, args=None, min_8bit_size=4096):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, optim_bits, args, min_8bit_size,
                         is_paged=True)


class PagedAdamW32bit(_AdamWBase):
    """bitsandbytes.optim.PagedAdamW32bit: paged 32-bit states."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                 optim_bits=32, args=None, min_8bit_size=4096):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, 32, args, min_8bit_size,
                         is_paged=True)


class PagedAdamW8bit(_AdamWBase):
    """bitsandbytes.optim.PagedAdamW8bit: paged 8-bit blockwise states."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                 optim_bits=32, args=None, min_8bit_size=4096):
        if optim_bits != 32:
            raise ValueError(f"PagedAdamW8bit always uses 8-bit states; optim_bits must stay 32, got {optim_bits!r}")
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, 8, None, min_8bit_size, is_paged=True)
        if args is not None:
            self.min_8bit_size = int(getattr(args, "min_8bit_size", self.min_8bit_size))
