"""fourbit.optim: AdamW (and Adam, adam.py) with 32-bit or 8-bit blockwise states, optionally paged, as drop-in
replacements for bitsandbytes' optimizers (same constructor arguments and defaults, torch's
optimizer API, bitsandbytes-compatible state dicts). See adamw.py and docs/kernels.md."""

from . import _fake  # noqa: F401  (fake kernels for torch.compile)
from . import paging
from .adamw import (AdamW, AdamW8bit, AdamW32bit, PagedAdamW, PagedAdamW8bit, PagedAdamW32bit,
                    PAGED_MIN_NUMEL)
from .manager import GlobalOptimManager
from .adam import Adam, Adam8bit, Adam32bit, PagedAdam, PagedAdam8bit, PagedAdam32bit

__all__ = ["AdamW", "AdamW8bit", "AdamW32bit", "PagedAdamW", "PagedAdamW32bit", "PagedAdamW8bit",
           "paging", "PAGED_MIN_NUMEL", "Adam", "Adam8bit", "Adam32bit", "PagedAdam", "PagedAdam8bit",
           "PagedAdam32bit", "GlobalOptimManager"]
