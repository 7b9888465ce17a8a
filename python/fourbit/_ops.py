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


# ---------------------------------------------------------------------------- LoRA on a 4-bit weight

LORA_MAX_RANK = 1024  # fourbit::kLoraMaxRank (include/fourbit/lora.h)


def _check_adapter(act, name, lora_A, lora_B, N, K):
    for key, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if t.device != act.device:
            raise ValueError(f"{key} is on {t.device} but {name} is on {act.device}")
        if t.dtype != act.dtype:
            raise ValueError(f"{key} must have {name}'s dtype {act.dtype}, got {t.dtype}")
    if lora_A.dim() != 2 or lora_A.shape[1] != K:
        raise ValueError(f"lora_A must have shape [r, in_features K={K}], got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if not 1 <= r <= LORA_MAX_RANK:
        raise ValueError(f"lora_A's rank r (its first dimension) must be in [1, {LORA_MAX_RANK}], got {r}")
    if tuple(lora_B.shape) != (N, r):
        raise ValueError(f"lora_B must have shape [N={N}, r={r}], got {tuple(lora_B.shape)}")
    return r


@torch.library.register_fake(f"{lib}::lora_4bit")
def _(X, W, absmax, nested_absmax, nested_code, offset, bias, blocksize, nested_blocksize, quant_type, N, K,
      lora_A, lora_B, scaling, X_lora):
    _check_weight_devices(X, "X", W, absmax, nested_absmax, nested_code, offset, bias)
    _check_last_dim(X, "X", K, "in_features K")
    r = _check_adapter(X, "X", lora_A, lora_B, N, K)
    if X_lora is not None and (X_lora.shape != X.shape or X_lora.dtype != X.dtype or X_lora.device != X.device):
        raise ValueError(f"X_lora must match X (shape {tuple(X.shape)}, {X.dtype}, {X.device}), got "
                         f"{tuple(X_lora.shape)}, {X_lora.dtype}, {X_lora.device}")
    return X.new_empty((*X.shape[:-1], N)), X.new_empty((*X.shape[:-1], r))


@torch.library.register_fake(f"{lib}::lora_4bit_backward")
def _(grad_output, W, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, N, K,
      lora_A, lora_B, scaling, X_lora, XA, separate_x_lora, output_mask):
    _check_weight_devices(grad_output, "grad_output", W, absmax, nested_absmax, nested_code, offset)
    _check_last_dim(grad_output, "grad_output", N, "out_features N")
    _check_adapter(grad_output, "grad_output", lora_A, lora_B, N, K)
    x_shape = (*grad_output.shape[:-1], K)
    shapes = (x_shape, x_shape, tuple(lora_A.shape), tuple(lora_B.shape))
    return tuple(grad_output.new_empty(shape if wanted else (0,)) for wanted, shape in zip(output_mask, shapes))


# Autograd of lora_4bit: the 4-bit weight is frozen; X, X_lora, lora_A, lora_B and bias get
# gradients from one lora_4bit_backward call (only those needs_input_grad asks for); XA is
# an output for the backward's sake only and carries no gradient.
_LORA_X, _LORA_BIAS, _LORA_A, _LORA_B, _LORA_X_LORA = 0, 6, 12, 13, 15


def _lora_4bit_setup_context(ctx, inputs, output):
    (X, W, absmax, nested_absmax, nested_code, offset, _, blocksize, nested_blocksize, quant_type, N, K,
     lora_A, lora_B, scaling, X_lora) = inputs
    _, XA = output
    ctx.mark_non_differentiable(XA)
    needs = ctx.needs_input_grad
    ctx.separate = X_lora is not None
    adapter_input = X_lora if ctx.separate else X
    ctx.save_for_backward(W, absmax, nested_absmax, nested_code, offset, lora_A, lora_B,
                          adapter_input if needs[_LORA_A] else None, XA if needs[_LORA_B] else None)
    ctx.config = (blocksize, nested_blocksize, quant_type, N, K)
    ctx.scaling = scaling


def _lora_4bit_backward(ctx, grad_output, _grad_xa):
    grads = [None] * 16
    needs = ctx.needs_input_grad
    W, absmax, nested_absmax, nested_code, offset, lora_A, lora_B, adapter_input, XA = ctx.saved_tensors
    want_x_lora = ctx.separate and needs[_LORA_X_LORA]
    mask = [needs[_LORA_X], want_x_lora, needs[_LORA_A], needs[_LORA_B]]
    if any(mask):
        dx, dx_lora, da, db = torch.ops.fourbit.lora_4bit_backward(
            grad_output, W, absmax, nested_absmax, nested_code, offset, *ctx.config, lora_A, lora_B,
            ctx.scaling, adapter_input, XA, ctx.separate, mask)
        grads[_LORA_X] = dx if mask[0] else None
        grads[_LORA_X_LORA] = dx_lora if mask[1] else None
        grads[_LORA_A] = da if mask[2] else None
        grads[_LORA_B] = db if mask[3] else None
    if needs[_LORA_BIAS]:
        N = ctx.config[3]
        grads[_LORA_BIAS] = grad_output.reshape(-1, N).sum(0)
    return tuple(grads)


torch.library.register_autograd(f"{lib}::lora_4bit", _lora_4bit_backward, setup_context=_lora_4bit_setup_context)


# ---------------------------------------------------------------------------- eager calls

def _records_grad(args):
    return torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


def _eager_autograd(name, op, setup_context, backward):
    """``op(*args)`` (every argument, ``algo`` included) that, when the call records
    gradients outside torch.compile, runs as a ``torch.autograd.Function`` named ``name``
    with the setup and backward registered above. torch.library's registered autograd runs
    through a Python wrapper that costs ~30 us per forward on this project's CPU machine (a
    Function: ~1 us), which adds up over hundreds of layers per training step; compiled code
    keeps the op and its registered autograd."""
    function = type(name, (torch.autograd.Function,), {
        "forward": staticmethod(lambda *inputs: op(*inputs)),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward),
    })

    def call(*args):
        if _records_grad(args) and not torch.compiler.is_compiling():
            return function.apply(*args)
        return op(*args)
    return call


gemm_4bit = _eager_autograd("_Gemm4bitFunction", torch.ops.fourbit.gemm_4bit,  # -> Y
                            _gemm_4bit_setup_context, _gemm_4bit_backward)
lora_4bit = _eager_autograd("_Lora4bitFunction", torch.ops.fourbit.lora_4bit,  # -> (Y, XA)
                            _lora_4bit_setup_context, _lora_4bit_backward)
