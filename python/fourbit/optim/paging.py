"""The page manager from Python: paged (CUDA managed) buffers for optimizer states.

On a CUDA device a paged tensor lives in managed memory: it is prefetched to the GPU before
an optimizer step, and under memory pressure the driver evicts its pages to the host instead
of raising an out-of-memory error. On the CPU a paged tensor is plain host memory from the
same manager. An allocation that does not fit into the device's free memory (minus a
256 MiB headroom) raises RuntimeError naming the request: fourbit never over-subscribes
managed memory (that can hang the GPU), and does not fall back silently.
"""

from __future__ import annotations

from typing import Iterable

import torch


def _device(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def paged_zeros(shape, dtype: torch.dtype = torch.float32, device="cuda") -> torch.Tensor:
    """A zero-filled tensor on a page-manager buffer (managed memory on CUDA, host memory on CPU)."""
    if isinstance(shape, int):
        shape = (shape,)
    t = torch.ops.fourbit.paged_zeros(list(shape), dtype, _device(device))
    t.is_paged = True
    return t


def is_paged(t: torch.Tensor) -> bool:
    """True if `t` lives in a page-manager buffer."""
    return bool(getattr(t, "is_paged", False))


def prefetch(tensors: Iterable[torch.Tensor], device=None) -> None:
    """Asynchronously moves paged tensors to `device` (default: their own CUDA device) on the
    current stream. Device "cpu" evicts them to the host. Other tensors are left alone."""
    tensors = [t for t in tensors if t.is_cuda]
    if not tensors:
        return
    target = _device(device) if device is not None else tensors[0].device
    torch.ops.fourbit.paged_prefetch(tensors, target)


def evict(tensors: Iterable[torch.Tensor]) -> None:
    """Moves paged CUDA tensors to the host (what memory pressure does, on purpose)."""
    prefetch(tensors, "cpu")


def memory_info(device="cuda") -> tuple[int, int]:
    """(free, total) bytes of a CUDA device (cudaMemGetInfo) or of the host ("cpu")."""
    free, total = torch.ops.fourbit.paged_memory_info(_device(device))
    return int(free), int(total)


def stats() -> tuple[int, int]:
    """(number of live paged buffers, their total bytes), over the whole process."""
    n, nbytes = torch.ops.fourbit.paged_stats()
    return int(n), int(nbytes)
