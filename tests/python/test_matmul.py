"""The 4-bit matmul: torch.ops.fourbit.gemm_4bit / gemm_4bit_grad_input and
fourbit.matmul_4bit (autograd, torch.compile), against ``dequantize_4bit`` + ``torch.matmul``
in float64, with bitsandbytes' ``matmul_4bit`` as a call-compatibility reference.

Tolerance (docs/kernels.md, "Accuracy"): for each output element with reference value
``ref`` (float64, from the fp32-dequantized weight) and ``S = sum_r |a_r w_r|``,

    |got - ref| <= u_out * |ref| + (u_w + 4 * sqrt(R) * 2^-24) * S

where ``u_out`` is the unit roundoff of the output dtype (the one final rounding), ``R`` the
reduction length (fp32 accumulation in a blocked order grows like sqrt(R)), and ``u_w`` the
unit roundoff the weight is rounded to before the multiply: bf16's for bf16 activations on
the CPU (the AVX512_BF16 path multiplies bf16 weights) and for the CUDA tensor-core and
cuBLAS paths (fp16/bf16 weights), 0 elsewhere (fp32 weights). For fp32, a single wrong
weight or index gives an error of order |a w| that this bound does not hide at the sizes
used here; for every dtype the one-hot tests are exact.
"""

import math

import pytest
import torch

import fourbit
import fourbit.functional as F
from _helpers import DTYPES, QUANT_TYPES, import_bnb

UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def quantized_weight(N, K, quant_type="nf4", nested=True, blocksize=64, dtype=torch.float32, device="cpu"):
    W = torch.randn(N, K, dtype=torch.float32).to(dtype)
    q, qs = F.quantize_4bit(W.to(device), blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)
    # The reference weight: the same decode in fp32 (dequantize's own output, exact floats).
    qs_fp32 = F.QuantState(absmax=qs.absmax, shape=qs.shape, code=qs.code, blocksize=qs.blocksize,
                           quant_type=qs.quant_type, dtype=torch.float32, offset=qs.offset, state2=qs.state2)
    Wd = F.dequantize_4bit(q, qs_fp32).cpu().double()
    return q, qs, Wd


def assert_close(got, A, B, bias, weight_roundoff=0.0):
    """got ~= A @ B (+ bias) in float64, within the documented bound (A: [.., R], B: [R, cols])."""
    A64 = A.detach().cpu().double().reshape(-1, A.shape[-1])
    ref = A64 @ B
    S = A64.abs() @ B.abs()
    if bias is not None:
        ref = ref + bias.detach().cpu().double()
        S = S + bias.detach().cpu().double().abs()
    R = A.shape[-1]
    u_out = UNIT_ROUNDOFF[got.dtype]
    tol = u_out * ref.abs() + (weight_roundoff + 4 * math.sqrt(R + 1) * 2.0 ** -24) * S + 1e-30
    err = (got.detach().cpu().double().reshape(ref.shape) - ref).abs()
    if err.numel() == 0:
        return
    worst = (err - tol).argmax()
    assert bool((err <= tol).all()), (
        f"max excess at flat index {int(worst)}: err {err.flatten()[worst]:.3g} > tol {tol.flatten()[worst]:.3g}")


def gemm(X, q, qs, bias=None, algo="auto"):
    W, absmax, nested_absmax, nested_code, offset, *config = F._weight_args(q, qs)
    return torch.ops.fourbit.gemm_4bit(X, W, absmax, nested_absmax, nested_code, offset, bias, *config, algo)


def gemm_grad_input(dY, q, qs, algo="auto"):
    return torch.ops.fourbit.gemm_4bit_grad_input(dY, *F._weight_args(q, qs), algo)


# (M, N, K, blocksize): gemv (M <= 8; CPU bf16: M <= 4) and blocked paths; column tiles of 128 and
# reduction tiles of 256 with remainders; M = 0 and 1; N = 1; odd K; K not a multiple of
# the blocksize (blocks straddle rows); a large K; the largest blocksize.
SHAPES = [
    (0, 16, 64, 64), (1, 64, 64, 64), (1, 1, 128, 32), (3, 37, 96, 32), (8, 130, 300, 64),
    (9, 129, 257, 128), (17, 1, 64, 64), (33, 200, 130, 64), (1, 7, 1001, 64), (6, 5, 7, 32),
    (130, 70, 520, 256), (2, 3, 8192, 4096), (40, 256, 512, 512), (300, 33, 65, 1024),
    (600, 20, 41, 32),  # more rows than one CPU task's row chunk (256 fp32, 512 bf16)
]


@pytest.mark.parametrize("nested", (False, True), ids=("plain", "nested"))
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_and_grad_input_match_reference_cpu(dtype, quant_type, nested):
    for M, N, K, blocksize in SHAPES:
        q, qs, Wd = quantized_weight(N, K, quant_type, nested, blocksize)
        X = torch.randn(M, K).to(dtype)
        bias = torch.randn(N).to(dtype)
        u_w = UNIT_ROUNDOFF[dtype] if dtype == torch.bfloat16 else 0.0
        assert_close(gemm(X, q, qs, bias), X, Wd.t(), bias, weight_roundoff=u_w)
        dY = torch.randn(M, N).to(dtype)
        assert_close(gemm_grad_input(dY, q, qs), dY, Wd, None, weight_roundoff=u_w)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_dequantize_then_blas_path_matches_reference(dtype):
    """The CPU's large-M path (dequantize into a reused workspace, then ATen's matmul): taken
    by algo="auto" from M = 1024 for bf16/fp32, forced with algo="dequant_blas" at any M.
    The weight is rounded to the activation dtype first (u_w = u of bf16/fp16)."""
    u_w = 0.0 if dtype == torch.float32 else UNIT_ROUNDOFF[dtype]
    cases = [(1024, 96, 128, 64, "auto"), (5, 40, 200, 32, "dequant_blas"), (3, 20, 30, 64, "dequant_cublas")]
    for M, N, K, blocksize, algo in cases:
        for nested in (False, True):
            q, qs, Wd = quantized_weight(N, K, "nf4", nested, blocksize)
            X = torch.randn(M, K).to(dtype)
            bias = torch.randn(N).to(dtype)
            assert_close(gemm(X, q, qs, bias, algo=algo), X, Wd.t(), bias, weight_roundoff=u_w)
            assert_close(gemm(X, q, qs, None, algo=algo), X, Wd.t(), None, weight_roundoff=u_w)
            dY = torch.randn(M, N).to(dtype)
            assert_close(gemm_grad_input(dY, q, qs, algo=algo), dY, Wd, None, weight_roundoff=u_w)
    # The workspace is reused across weights of different sizes and dtypes: a smaller weight
    # after a larger one must not read the larger one's tail.
    q_small, qs_small, W_small = quantized_weight(8, 64)
    X = torch.randn(4, 64)
    assert_close(gemm(X, q_small, qs_small, algo="dequant_blas"), X, W_small.t(), None)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_hot_rows_select_weights_exactly(dtype):
    """Products with one-hot rows are exact: the output is the decoded weight rounded once
    to the output dtype, bit for bit, on every path (gemv and blocked)."""
    N, K = 45, 67  # odd K: bytes and blocks straddle rows
    q, qs, Wd = quantized_weight(N, K, "fp4", True, 32)
    for M in (1, 5, 9, 37):
        X = torch.zeros(M, K, dtype=dtype)
        X[torch.arange(M), (torch.arange(M) * 13) % K] = 1.0
        assert torch.equal(gemm(X, q, qs), Wd[:, (torch.arange(M) * 13) % K].t().to(dtype))
        dY = torch.zeros(M, N, dtype=dtype)
        dY[torch.arange(M), (torch.arange(M) * 7) % N] = 1.0
        assert torch.equal(gemm_grad_input(dY, q, qs), Wd[(torch.arange(M) * 7) % N].to(dtype))


def test_empty_and_degenerate_dimensions():
    q, qs, _ = quantized_weight(3, 8)
    assert gemm(torch.randn(0, 8), q, qs).shape == (0, 3)
    assert gemm(torch.randn(2, 0, 8), q, qs).shape == (2, 0, 3)
    # K = 0: the product is empty, Y is the bias.
    q0, qs0 = F.quantize_4bit(torch.randn(3, 0))
    bias = torch.tensor([1.0, -2.0, 0.5])
    assert torch.equal(fourbit.matmul_4bit(torch.randn(2, 0), q0.t(), qs0, bias=bias), bias.expand(2, 3))
    # N = 0: the input gradient is zero.
    qn, qsn = F.quantize_4bit(torch.randn(0, 5))
    assert torch.equal(gemm_grad_input(torch.randn(4, 0), qn, qsn), torch.zeros(4, 5))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matmul_4bit_leading_dims_transposed_weight_and_out(dtype):
    q, qs, Wd = quantized_weight(24, 40, dtype=dtype)
    X = torch.randn(2, 3, 40).to(dtype)
    y = fourbit.matmul_4bit(X, q.t(), qs)
    assert y.shape == (2, 3, 24) and y.dtype == dtype
    assert torch.equal(y, fourbit.matmul_4bit(X, q, qs))  # stored or transposed: same bytes
    u_w = UNIT_ROUNDOFF[dtype] if dtype == torch.bfloat16 else 0.0
    assert_close(y, X, Wd.t(), None, weight_roundoff=u_w)
    out = torch.empty(2, 3, 24, dtype=dtype)
    assert fourbit.matmul_4bit(X, q.t(), qs, out=out) is out and torch.equal(out, y)
    # A bias of another dtype is cast to A's, as bitsandbytes does.
    bias = torch.randn(24, dtype=torch.float64)
    assert_close(fourbit.matmul_4bit(X, q.t(), qs, bias=bias), X, Wd.t(), bias.to(dtype), weight_roundoff=u_w)


@pytest.mark.parametrize("quant_storage", (torch.uint8, torch.bfloat16, torch.float32), ids=str)
def test_quant_storage_views(quant_storage):
    W = torch.randn(16, 48)
    q, qs = F.quantize_4bit(W, quant_type="nf4", compress_statistics=True, quant_storage=quant_storage)
    q8, _ = F.quantize_4bit(W, quant_type="nf4", compress_statistics=True)
    X = torch.randn(5, 48)
    assert torch.equal(fourbit.matmul_4bit(X, q.t(), qs), fourbit.matmul_4bit(X, q8.t(), qs))


@pytest.mark.parametrize("nested", (False, True), ids=("plain", "nested"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_bitsandbytes_matmul_4bit(dtype, nested):
    """Same call, same result: bitsandbytes' own quantization and QuantState work as is.
    K is a multiple of the blocksize: bitsandbytes' CPU dequantize (which its matmul_4bit
    uses) applies the wrong absmax when blocks straddle rows (see _helpers)."""
    import bitsandbytes as bnb

    bnbf = import_bnb()
    W = torch.randn(48, 128).to(dtype)
    q, qs = bnbf.quantize_4bit(W, blocksize=64, compress_statistics=nested, quant_type="nf4")
    qs_fp32 = F.QuantState(absmax=qs.absmax, shape=qs.shape, code=qs.code, blocksize=qs.blocksize,
                           quant_type=qs.quant_type, dtype=torch.float32, offset=qs.offset, state2=qs.state2)
    Wd = F.dequantize_4bit(q, qs_fp32).double()
    for M in (1, 7, 33):
        X = torch.randn(M, 128).to(dtype)
        bias = torch.randn(48).to(dtype)
        ours = fourbit.matmul_4bit(X, q.t(), qs, bias=bias)
        theirs = bnb.matmul_4bit(X, q.t(), quant_state=qs, bias=bias)
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
        assert_close(ours, X, Wd.t(), bias, weight_roundoff=UNIT_ROUNDOFF[dtype] if dtype == torch.bfloat16 else 0)
        # bitsandbytes rounds the weight to the activation dtype first: within that rounding.
        assert_close(theirs, X, Wd.t(), bias, weight_roundoff=UNIT_ROUNDOFF[dtype])


@pytest.mark.parametrize("nested", (False, True), ids=("plain", "nested"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradients_match_reference(dtype, nested):
    q, qs, Wd = quantized_weight(70, 130, "fp4", nested, 64)
    X = torch.randn(3, 11, 130).to(dtype).requires_grad_()
    bias = torch.randn(70).to(dtype).requires_grad_()
    y = fourbit.matmul_4bit(X, q.t(), qs, bias=bias)
    dY = torch.randn_like(y)
    y.backward(dY)
    assert X.grad.shape == X.shape and X.grad.dtype == dtype
    assert_close(X.grad, dY, Wd, None, weight_roundoff=UNIT_ROUNDOFF[dtype] if dtype == torch.bfloat16 else 0)
    ref_bias = dY.double().reshape(-1, 70).sum(0)
    assert torch.allclose(bias.grad.double(), ref_bias, rtol=UNIT_ROUNDOFF[dtype] * 4, atol=1e-3)
    # Only X needs a gradient: bias gets none and nothing fails.
    X2 = X.detach().requires_grad_()
    fourbit.matmul_4bit(X2, q.t(), qs, bias=bias.detach()).sum().backward()
    assert X2.grad is not None


def test_gradcheck_float64_reference():
    """The registered backward is the true derivative: compare with autograd through an
    explicit dequantize + linear on the same fp32 weight."""
    q, qs, Wd = quantized_weight(9, 33, "nf4", True, 32)
    X = torch.randn(4, 33, requires_grad=True)
    b = torch.randn(9, requires_grad=True)
    fourbit.matmul_4bit(X, q.t(), qs, bias=b).pow(2).sum().backward()
    X_ref = X.detach().double().requires_grad_()
    b_ref = b.detach().double().requires_grad_()
    (X_ref @ Wd.t() + b_ref).pow(2).sum().backward()
    assert torch.allclose(X.grad.double(), X_ref.grad, rtol=1e-5, atol=1e-5)
    assert torch.allclose(b.grad.double(), b_ref.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_eager_function_equals_the_registered_autograd(dtype):
    """Eager calls that record gradients take fourbit._ops' autograd.Function (cheaper per call
    than torch.library's wrapper); it gives the registered autograd's outputs and gradients
    bit for bit, and calls without gradients (or inside torch.compile) keep the op."""
    q, qs, _ = quantized_weight(70, 130, "nf4", True, 64)
    args = F._weight_args(q, qs)
    grads = []
    for eager in (True, False):
        X = torch.randn(2, 5, 130, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_()
        bias = torch.randn(70, generator=torch.Generator().manual_seed(2)).to(dtype).requires_grad_()
        if eager:
            Y = fourbit.matmul_4bit(X, q.t(), qs, bias=bias)
            assert type(Y.grad_fn).__name__ == "_Gemm4bitFunctionBackward"
        else:
            Y = torch.ops.fourbit.gemm_4bit(X, *args[:5], bias, *args[5:])
            assert type(Y.grad_fn).__name__ != "_Gemm4bitFunctionBackward"
        Y.backward(torch.linspace(-1, 1, Y.numel()).reshape(Y.shape).to(dtype))
        grads.append((Y.detach(), X.grad, bias.grad))
    for got, want in zip(*grads):
        assert torch.equal(got, want)
    with torch.no_grad():
        assert fourbit.matmul_4bit(torch.randn(3, 130).to(dtype), q.t(), qs).grad_fn is None


@pytest.mark.parametrize("nested", (False, True), ids=("plain", "nested"))
def test_opcheck(nested):
    """Schema, fake kernel, autograd registration and dispatch are consistent."""
    q, qs, _ = quantized_weight(12, 40, "nf4", nested, 32)
    W, absmax, nested_absmax, nested_code, offset, *config = F._weight_args(q, qs)
    X = torch.randn(3, 40, requires_grad=True)
    bias = torch.randn(12, requires_grad=True)
    torch.library.opcheck(torch.ops.fourbit.gemm_4bit,
                          (X, W, absmax, nested_absmax, nested_code, offset, bias, *config))
    torch.library.opcheck(torch.ops.fourbit.gemm_4bit_grad_input,
                          (torch.randn(3, 12), W, absmax, nested_absmax, nested_code, offset, *config))


def test_compile_training_step_fullgraph():
    """A training step through matmul_4bit compiles with fullgraph=True (forward and loss
    in one graph, no break); AOTAutograd traces the backward through the registered
    autograd, so gradients match eager."""
    q, qs, Wd = quantized_weight(32, 48, "nf4", True, 64)
    lin_in = torch.nn.Linear(16, 48)
    bias = torch.nn.Parameter(torch.zeros(32))
    params = (*lin_in.parameters(), bias)

    def loss_fn(x):
        return fourbit.matmul_4bit(lin_in(x), q.t(), qs, bias=bias).pow(2).mean()

    x = torch.randn(8, 16)
    eager = loss_fn(x)
    eager.backward()
    grads_eager = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    loss = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(x)
    loss.backward()
    assert torch.allclose(loss, eager, rtol=1e-5)
    for p, ge in zip(params, grads_eager):
        assert torch.allclose(p.grad, ge, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------- errors

def test_errors_name_the_argument_and_value():
    q, qs, _ = quantized_weight(8, 32, "nf4", True, 32)
    W, absmax, nested_absmax, nested_code, offset, *config = F._weight_args(q, qs)
    X = torch.randn(2, 32)
    op = torch.ops.fourbit.gemm_4bit
    with pytest.raises(ValueError, match=r"X's last dimension must equal in_features K=32, got shape \[2, 31\]"):
        op(torch.randn(2, 31), W, absmax, nested_absmax, nested_code, offset, None, *config)
    with pytest.raises(ValueError, match=r"bias must have shape \[8\]"):
        op(X, W, absmax, nested_absmax, nested_code, offset, torch.randn(7), *config)
    with pytest.raises(ValueError, match="bias must have X's dtype"):
        op(X, W, absmax, nested_absmax, nested_code, offset, torch.randn(8, dtype=torch.float64), *config)
    with pytest.raises(ValueError, match="must be given together"):
        op(X, W, absmax, nested_absmax, None, offset, None, *config)
    with pytest.raises(ValueError, match="X.dtype must be torch.float32, torch.float16 or torch.bfloat16, got Int"):
        op(torch.ones(2, 32, dtype=torch.int32), W, absmax, nested_absmax, nested_code, offset, None, *config)
    with pytest.raises(ValueError, match="W holds 16 bytes of packed 4-bit codes"):
        op(X, W[:16], absmax, nested_absmax, nested_code, offset, None, *config)
    with pytest.raises(ValueError, match="absmax must have 8 elements"):
        op(X, W, absmax[:7], nested_absmax, nested_code, offset, None, *config)
    with pytest.raises(ValueError, match="blocksize must be one of .* got 48"):
        op(X, W, absmax, nested_absmax, nested_code, offset, None, 48, *config[1:])
    with pytest.raises(ValueError, match="quant_type must be 'nf4' or 'fp4', got 'int4'"):
        op(X, W, absmax, nested_absmax, nested_code, offset, None, 32, 256, "int4", 8, 32)
    with pytest.raises(ValueError, match="algo must be one of .* got 'fastest'"):
        op(X, W, absmax, nested_absmax, nested_code, offset, None, *config, "fastest")
    with pytest.raises(ValueError, match="N \\* K overflows int64"):
        op(X, W, absmax, nested_absmax, nested_code, offset, None, 32, 256, "nf4", 2 ** 40, 2 ** 40)
    with pytest.raises(ValueError, match="N \\(out_features\\) must be >= 0, got -8"):
        op(X, W, absmax, nested_absmax, nested_code, offset, None, 32, 256, "nf4", -8, 32)
    with pytest.raises(ValueError, match=r"grad_output's last dimension must equal out_features N=8"):
        torch.ops.fourbit.gemm_4bit_grad_input(torch.randn(2, 9), W, absmax, nested_absmax, nested_code,
                                               offset, *config)
    with pytest.raises(ValueError, match="quant_state"):
        fourbit.matmul_4bit(X, q.t(), None)
    with pytest.raises(ValueError, match="A.dtype must be"):
        fourbit.matmul_4bit(X.long(), q.t(), qs)
    bad = F.QuantState(absmax=qs.absmax, shape=torch.Size([256]), code=qs.code, blocksize=32, quant_type="nf4",
                       dtype=torch.float32, offset=qs.offset, state2=qs.state2)
    with pytest.raises(ValueError, match=r"quant_state.shape must be the 2-D weight shape"):
        fourbit.matmul_4bit(X, q.t(), bad)


def test_fake_kernel_rejects_what_the_device_kernel_rejects():
    q, qs, _ = quantized_weight(8, 32)
    args = F._weight_args(q.to("meta"), qs)
    with pytest.raises(ValueError, match="absmax is on cpu but X is on meta"):
        torch.ops.fourbit.gemm_4bit(torch.empty(2, 32, device="meta"), args[0], *args[1:5], None, *args[5:])


# ---------------------------------------------------------------------------- CUDA

CUDA_ALGOS = ("auto", "gemv", "tensor_core", "cuda_core", "dequant_cublas")


def weight_roundoff_for(algo, dtype, M, grad_input=False):
    """u_w of the module docstring: which CUDA paths round the weight to the activation dtype.
    algo="auto" takes gemv (fp32 weight) only for the forward at M <= 8; the input gradient
    has no gemv kernel and takes the tiled tensor-core kernel (weight in fp16/bf16) at every
    M below the cuBLAS rows (cuda/gemm_4bit.cu, gemm_4bit_grad_input_cuda)."""
    if dtype == torch.float32:
        return 0.0
    if algo in ("tensor_core", "dequant_cublas") or (algo == "auto" and (M > 8 or grad_input)):
        return UNIT_ROUNDOFF[dtype]
    return 0.0


@pytest.mark.cuda
@pytest.mark.parametrize("algo", CUDA_ALGOS)
@pytest.mark.parametrize("nested", (False, True), ids=("plain", "nested"))
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_reference(dtype, quant_type, nested, algo):
    if algo == "tensor_core" and dtype == torch.float32:
        pytest.skip("tensor_core takes fp16/bf16 only (fp32 is rejected; see test_cuda_errors)")
    for M, N, K, blocksize in SHAPES + [(1, 4096, 4096, 64), (1024, 1024, 512, 64)]:
        if algo == "gemv" and M > 64:
            continue  # gemv loops over row groups of 8: correct but slow for large M
        q, qs, Wd = quantized_weight(N, K, quant_type, nested, blocksize, device="cuda")
        X = torch.randn(M, K).to(dtype).cuda()
        bias = torch.randn(N).to(dtype).cuda()
        u_w = weight_roundoff_for(algo, dtype, M)
        assert_close(gemm(X, q, qs, bias, algo=algo), X, Wd.t(), bias, weight_roundoff=u_w)
        if algo != "gemv":
            dY = torch.randn(M, N).to(dtype).cuda()
            assert_close(gemm_grad_input(dY, q, qs, algo=algo), dY, Wd, None,
                         weight_roundoff=weight_roundoff_for(algo, dtype, M, grad_input=True))


@pytest.mark.cuda
def test_cuda_one_hot_exact_and_unaligned():
    N, K = 45, 67
    q, qs, Wd = quantized_weight(N, K, "nf4", True, 32, device="cuda")
    for algo in ("gemv", "cuda_core"):
        for M in (1, 5, 37):
            X = torch.zeros(M, K, device="cuda")
            X[torch.arange(M), (torch.arange(M) * 13) % K] = 1.0
            assert torch.equal(gemm(X, q, qs, algo=algo).double().cpu(), Wd[:, (torch.arange(M) * 13) % K].t())
    # A storage offset that breaks 16-byte alignment of X takes the unaligned path.
    q2, qs2, Wd2 = quantized_weight(64, 128, device="cuda")
    X = torch.randn(3 * 128 + 1, device="cuda")[1:].view(3, 128)
    assert_close(gemm(X, q2, qs2, algo="gemv"), X, Wd2.t(), None)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_cuda_gradients_and_compile(dtype):
    q, qs, Wd = quantized_weight(256, 512, "nf4", True, 64, device="cuda")
    X = torch.randn(4, 64, 512, device="cuda", dtype=dtype, requires_grad=True)
    bias = torch.zeros(256, device="cuda", dtype=dtype, requires_grad=True)

    def loss_fn(x):
        return fourbit.matmul_4bit(x, q.t(), qs, bias=bias).float().pow(2).mean()

    loss_fn(X).backward()
    g_eager = X.grad.clone()
    X.grad = None
    torch.compile(loss_fn, fullgraph=True)(X).backward()
    assert torch.allclose(X.grad.float(), g_eager.float(), rtol=2e-2, atol=1e-4)


@pytest.mark.cuda
def test_cuda_errors():
    q, qs, _ = quantized_weight(8, 32, device="cuda")
    X = torch.randn(2, 32, device="cuda")
    with pytest.raises(ValueError, match="TensorCore needs float16 or bfloat16"):
        gemm(X, q, qs, algo="tensor_core")
    with pytest.raises(ValueError, match="Gemv has no input-gradient kernel"):
        gemm_grad_input(torch.randn(2, 8, device="cuda"), q, qs, algo="gemv")
    with pytest.raises(ValueError, match="W is on cpu but X is on cuda"):
        gemm(X, q.cpu(), qs)
