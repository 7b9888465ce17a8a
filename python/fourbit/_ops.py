"""Fake (meta) kernels for torch.ops.fourbit.*: shapes and dtypes only, so that
torch.compile(fullgraph=True) and FakeTensor tracing see through every op."""

import torch

lib = "fourbit"


def _num_blocks(n, blocksize):
    return (n + blocksize - 1) // blocksize


def _check_devices(A, **tensors):
    """The device kernels reject tensors on different devices; so must tracing (a meta
    tensor mixed with real ones would otherwise reach this fake kernel and pass)."""
    for name, t in tensors.items():
        if t.device != A.device:
            raise ValueError(f"{name} is on {t.device} but A is on {A.device}")


@torch.library.register_fake(f"{lib}::quantize_4bit")
def _(A, blocksize, quant_type, quant_storage):
    itemsize = torch.empty((), dtype=quant_storage).element_size()
    n = A.numel()
    packed = A.new_empty(((n + 2 * itemsize - 1) // (2 * itemsize), 1), dtype=quant_storage)
    absmax = A.new_empty((_num_blocks(n, blocksize),), dtype=torch.float32)
    return packed, absmax


@torch.library.register_fake(f"{lib}::dequantize_4bit")
def _(A, absmax, blocksize, quant_type, shape, dtype):
    _check_devices(A, absmax=absmax)
    return A.new_empty(shape, dtype=dtype)


@torch.library.register_fake(f"{lib}::dequantize_4bit.out")
def _(A, absmax, blocksize, quant_type, shape, dtype, *, out):
    _check_devices(A, absmax=absmax, out=out)
    return None


@torch.library.register_fake(f"{lib}::dequantize_4bit_nested")
def _(A, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type,
      shape, dtype):
    _check_devices(A, absmax=absmax, nested_absmax=nested_absmax, nested_code=nested_code, offset=offset)
    return A.new_empty(shape, dtype=dtype)


@torch.library.register_fake(f"{lib}::dequantize_4bit_nested.out")
def _(A, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type,
      shape, dtype, *, out):
    _check_devices(A, absmax=absmax, nested_absmax=nested_absmax, nested_code=nested_code, offset=offset, out=out)
    return None


@torch.library.register_fake(f"{lib}::quantize_blockwise")
def _(A, code, blocksize):
    _check_devices(A, code=code)
    out = torch.empty_like(A, dtype=torch.uint8)
    absmax = A.new_empty((_num_blocks(A.numel(), blocksize),), dtype=torch.float32)
    return out, absmax


@torch.library.register_fake(f"{lib}::dequantize_blockwise")
def _(A, absmax, code, blocksize, dtype):
    _check_devices(A, absmax=absmax, code=code)
    return torch.empty_like(A, dtype=dtype)
