"""Adam with 32-bit or 8-bit blockwise states, optionally paged: drop-ins for bitsandbytes'
Adam / Adam8bit / Adam32bit / PagedAdam / PagedAdam8bit / PagedAdam32bit.

The same fused kernel as AdamW (adamw.py), as in bitsandbytes, where Adam and AdamW are one
update: its Adam also applies weight decay decoupled (``p *= 1 - lr * weight_decay``; read in
bitsandbytes 0.50's ``backends/default/ops.py``, and tests compare the two libraries' steps),
and differs from AdamW only in the default ``weight_decay=0``. Note that this is not
``torch.optim.Adam``'s L2 decay. ``percentile_clipping`` and ``block_wise`` are accepted for
signature compatibility at their defaults only (100, True).
"""

from __future__ import annotations

from .adamw import _AdamWBase


class _AdamBase(_AdamWBase):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, optim_bits=32,
                 args=None, min_8bit_size=4096, percentile_clipping=100, block_wise=True, is_paged=False):
        if percentile_clipping != 100:
            raise ValueError(f"percentile_clipping={percentile_clipping!r} is not supported (only 100, no clipping)")
        if block_wise is not True:
            raise ValueError(f"block_wise={block_wise!r} is not supported: fourbit's 8-bit states are blockwise")
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, optim_bits, args, min_8bit_size, is_paged)


def _fixed_bits(name, optim_bits):
    if optim_bits != 32:
        raise ValueError(f"{name} fixes its state width; optim_bits must stay 32, got {optim_bits!r}")


class Adam(_AdamBase):
    """bitsandbytes.optim.Adam: 32-bit states unless optim_bits=8; is_paged for paged states."""


class Adam32bit(_AdamBase):
    """Adam with 32-bit states (bitsandbytes.optim.Adam32bit)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, optim_bits=32,
                 args=None, min_8bit_size=4096, percentile_clipping=100, block_wise=True, is_paged=False):
        _fixed_bits("Adam32bit", optim_bits)
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, 32, args, min_8bit_size, percentile_clipping,
                         block_wise, is_paged)


class Adam8bit(_AdamBase):
    """Adam with 8-bit blockwise states (bitsandbytes.optim.Adam8bit); tensors below
    min_8bit_size keep 32-bit states."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, optim_bits=32,
                 args=None, min_8bit_size=4096, percentile_clipping=100, block_wise=True, is_paged=False):
        _fixed_bits("Adam8bit", optim_bits)
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, 8, None, min_8bit_size, percentile_clipping,
                         block_wise, is_paged)
        if args is not None:
            self.min_8bit_size = int(getattr(args, "min_8bit_size", self.min_8bit_size))


class PagedAdam(_AdamBase):
    """bitsandbytes.optim.PagedAdam: paged states, 32-bit unless optim_bits=8."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, optim_bits=32,
                 args=None, min_8bit_size=4096, percentile_clipping=100, block_wise=True):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, optim_bits, args, min_8bit_size,
                         percentile_clipping, block_wise, is_paged=True)


class PagedAdam32bit(Adam32bit):
    """bitsandbytes.optim.PagedAdam32bit: paged 32-bit states."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, optim_bits=32,
                 args=None, min_8bit_size=4096, percentile_clipping=100, block_wise=True):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, optim_bits, args, min_8bit_size,
                         percentile_clipping, block_wise, is_paged=True)


class PagedAdam8bit(Adam8bit):
    """bitsandbytes.optim.PagedAdam8bit: paged 8-bit blockwise states."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, optim_bits=32,
                 args=None, min_8bit_size=4096, percentile_clipping=100, block_wise=True):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, optim_bits, args, min_8bit_size,
                         percentile_clipping, block_wise, is_paged=True)
