"""The fused LoRA op on a 4-bit weight: torch.ops.fourbit.lora_4bit / lora_4bit_backward,
their autograd (functional._lora_4bit, lora_matmul_4bit), opcheck, torch.compile, errors.

Reference: float64 products with the fp32-dequantized weight. Tolerance, per element with
reference ``ref`` and ``S`` the same product taken over absolute values (``|X| |W|^T + |b|
+ s (|X_l| |A|^T) |B|^T`` for Y, and likewise for each gradient):

    |got - ref| <= k_out * u_out * |ref| + (u_mid + u_w + 4 * sqrt(R + 1) * 2^-24) * S

``u_out`` is the unit roundoff of the io dtype and ``k_out`` the number of roundings of the
output (1 on the CPU, which adds the adapter term before its single rounding; 2 for Y on
CUDA, which rounds the base product and then the sum). ``u_mid`` allows one rounding of an
intermediate to the io dtype: XA (returned in the io dtype; dB and the CUDA epilogue use it)
and G = s dY B on CUDA. ``u_w`` is bf16's unit roundoff for bf16 inputs (the CPU AVX512_BF16
path and cuBLAS multiply a bf16 weight), fp16's for fp16 inputs on CUDA in the products with
the weight (Y, dX: the tiled tensor-core kernels and cuBLAS multiply an fp16 weight) and 0
otherwise; ``R`` is the longest reduction
(fp32 accumulation in blocks grows like sqrt(R)). The derivation is test_matmul.py's; the
bound stays far below the error of one wrong index or one missing term at these sizes.
"""

import copy
import json
import math

import pytest
import torch

import fourbit
import fourbit.functional as F
from fourbit._ops import LORA_MAX_RANK
from _helpers import DTYPES, QUANT_TYPES

UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
U32 = 2.0 ** -24

# (M, N, K, r, blocksize): gemv (M <= 8; CPU bf16: M <= 4) and blocked paths; tile remainders (128 columns,
# 256-deep reductions); M = 0 and 1; N = 1; r = 1; r over one column tile (130); odd K;
# K not a multiple of the blocksize; more rows than one CPU row chunk.
SHAPES = [
    (0, 16, 64, 4, 64), (1, 64, 64, 8, 64), (3, 37, 96, 1, 32), (8, 1, 65, 3, 64), (9, 33, 33, 16, 32),
    (17, 200, 130, 16, 64), (5, 7, 1001, 2, 64), (40, 130, 300, 130, 128), (300, 20, 41, 5, 32),
]


def quantized_weight(N, K, quant_type="nf4", nested=True, blocksize=64, device="cpu"):
    q, qs = F.quantize_4bit(torch.randn(N, K).to(device), blocksize=blocksize, compress_statistics=nested,
                            quant_type=quant_type)
    qs_fp32 = F.QuantState(absmax=qs.absmax, shape=qs.shape, code=qs.code, blocksize=qs.blocksize,
                           quant_type=qs.quant_type, dtype=torch.float32, offset=qs.offset, state2=qs.state2)
    return q, qs, F.dequantize_4bit(q, qs_fp32).cpu().double()


def lora_op(X, q, qs, A, B, scaling, bias=None, X_lora=None):
    W, absmax, nested_absmax, nested_code, offset, *config = F._weight_args(q, qs)
    return torch.ops.fourbit.lora_4bit(X, W, absmax, nested_absmax, nested_code, offset, bias, *config, A, B,
                                       scaling, X_lora)


def lora_backward_op(dY, q, qs, A, B, scaling, X_lora, XA, separate, mask):
    return torch.ops.fourbit.lora_4bit_backward(dY, *F._weight_args(q, qs), A, B, scaling, X_lora, XA, separate,
                                                mask)


def d64(t):
    return t.detach().cpu().double().reshape(-1, t.shape[-1])


def assert_within(got, ref, S, R, dtype, k_out=1, u_mid=0.0, what=""):
    u_out = UNIT_ROUNDOFF[dtype]
    u_w = UNIT_ROUNDOFF[torch.bfloat16] if dtype == torch.bfloat16 else 0.0
    tol = k_out * u_out * ref.abs() + (u_mid + u_w + 4 * math.sqrt(R + 1) * U32) * S + 1e-30
    err = (got.detach().cpu().double().reshape(ref.shape) - ref).abs()
    if err.numel() == 0:
        return
    worst = (err - tol).argmax()
    assert bool((err <= tol).all()), (f"{what}: max excess at flat index {int(worst)}: "
                                      f"err {err.flatten()[worst]:.3g} > tol {tol.flatten()[worst]:.3g}")


def make_inputs(M, N, K, r, dtype, device="cpu", separate=False, leading=()):
    def rand(*shape):
        return torch.randn(*shape).to(dtype).to(device)
    X = rand(*leading, M, K)
    return dict(X=X, X_lora=rand(*leading, M, K) if separate else None, A=rand(r, K) / math.sqrt(K),
                B=rand(N, r), bias=rand(N))


def check_forward_and_backward(q, qs, Wd, inp, scaling, dtype, cuda=False):
    """Runs the op forward and backward (all gradients) and checks every output against the
    float64 reference within the documented bound."""
    X, X_lora, A, B, bias = inp["X"], inp["X_lora"], inp["A"], inp["B"], inp["bias"]
    separate = X_lora is not None
    Y, XA = lora_op(X, q, qs, A, B, scaling, bias, X_lora)
    x, xl = d64(X), d64(X_lora if separate else X)
    a, b, bb = A.detach().cpu().double(), B.detach().cpu().double(), bias.detach().cpu().double()
    N, K, r = Wd.shape[0], Wd.shape[1], a.shape[0]
    s = scaling
    xa_ref, xa_abs = xl @ a.t(), xl.abs() @ a.abs().t()
    y_ref = x @ Wd.t() + bb + s * xa_ref @ b.t()
    y_abs = x.abs() @ Wd.abs().t() + bb.abs() + s * xa_abs @ b.abs().t()
    u_mid = UNIT_ROUNDOFF[dtype] if cuda else 0.0
    # u_w for fp16 on CUDA, in the products with the weight (assert_within has bf16's).
    u_w16 = UNIT_ROUNDOFF[torch.float16] if cuda and dtype == torch.float16 else 0.0
    assert Y.shape == (*X.shape[:-1], N) and XA.shape == (*X.shape[:-1], r)
    assert_within(XA, xa_ref, xa_abs, K, dtype, what="XA")
    assert_within(Y, y_ref, y_abs, K + r, dtype, k_out=2 if cuda else 1, u_mid=u_mid + u_w16, what="Y")

    dY = torch.randn(Y.shape).to(dtype).to(Y.device)
    dy = d64(dY)
    mask = [True, separate, True, True]
    dX, dXl, dA, dB = lora_backward_op(dY, q, qs, A, B, scaling, X_lora if separate else X, XA, separate, mask)
    g_ref, g_abs = s * dy @ b, s * dy.abs() @ b.abs()
    base_ref, base_abs = dy @ Wd, dy.abs() @ Wd.abs()
    ad_ref, ad_abs = g_ref @ a, g_abs @ a.abs()
    u_mid = UNIT_ROUNDOFF[dtype]  # XA in the io dtype for dB; G rounded on CUDA
    if separate:
        assert_within(dX, base_ref, base_abs, N, dtype, u_mid=u_w16, what="dX")
        assert_within(dXl, ad_ref, ad_abs, N + r, dtype, u_mid=u_mid, what="dX_lora")
    else:
        assert dXl.shape == (0,)
        assert_within(dX, base_ref + ad_ref, base_abs + ad_abs, N + r, dtype, u_mid=u_mid + u_w16, what="dX")
    M = x.shape[0]
    assert_within(dA, g_ref.t() @ xl, g_abs.t() @ xl.abs(), M + N, dtype, u_mid=u_mid, what="dA")
    assert_within(dB, s * dy.t() @ xa_ref, s * dy.abs().t() @ xa_abs, M + K, dtype, u_mid=u_mid, what="dB")


# ---------------------------------------------------------------------------- CPU

@pytest.mark.parametrize("nested", (False, True), ids=("plain", "nested"))
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_and_backward_match_reference_cpu(dtype, quant_type, nested):
    for i, (M, N, K, r, blocksize) in enumerate(SHAPES):
        q, qs, Wd = quantized_weight(N, K, quant_type, nested, blocksize)
        inp = make_inputs(M, N, K, r, dtype, separate=i % 2 == 1)
        check_forward_and_backward(q, qs, Wd, inp, 0.5 + i, dtype)


def test_leading_dimensions_and_noncontiguous_inputs():
    q, qs, Wd = quantized_weight(24, 40)
    inp = make_inputs(3, 24, 40, 4, torch.float32, separate=True, leading=(2,))
    inp["A"] = torch.randn(40, 4).t()  # non-contiguous views are accepted
    inp["X"] = torch.randn(2, 40, 3).transpose(1, 2)
    check_forward_and_backward(q, qs, Wd, inp, 2.0, torch.float32)


def test_backward_computes_only_the_masked_gradients():
    q, qs, _ = quantized_weight(16, 32)
    X, A, B = torch.randn(5, 32), torch.randn(4, 32), torch.randn(16, 4)
    _, XA = lora_op(X, q, qs, A, B, 0.5)
    dY = torch.randn(5, 16)
    full = lora_backward_op(dY, q, qs, A, B, 0.5, X, XA, False, [True, False, True, True])
    only_b = lora_backward_op(dY, q, qs, A, B, 0.5, None, XA, False, [False, False, False, True])
    assert [t.shape for t in only_b[:3]] == [(0,)] * 3
    assert torch.equal(only_b[3], full[3])
    only_a = lora_backward_op(dY, q, qs, A, B, 0.5, X, None, False, [False, False, True, False])
    assert torch.equal(only_a[2], full[2])


def test_empty_dimensions():
    q, qs, _ = quantized_weight(3, 8)
    A, B = torch.randn(2, 8), torch.randn(3, 2)
    Y, XA = lora_op(torch.randn(2, 0, 8), q, qs, A, B, 1.0)
    assert Y.shape == (2, 0, 3) and XA.shape == (2, 0, 2)
    dX, _, dA, dB = lora_backward_op(torch.randn(0, 3), q, qs, A, B, 1.0, torch.randn(0, 8), torch.randn(0, 2),
                                     False, [True, False, True, True])
    assert dX.shape == (0, 8) and torch.equal(dA, torch.zeros(2, 8)) and torch.equal(dB, torch.zeros(3, 2))
    # K = 0: Y is the bias and XA zero.
    q0, qs0 = F.quantize_4bit(torch.randn(3, 0))
    bias = torch.tensor([1.0, -2.0, 0.5])
    Y, XA = lora_op(torch.randn(2, 0), q0, qs0, torch.randn(2, 0), torch.randn(3, 2), 1.0, bias)
    assert torch.equal(Y, bias.expand(2, 3)) and torch.equal(XA, torch.zeros(2, 2))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_dropout", (False, True), ids=("no_dropout", "dropout"))
def test_autograd_matches_unfused_composition(dtype, with_dropout):
    """_lora_4bit (the op + its registered autograd) against the same math composed of
    gemm_4bit and torch matmuls in float64: every gradient (x, lora_A, lora_B, bias, and
    x through the dropout mask)."""
    q, qs, Wd = quantized_weight(48, 80)
    X = torch.randn(2, 20, 80).to(dtype).requires_grad_()
    A = (torch.randn(8, 80) / 9).to(dtype).requires_grad_()
    B = torch.randn(48, 8).to(dtype).requires_grad_()
    bias = torch.randn(48).to(dtype).requires_grad_()
    mask = (torch.rand(2, 20, 80) > 0.25).to(dtype) / 0.75
    x_lora = X * mask if with_dropout else None
    W, *weight_args = F._weight_args(q, qs)
    Y = F._lora_4bit(X, W, tuple(weight_args), A, B, 0.75, bias, x_lora)
    dY = torch.randn(Y.shape).to(dtype)
    Y.backward(dY)

    ref = [t.detach().double().requires_grad_() for t in (X, A, B, bias)]
    x64, a64, b64, bias64 = ref
    xl64 = x64 * mask.double() if with_dropout else x64
    y64 = x64 @ Wd.t() + bias64 + 0.75 * (xl64 @ a64.t()) @ b64.t()
    y64.backward(dY.double())
    u = UNIT_ROUNDOFF[dtype]
    for name, got, want in (("Y", Y, y64), ("x", X.grad, x64.grad), ("lora_A", A.grad, a64.grad),
                            ("lora_B", B.grad, b64.grad), ("bias", bias.grad, bias64.grad)):
        scale = want.detach().abs().max().item()
        err = (got.detach().double() - want.detach()).abs().max().item()
        # Relative to the largest entry: the products here have |terms| of the output's order.
        assert err <= 16 * max(u, 2 ** -20) * scale * math.sqrt(80), f"{name}: err {err:.3g} (scale {scale:.3g})"


def test_eager_function_equals_the_registered_autograd():
    """Eager _lora_4bit takes fourbit._ops' autograd.Function; it gives the registered
    autograd's outputs and every gradient bit for bit (dropout input included)."""
    q, qs, _ = quantized_weight(48, 80)
    W, *weight_args = F._weight_args(q, qs)
    results = []
    for eager in (True, False):
        gen = torch.Generator().manual_seed(3)
        X, X_lora = torch.randn(6, 80, generator=gen), torch.randn(6, 80, generator=gen)
        A, B = torch.randn(8, 80, generator=gen) / 9, torch.randn(48, 8, generator=gen)
        bias = torch.randn(48, generator=gen)
        leaves = [t.requires_grad_() for t in (X, X_lora, A, B, bias)]
        if eager:
            Y = F._lora_4bit(X, W, tuple(weight_args), A, B, 0.5, bias, X_lora)
            assert type(Y.grad_fn).__name__ == "_Lora4bitFunctionBackward"
        else:
            Y, _ = torch.ops.fourbit.lora_4bit(X, W, *weight_args[:4], bias, *weight_args[4:], A, B, 0.5, X_lora)
        Y.backward(torch.linspace(-1, 1, Y.numel()).reshape(Y.shape))
        results.append([Y.detach()] + [t.grad for t in leaves])
    for got, want in zip(*results):
        assert torch.equal(got, want)


def test_gradients_flow_only_where_required():
    q, qs, _ = quantized_weight(16, 32)
    W, *weight_args = F._weight_args(q, qs)
    X = torch.randn(4, 32)
    A = torch.randn(2, 32, requires_grad=True)
    B = torch.randn(16, 2)  # frozen
    F._lora_4bit(X, W, tuple(weight_args), A, B, 1.0, None, None).sum().backward()
    assert A.grad is not None and A.grad.shape == (2, 32)
    assert X.grad is None and B.grad is None


def test_rank_above_the_op_limit_falls_back_to_the_composition():
    q, qs, Wd = quantized_weight(8, 16)
    W, *weight_args = F._weight_args(q, qs)
    r = LORA_MAX_RANK + 1
    X, A, B = torch.randn(3, 16), torch.randn(r, 16) / 32, torch.randn(8, r) / 32
    Y = F._lora_4bit(X, W, tuple(weight_args), A, B, 0.5, None, None)
    ref = X.double() @ Wd.t() + 0.5 * (X.double() @ A.double().t()) @ B.double().t()
    assert torch.allclose(Y.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("nested", (False, True), ids=("plain", "nested"))
@pytest.mark.parametrize("separate", (False, True), ids=("x", "x_lora"))
def test_opcheck(nested, separate):
    """Schema, fake kernels, autograd registration and dispatch are consistent."""
    q, qs, _ = quantized_weight(12, 40, "nf4", nested, 32)
    W, absmax, nested_absmax, nested_code, offset, *config = F._weight_args(q, qs)
    X = torch.randn(3, 40, requires_grad=True)
    X_lora = torch.randn(3, 40, requires_grad=True) if separate else None
    A = torch.randn(4, 40, requires_grad=True)
    B = torch.randn(12, 4, requires_grad=True)
    bias = torch.randn(12, requires_grad=True)
    torch.library.opcheck(torch.ops.fourbit.lora_4bit,
                          (X, W, absmax, nested_absmax, nested_code, offset, bias, *config, A, B, 0.5, X_lora))
    XA = torch.randn(3, 4)
    torch.library.opcheck(torch.ops.fourbit.lora_4bit_backward,
                          (torch.randn(3, 12), W, absmax, nested_absmax, nested_code, offset, *config,
                           A.detach(), B.detach(), 0.5, X.detach(), XA, separate, [True, separate, True, True]))


def test_compile_training_step_fullgraph():
    """A LoRA training step (dropout on the adapter input, as LoraLinear4bit does in
    training) compiles with fullgraph=True, and its loss and gradients match eager."""
    q, qs, _ = quantized_weight(32, 48, "nf4", True, 64)
    lin_in = torch.nn.Linear(16, 48)
    A = torch.nn.Parameter(torch.randn(8, 48) / 7)
    B = torch.nn.Parameter(torch.randn(32, 8) / 3)
    bias = torch.nn.Parameter(torch.zeros(32))
    params = (*lin_in.parameters(), A, B, bias)

    def loss_fn(x, keep):
        h = lin_in(x)
        return fourbit.functional.lora_matmul_4bit(h, q.t(), qs, A, B, 2.0, bias=bias, A_lora=h * keep).pow(2).mean()

    x = torch.randn(8, 16)
    keep = (torch.rand(8, 48) > 0.1).float() / 0.9
    eager = loss_fn(x, keep)
    eager.backward()
    grads_eager = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    loss = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(x, keep)
    loss.backward()
    assert torch.allclose(loss, eager, rtol=1e-5)
    for p, ge in zip(params, grads_eager):
        assert torch.allclose(p.grad, ge, rtol=1e-4, atol=1e-6)


def test_lora_linear_module_compiles_fullgraph():
    """nn.LoraLinear4bit's forward + backward (its path into the op) has no graph break."""
    base = fourbit.nn.Linear4bit(48, 32, quant_type="nf4")
    base.quantize()
    layer = fourbit.nn.LoraLinear4bit(base, r=8, lora_alpha=16, lora_dropout=0.0)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 48)
    eager = layer(x).pow(2).mean()
    eager.backward()
    grad_eager = layer.lora_A.weight.grad.clone()
    layer.lora_A.weight.grad = None
    layer.lora_B.weight.grad = None
    loss = torch.compile(lambda t: layer(t).pow(2).mean(), fullgraph=True, backend="aot_eager")(x)
    loss.backward()
    assert torch.allclose(loss, eager, rtol=1e-5)
    assert torch.allclose(layer.lora_A.weight.grad, grad_eager, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------- errors

def test_errors_name_the_argument_and_value():
    q, qs, _ = quantized_weight(8, 32, "nf4", True, 32)
    X, A, B = torch.randn(2, 32), torch.randn(4, 32), torch.randn(8, 4)
    cases = [
        (dict(A=A.double()), "lora_A must have X's dtype Float, got Double"),
        (dict(B=B.half()), "lora_B must have X's dtype Float, got Half"),
        (dict(A=torch.randn(4, 31)), r"lora_A must have shape \[r, in_features K=32\], got \[4, 31\]"),
        (dict(A=torch.randn(32)), r"lora_A must have shape \[r, in_features K=32\], got \[32\]"),
        (dict(A=torch.randn(0, 32), B=torch.randn(8, 0)), r"lora_A's rank r .* must be in \[1, 1024\], got 0"),
        (dict(A=torch.randn(LORA_MAX_RANK + 1, 32), B=torch.randn(8, LORA_MAX_RANK + 1)),
         r"must be in \[1, 1024\], got 1025"),
        (dict(B=torch.randn(8, 5)), r"lora_B must have shape \[N=8, r=4\], got \[8, 5\]"),
        (dict(B=torch.randn(7, 4)), r"lora_B must have shape \[N=8, r=4\], got \[7, 4\]"),
        (dict(X_lora=torch.randn(3, 32)), r"X_lora must have X's shape \[2, 32\], got \[3, 32\]"),
        (dict(X_lora=torch.randn(2, 32).half()), "X_lora must have X's dtype Float, got Half"),
        (dict(scaling=math.inf), "scaling must be a finite number, got inf"),
        (dict(scaling=math.nan), "scaling must be a finite number, got nan"),
        (dict(X=torch.randn(2, 31)), r"X's last dimension must equal in_features K=32, got shape \[2, 31\]"),
        (dict(bias=torch.randn(7)), r"bias must have shape \[8\]"),
    ]
    for change, message in cases:
        args = dict(X=X, A=A, B=B, scaling=1.0, bias=None, X_lora=None, **{})
        args.update(change)
        with pytest.raises(ValueError, match=message):
            lora_op(args["X"], q, qs, args["A"], args["B"], args["scaling"], args["bias"], args["X_lora"])

    dY, XA = torch.randn(2, 8), torch.randn(2, 4)
    back = [
        (dict(separate=False, mask=[True, True, True, True]), r"output_mask\[1\] .* needs separate_x_lora=True"),
        (dict(X_lora=None), r"X_lora .* is required for the lora_A gradient \(output_mask\[2\]\), got None"),
        (dict(XA=None), r"XA .* is required for the lora_B gradient \(output_mask\[3\]\), got None"),
        (dict(X_lora=torch.randn(2, 31)), r"X_lora must have shape \[2, 32\] .* got \[2, 31\]"),
        (dict(XA=torch.randn(2, 5)), r"XA must have shape \[2, 4\] .* got \[2, 5\]"),
        (dict(XA=XA.double()), "XA must have grad_output's dtype Float, got Double"),
        (dict(dY=torch.randn(2, 9)), r"grad_output's last dimension must equal out_features N=8"),
        (dict(A=torch.randn(4, 33)), r"lora_A must have shape \[r, in_features K=32\]"),
        (dict(scaling=-math.inf), "scaling must be a finite number, got -inf"),
    ]
    for change, message in back:
        args = dict(dY=dY, A=A, B=B, scaling=1.0, X_lora=X, XA=XA, separate=False, mask=[True, False, True, True])
        args.update(change)
        with pytest.raises(ValueError, match=message):
            lora_backward_op(args["dY"], q, qs, args["A"], args["B"], args["scaling"], args["X_lora"], args["XA"],
                             args["separate"], args["mask"])


def test_fake_kernels_reject_what_the_device_kernels_reject():
    q, qs, _ = quantized_weight(8, 32)
    W, absmax, nested_absmax, nested_code, offset, *config = F._weight_args(q, qs)
    meta = dict(device="meta")
    X = torch.empty(2, 32, **meta)
    Wm, am, nam, ncm, om = (t.to("meta") for t in (W, absmax, nested_absmax, nested_code, offset))
    A, B = torch.empty(4, 32, **meta), torch.empty(8, 4, **meta)
    op = torch.ops.fourbit.lora_4bit
    Y, XA = op(X, Wm, am, nam, ncm, om, None, *config, A, B, 1.0, None)
    assert Y.shape == (2, 8) and XA.shape == (2, 4)
    with pytest.raises(ValueError, match="lora_A is on cpu but X is on meta"):
        op(X, Wm, am, nam, ncm, om, None, *config, torch.randn(4, 32), B, 1.0, None)
    with pytest.raises(ValueError, match="lora_B must have X's dtype"):
        op(X, Wm, am, nam, ncm, om, None, *config, A, B.half(), 1.0, None)
    with pytest.raises(ValueError, match=r"lora_B must have shape \[N=8, r=4\]"):
        op(X, Wm, am, nam, ncm, om, None, *config, A, torch.empty(8, 5, **meta), 1.0, None)
    with pytest.raises(ValueError, match="X_lora must match X"):
        op(X, Wm, am, nam, ncm, om, None, *config, A, B, 1.0, torch.empty(3, 32, **meta))
    with pytest.raises(ValueError, match=r"must be in \[1, 1024\], got 0"):
        op(X, Wm, am, nam, ncm, om, None, *config, torch.empty(0, 32, **meta), torch.empty(8, 0, **meta), 1.0, None)
    grads = torch.ops.fourbit.lora_4bit_backward(torch.empty(2, 8, **meta), Wm, am, nam, ncm, om, *config, A, B,
                                                 1.0, X, XA, False, [True, False, False, True])
    assert [tuple(g.shape) for g in grads] == [(2, 32), (0,), (0,), (8, 4)]


# ---------------------------------------------------------------------------- CUDA

# M from the gemv path through the tiled kernels to the cuBLAS path (M >= 1024).
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_large_m_matches_reference(dtype):
    """From M = 1024 the CPU runs bf16/fp32 through the dense path (the weight dequantized
    into a workspace, every product by ATen's matmul; src/torch/lora_ops.cpp), which rounds
    like CUDA's large-M path (Y twice, G once in the io dtype): checked with CUDA's bound.
    fp16 stays on the core's fused kernels (one rounding)."""
    dense = dtype != torch.float16
    for i, separate in enumerate((False, True)):
        q, qs, Wd = quantized_weight(96, 128, "nf4", i == 0, 64)
        inp = make_inputs(1024, 96, 128, 8, dtype, separate=separate)
        check_forward_and_backward(q, qs, Wd, inp, 0.5 + i, dtype, cuda=dense)


@pytest.mark.parametrize("mode", ("fused", "blas"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_forced_path_matches_reference(monkeypatch, dtype, mode):
    """FOURBIT_CPU_MATMUL=fused / blas force the LoRA op's path at every M (the base
    product's dispatch, src/torch/cpu_dispatch.h), forward and backward (with and without
    dX, with and without a separate X_lora), and both agree with the reference: fused
    within the core's bound, blas within the dense path's (CUDA's: Y and G rounded to the
    io dtype once more). fp16 stays fused in both modes."""
    monkeypatch.setenv("FOURBIT_CPU_MATMUL", mode)
    path = "fused" if dtype == torch.float16 else mode

    def last():
        return json.loads(torch.ops.fourbit.cpu_matmul_info())["last"]

    for i, (M, N, K, r, blocksize) in enumerate(SHAPES):
        if M == 0:
            continue
        q, qs, Wd = quantized_weight(N, K, "nf4", i % 2 == 0, blocksize)
        inp = make_inputs(M, N, K, r, dtype, separate=i % 2 == 1)
        check_forward_and_backward(q, qs, Wd, inp, 0.5 + i, dtype, cuda=path == "blas")
        assert (last()["lora_forward"], last()["lora_backward"]) == (path, path), (M, N, K)
        # Only the adapter gradients (no base product): the forced path still, and the
        # same dA, dB as with dX.
        X, A, B = inp["X"], inp["A"], inp["B"]
        _, XA = lora_op(X, q, qs, A, B, 0.5)
        dY = torch.randn(M, N).to(dtype)
        full = lora_backward_op(dY, q, qs, A, B, 0.5, X, XA, False, [True, False, True, True])
        only = lora_backward_op(dY, q, qs, A, B, 0.5, X, XA, False, [False, False, True, True])
        assert last()["lora_backward"] == path
        assert torch.equal(only[2], full[2]) and torch.equal(only[3], full[3]), (M, N, K)


@pytest.mark.parametrize("mode", ("fused", "blas"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_cpu_forced_path_is_the_path_computed(monkeypatch, dtype, mode):
    """Not only the reported path: Y and dX equal, bit for bit, ATen's products on the
    dequantized weight (the blas path's calls, replayed) exactly when the mode is blas."""
    monkeypatch.setenv("FOURBIT_CPU_MATMUL", mode)
    M, N, K, r, s = 64, 256, 512, 8, 0.5
    q, qs, _ = quantized_weight(N, K)
    w = F.dequantize_4bit(q, qs).to(dtype)
    X, A, B, dY = (torch.randn(*shape).to(dtype) for shape in ((M, K), (r, K), (N, r), (M, N)))
    Y, XA = lora_op(X, q, qs, A, B, s)
    dX = lora_backward_op(dY, q, qs, A, B, s, X, XA, False, [True, False, False, False])[0]
    Y_dense = torch.mm(X, w.t()).addmm_(torch.mm(X, A.t()), B.t(), alpha=s)
    G = torch.addmm(torch.empty(M, r, dtype=dtype), dY, B, beta=0, alpha=s)
    dX_dense = torch.mm(dY, w).addmm_(G, A)
    assert (torch.equal(Y, Y_dense), torch.equal(dX, dX_dense)) == (mode == "blas",) * 2


CUDA_SHAPES = SHAPES + [(1500, 256, 384, 16, 64)]


@pytest.mark.cuda
@pytest.mark.parametrize("nested", (False, True), ids=("plain", "nested"))
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_forward_and_backward_match_reference(dtype, quant_type, nested):
    for i, (M, N, K, r, blocksize) in enumerate(CUDA_SHAPES):
        q, qs, Wd = quantized_weight(N, K, quant_type, nested, blocksize, device="cuda")
        inp = make_inputs(M, N, K, r, dtype, device="cuda", separate=i % 2 == 1)
        check_forward_and_backward(q, qs, Wd, inp, 0.5 + i, dtype, cuda=True)


@pytest.mark.cuda
@pytest.mark.parametrize("M", (4, 1500), ids=("core", "cublas"))
def test_cuda_matches_cpu_and_compiles(M):
    """The CUDA op agrees with the CPU op (fp32), and a compiled bf16 training step has the
    eager gradients."""
    q, qs, _ = quantized_weight(64, 96)
    X, A, B, bias = torch.randn(M, 96), torch.randn(8, 96) / 10, torch.randn(64, 8), torch.randn(64)
    Y_cpu, XA_cpu = lora_op(X, q, qs, A, B, 0.5, bias)
    qc, qsc = q.cuda(), copy.deepcopy(qs)
    qsc.to("cuda")  # QuantState.to moves in place and returns None (as bitsandbytes')
    Y, XA = lora_op(X.cuda(), qc, qsc, A.cuda(), B.cuda(), 0.5, bias.cuda())
    assert torch.allclose(Y.cpu(), Y_cpu, rtol=1e-4, atol=1e-4)
    assert torch.allclose(XA.cpu(), XA_cpu, rtol=1e-4, atol=1e-4)

    Ab = A.cuda().bfloat16().requires_grad_()
    Bb = B.cuda().bfloat16().requires_grad_()
    Xb = X.cuda().bfloat16().requires_grad_()

    def loss_fn(x):
        return F.lora_matmul_4bit(x, qc.t(), qsc, Ab, Bb, 0.5).float().pow(2).mean()

    loss_fn(Xb).backward()
    eager = [t.grad.clone() for t in (Xb, Ab, Bb)]
    for t in (Xb, Ab, Bb):
        t.grad = None
    torch.compile(loss_fn, fullgraph=True)(Xb).backward()
    for t, g in zip((Xb, Ab, Bb), eager):
        assert torch.allclose(t.grad.float(), g.float(), rtol=2e-2, atol=1e-3)


@pytest.mark.cuda
def test_cuda_errors():
    q, qs, _ = quantized_weight(8, 32, device="cuda")
    X = torch.randn(2, 32, device="cuda")
    with pytest.raises(ValueError, match="lora_A is on cpu but X is on cuda"):
        lora_op(X, q, qs, torch.randn(4, 32), torch.randn(8, 4, device="cuda"), 1.0)
    with pytest.raises(ValueError, match=r"lora_B must have shape \[N=8, r=4\]"):
        lora_op(X, q, qs, torch.randn(4, 32, device="cuda"), torch.randn(8, 3, device="cuda"), 1.0)
