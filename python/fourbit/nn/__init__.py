"""bitsandbytes-compatible 4-bit modules: ``Params4bit``, ``Linear4bit``, ``LinearNF4``,
``LinearFP4`` (same constructors, move semantics and state_dict bytes as bitsandbytes'), and
the LoRA layer ``LoraLinear4bit`` with its model-level helpers."""

from .linear import Linear4bit, LinearFP4, LinearNF4
from .params import Params4bit

__all__ = ["Params4bit", "Linear4bit", "LinearNF4", "LinearFP4"]

from .convert import replace_linear  # noqa: E402  (nn.Linear -> Linear4bit, in place, streaming)

__all__ += ["replace_linear"]

from .lora import LoraLinear4bit, add_lora, load_lora_state_dict, lora_state_dict, merge_and_unload  # noqa: E402

__all__ += ["LoraLinear4bit", "add_lora", "lora_state_dict", "load_lora_state_dict", "merge_and_unload"]
