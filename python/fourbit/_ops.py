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


# ---------------------------------------------------------------------------- 4-bit matmul

def _check_weight_devices(X, name, W, absmax, nested_absmax, nested_code, offset, bias=None):
    tensors = {"W": W, "absmax": absmax, "nested_absmax": nested_absmax, "nested_code": nested_code,
               "offset": offset, "bias": bias}
    for key, t in tensors.items():
        if t is not None and t.device != X.device:
            raise ValueError(f"{key} is on {t.device} but {name} is on {X.device}")


def _check_last_dim(X, name, size, what):
    if X.dim() < 1 or X.shape[-1] != size:
        raise ValueError(f"{name}'s last dimension must equal {what}={size}, got shape {tuple(X.shape)}")


@torch.library.register_fake(f"{lib}::gemm_4bit")
def _(X, W, absmax, nested_absmax, nested_code, offset, bias, blocksize, nested_blocksize, quant_type, N, K,
      algo="auto"):
    _check_weight_devices(X, "X", W, absmax, nested_absmax, nested_code, offset, bias)
    _check_last_dim(X, "X", K, "in_features K")
    return X.new_empty((*X.shape[:-1], N))


@torch.library.register_fake(f"{lib}::gemm_4bit_grad_input")
def _(grad_output, W, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, N, K,
      algo="auto"):
    _check_weight_devices(grad_output, "grad_output", W, absmax, nested_absmax, nested_code, offset)
    _check_last_dim(grad_output, "grad_output", N, "out_features N")
    return grad_output.new_empty((*grad_output.shape[:-1], K))


# Autograd of gemm_4bit: the weight is frozen (no gradient); X gets dY @ deq(W) from the
# fused input-gradient op, bias gets the column sums of dY.
_GEMM_X, _GEMM_BIAS = 0, 6


def _gemm_4bit_setup_context(ctx, inputs, output):
    (_, W, absmax, nested_absmax, nested_code, offset, _, blocksize, nested_blocksize, quant_type, N, K,
     algo) = inputs
    ctx.save_for_backward(W, absmax, *(t for t in (nested_absmax, nested_code, offset) if t is not None))
    ctx.nested = nested_absmax is not None
    ctx.config = (blocksize, nested_blocksize, quant_type, N, K, algo)


def _gemm_4bit_backward(ctx, grad_output):
    grads = [None] * 13
    if ctx.needs_input_grad[_GEMM_X]:
        W, absmax, *nested = ctx.saved_tensors
        nested_absmax, nested_code, offset = nested if ctx.nested else (None, None, None)
        grads[_GEMM_X] = torch.ops.fourbit.gemm_4bit_grad_input(
            grad_output, W, absmax, nested_absmax, nested_code, offset, *ctx.config)
    if ctx.needs_input_grad[_GEMM_BIAS]:
        N = ctx.config[3]
        grads[_GEMM_BIAS] = grad_output.reshape(-1, N).sum(0)
    return tuple(grads)


torch.library.register_autograd(f"{lib}::gemm_4bit", _gemm_4bit_backward,
                                setup_context=_gemm_4bit_setup_context)
