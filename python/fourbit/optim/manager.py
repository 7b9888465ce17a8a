"""``GlobalOptimManager``: per-parameter overrides of the optimizer state layout, as in
bitsandbytes (``bitsandbytes.optim.GlobalOptimManager``), e.g. 32-bit states for embeddings
under an 8-bit optimizer::

    mng = fourbit.optim.GlobalOptimManager.get_instance()
    mng.register_module_override(model.embed_tokens, "weight", {"optim_bits": 32})
    # or: mng.register_parameters(model.parameters()) while on the CPU, then
    #     mng.override_config(model.fc1.weight, "optim_bits", 32)
    opt = fourbit.optim.AdamW8bit(model.parameters())

Overrides are read when a parameter's state is created (its first step). fourbit honours the
keys that choose the state layout, ``optim_bits`` (8 or 32) and ``min_8bit_size``; per-parameter
hyper-parameters (``lr``, ``betas``, ...) belong in parameter groups, and those keys are refused
with a ValueError naming them (bitsandbytes would apply them).
"""

from __future__ import annotations

from typing import Any

import torch

_KEYS = ("optim_bits", "min_8bit_size")


def _check_config(config: Any, name: str) -> dict:
    if not isinstance(config, dict):
        raise ValueError(f"{name} must be a dict of overrides, got {type(config).__name__}")
    unknown = sorted(k for k in config if k not in _KEYS)
    if unknown:
        raise ValueError(f"{name} has key(s) {unknown} fourbit cannot override per parameter; supported: "
                         f"{list(_KEYS)} (set hyper-parameters with parameter groups)")
    if "optim_bits" in config and config["optim_bits"] not in (8, 32):
        raise ValueError(f"{name}['optim_bits'] must be 8 or 32, got {config['optim_bits']!r}")
    if "min_8bit_size" in config and (not isinstance(config["min_8bit_size"], int) or config["min_8bit_size"] < 0):
        raise ValueError(f"{name}['min_8bit_size'] must be an int >= 0, got {config['min_8bit_size']!r}")
    return dict(config)


class GlobalOptimManager:
    """The process-wide override registry (a singleton: use ``get_instance()``)."""

    _instance = None

    def __init__(self):
        raise RuntimeError("Call get_instance() instead")

    def initialize(self) -> None:
        """Forgets every override."""
        self.pid2config: dict[int, dict] = {}
        self.index2config: dict[tuple[int, int], dict] = {}
        self.optimizer = None
        self.uses_config_override = False
        self.module_weight_config_triple: list[tuple[torch.nn.Module, str, dict]] = []

    @classmethod
    def get_instance(cls) -> "GlobalOptimManager":
        if cls._instance is None:
            cls._instance = cls.__new__(cls)
            cls._instance.initialize()
        return cls._instance

    def register_parameters(self, params) -> None:
        """Records the (group, position) of parameters that have overrides, so the overrides
        follow them when ``.cuda()`` makes new tensors (register while on the CPU)."""
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for g, group in enumerate(groups):
            for i, p in enumerate(group["params"]):
                if id(p) in self.pid2config:
                    self.index2config[(g, i)] = self.pid2config[id(p)]

    def override_config(self, parameters, key=None, value=None, key_value_dict=None) -> None:
        """Overrides ``key=value`` (or ``key_value_dict``) for one parameter or a list of them."""
        if key is not None and key_value_dict is not None:
            raise ValueError("pass key and value, or key_value_dict, not both")
        config = _check_config({key: value} if key is not None else key_value_dict, "override")
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        self.uses_config_override = True
        for p in parameters:
            self.pid2config.setdefault(id(p), {}).update(config)

    def register_module_override(self, module: torch.nn.Module, param_name: str, config: dict) -> None:
        """Overrides ``config`` for ``getattr(module, param_name)``, whatever tensor it is when
        the optimizer creates its state."""
        if not isinstance(getattr(module, param_name, None), torch.Tensor):
            raise ValueError(f"module {type(module).__name__} has no tensor attribute {param_name!r}")
        self.module_weight_config_triple.append((module, param_name, _check_config(config, "config")))

    def config_for(self, optimizer: torch.optim.Optimizer, p: torch.Tensor) -> dict:
        """The overrides that apply to parameter ``p`` of ``optimizer`` (empty when none)."""
        config: dict = {}
        if self.index2config:
            for g, group in enumerate(optimizer.param_groups):
                for i, q in enumerate(group["params"]):
                    if q is p and (g, i) in self.index2config:
                        config.update(self.index2config[(g, i)])
        for module, name, module_config in self.module_weight_config_triple:
            if getattr(module, name, None) is p:
                config.update(module_config)
        config.update(self.pid2config.get(id(p), {}))
        return config
