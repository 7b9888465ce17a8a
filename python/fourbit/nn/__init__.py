"""bitsandbytes-compatible 4-bit modules: ``Params4bit``, ``Linear4bit``, ``LinearNF4``,
``LinearFP4`` (same constructors, move semantics and state_dict bytes as bitsandbytes')."""

from .linear import Linear4bit, LinearFP4, LinearNF4
from .params import Params4bit

__all__ = ["Params4bit", "Linear4bit", "LinearNF4", "LinearFP4"]

from .convert import replace_linear  # noqa: E402  (nn.Linear -> Linear4bit, in place, streaming)

__all__ += ["replace_linear"]
