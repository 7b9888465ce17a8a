"""CUDA ops against the CPU ops, byte for byte (the CPU kernels are the reference), plus
opcheck/torch.compile on the GPU and dequantize parity with bitsandbytes' CUDA backend.

Every test is marked ``cuda`` and skipped without a GPU (conftest.py).
"""

import pytest
import torch

import fourbit.functional as F
from _helpers import DTYPES, QUANT_TYPES, make_input, seed_for
from test_ops import SAMPLES, nested_args, op_name, sample_inputs

pytestmark = pytest.mark.cuda

ops = torch.ops.fourbit
CUDA = "cuda"

SHAPES = ((3, 5), (1,), (7, 33), (4096 + 3,), (64, 64), (257, 129))
KINDS = ("normal", "midpoints", "zero_blocks", "outlier", "student_t")


def assert_bitwise_equal(a, b, what=""):
    """Equal bits on both devices (NaN included), compared on the CPU."""
    a, b = a.detach().cpu(), b.detach().cpu()
    assert a.dtype == b.dtype and a.shape == b.shape, what
    if a.dtype.is_floating_point:
        a = a.contiguous().reshape(-1).view(torch.uint8)
        b = b.contiguous().reshape(-1).view(torch.uint8)
    assert torch.equal(a, b), what


# ---------------------------------------------------------------------------- quantize_4bit

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("blocksize", (32, 64, 128, 256, 4096))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_quantize_4bit_cuda_equals_cpu(quant_type, dtype, blocksize, kind):
    """CUDA quantize_4bit gives the CPU op's packed bytes and absmax, every shape of SHAPES."""
    code = F.get_4bit_type(quant_type)
    for shape in SHAPES:
        x = make_input(kind, shape, dtype, blocksize, code,
                       seed_for("cuda", quant_type, dtype, blocksize, kind, shape))
        want = ops.quantize_4bit(x, blocksize, quant_type, torch.uint8)
        got = ops.quantize_4bit(x.to(CUDA), blocksize, quant_type, torch.uint8)
        assert got[0].device.type == CUDA and got[1].device.type == CUDA
        assert_bitwise_equal(got[0], want[0], (shape, "packed"))
        assert_bitwise_equal(got[1], want[1], (shape, "absmax"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_quantize_4bit_cuda_nan_inf_equals_cpu(quant_type, dtype):
    """NaN/Inf blocks quantize on CUDA exactly as on the CPU (NaN absmax, top codes)."""
    x = torch.randn(5 * 64 + 10)
    x[3], x[64 + 5], x[128 + 9], x[5 * 64 + 4] = float("nan"), float("inf"), float("-inf"), float("nan")
    x = x.to(dtype)
    want = ops.quantize_4bit(x, 64, quant_type, torch.uint8)
    got = ops.quantize_4bit(x.to(CUDA), 64, quant_type, torch.uint8)
    assert_bitwise_equal(got[0], want[0], "packed")
    assert_bitwise_equal(got[1], want[1], "absmax")


@pytest.mark.parametrize("quant_storage", (torch.uint8, torch.bfloat16, torch.float16, torch.float32),
                         ids=str)
def test_quantize_4bit_cuda_quant_storage(quant_storage):
    """CUDA quant_storage output has the CPU bytes and shape [(n+1)//(2*itemsize), 1]."""
    x = torch.randn(64, 64, dtype=torch.bfloat16)
    want, _ = ops.quantize_4bit(x, 64, "nf4", quant_storage)
    got, _ = ops.quantize_4bit(x.to(CUDA), 64, "nf4", quant_storage)
    assert got.dtype == quant_storage and got.shape == want.shape
    assert_bitwise_equal(got, want)


def test_quantize_4bit_cuda_large():
    """A tensor of 2**24 + 3 elements (many CUDA blocks, a partial tail) matches the CPU."""
    x = torch.randn(2**24 + 3, dtype=torch.bfloat16)
    for quant_type in QUANT_TYPES:
        want = ops.quantize_4bit(x, 64, quant_type, torch.uint8)
        got = ops.quantize_4bit(x.to(CUDA), 64, quant_type, torch.uint8)
        assert_bitwise_equal(got[0], want[0], quant_type)
        assert_bitwise_equal(got[1], want[1], quant_type)


# ---------------------------------------------------------------------------- dequantize_4bit

@pytest.mark.parametrize("blocksize", (32, 64, 256, 4096))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_dequantize_4bit_cuda_equals_cpu(quant_type, dtype, blocksize):
    """CUDA dequantize_4bit (plain and nested, op and .out) equals the CPU op bitwise."""
    for shape in SHAPES:
        x = torch.randn(shape).to(dtype)
        packed, absmax = ops.quantize_4bit(x, blocksize, quant_type, torch.uint8)
        args = (blocksize, quant_type, list(shape), dtype)
        want = ops.dequantize_4bit(packed, absmax, *args)
        got = ops.dequantize_4bit(packed.to(CUDA), absmax.to(CUDA), *args)
        assert_bitwise_equal(got, want, (shape, "plain"))
        out = torch.empty(shape, dtype=dtype, device=CUDA)
        ops.dequantize_4bit.out(packed.to(CUDA), absmax.to(CUDA), *args, out=out)
        assert_bitwise_equal(out, want, (shape, "plain.out"))

        nested = nested_args(x, blocksize, quant_type)[:5]
        want_n = ops.dequantize_4bit_nested(*nested, blocksize, 256, *args[1:])
        got_n = ops.dequantize_4bit_nested(*[t.to(CUDA) for t in nested], blocksize, 256,
                                           *args[1:])
        assert_bitwise_equal(got_n, want_n, (shape, "nested"))
        ops.dequantize_4bit_nested.out(*[t.to(CUDA) for t in nested], blocksize, 256, *args[1:],
                                       out=out)
        assert_bitwise_equal(out, want_n, (shape, "nested.out"))


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_dequantize_4bit_nested_cuda_large(quant_type):
    """A 4096 x 14336 nested NF4/FP4 weight (many nested blocks) dequantizes on CUDA to
    exactly the CPU result."""
    x = torch.randn(4096, 14336, dtype=torch.bfloat16)
    nested = nested_args(x, 64, quant_type)[:5]
    args = (64, 256, quant_type, [4096, 14336], torch.bfloat16)
    want = ops.dequantize_4bit_nested(*nested, *args)
    got = ops.dequantize_4bit_nested(*[t.to(CUDA) for t in nested], *args)
    assert_bitwise_equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_functional_cuda_round_trip_equals_cpu(dtype):
    """The functional API on CUDA tensors (compress_statistics=True) gives the CPU state's
    bytes and dequantization, and its packed dict loads on the CPU.

    The nested offset is torch's fp32 mean of absmax on the tensor's device (docs/format.md);
    torch reduces in a different order on CUDA than on the CPU (and CUDA multiplies by 1/n
    where the CPU divides), so the last bit may differ: the CPU reference of the nested
    statistics quantizes absmax - (the CUDA offset) with the CPU op."""
    x = torch.randn(33, 65).to(dtype)
    packed, state = F.quantize_4bit(x, quant_type="nf4", compress_statistics=True)
    packed_c, state_c = F.quantize_4bit(x.to(CUDA), quant_type="nf4", compress_statistics=True)
    assert state_c.absmax.device.type == CUDA and state_c.state2.absmax.device.type == CUDA
    assert_bitwise_equal(packed_c, packed)
    raw_absmax = ops.quantize_4bit(x, 64, "nf4", torch.uint8)[1]
    assert_bitwise_equal(state_c.offset, raw_absmax.to(CUDA).mean())
    offset = state_c.offset.cpu()
    want_q, want_nested = ops.quantize_blockwise(raw_absmax - offset, F.create_dynamic_map(), 256)
    assert_bitwise_equal(state_c.absmax, want_q)
    assert_bitwise_equal(state_c.state2.absmax, want_nested)
    want_state = F.QuantState(absmax=want_q, shape=state.shape, code=state.code, blocksize=64,
                              quant_type="nf4", dtype=dtype, offset=offset,
                              state2=F.QuantState(absmax=want_nested, code=F.create_dynamic_map(),
                                                  blocksize=256, dtype=torch.float32))
    deq = F.dequantize_4bit(packed, want_state)
    assert_bitwise_equal(F.dequantize_4bit(packed_c, state_c), deq)
    loaded = F.QuantState.from_dict({k: v.cpu() for k, v in state_c.as_dict(packed=True).items()},
                                    device="cpu")
    assert_bitwise_equal(F.dequantize_4bit(packed_c.cpu(), loaded), deq)


# ---------------------------------------------------------------------------- 8-bit blockwise

@pytest.mark.parametrize("blocksize", (32, 64, 256, 4096))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_blockwise_cuda_equals_cpu(dtype, blocksize):
    """CUDA quantize_blockwise / dequantize_blockwise equal the CPU ops bitwise."""
    code = F.create_dynamic_map()
    for shape in SHAPES:
        for kind in ("normal", "zero_blocks", "student_t"):
            x = make_input(kind, shape, dtype, blocksize, code, seed_for("cuda8", dtype, blocksize,
                                                                         shape, kind))
            q, absmax = ops.quantize_blockwise(x, code, blocksize)
            q_c, absmax_c = ops.quantize_blockwise(x.to(CUDA), code.to(CUDA), blocksize)
            assert_bitwise_equal(q_c, q, (shape, kind))
            assert_bitwise_equal(absmax_c, absmax, (shape, kind))
            want = ops.dequantize_blockwise(q, absmax, code, blocksize, dtype)
            got = ops.dequantize_blockwise(q_c, absmax_c, code.to(CUDA), blocksize, dtype)
            assert_bitwise_equal(got, want, (shape, kind))


# ---------------------------------------------------------------------------- layouts

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_input(dtype):
    """Transposed and strided CUDA inputs quantize like their contiguous CPU copies."""
    base = torch.randn(130, 66).to(dtype)
    for view in (lambda t: t.t(), lambda t: t[:, ::2], lambda t: t[1:, 3:]):
        x = view(base)
        x_c = view(base.to(CUDA))
        assert not x_c.is_contiguous()
        want = ops.quantize_4bit(x.contiguous(), 64, "nf4", torch.uint8)
        got = ops.quantize_4bit(x_c, 64, "nf4", torch.uint8)
        assert_bitwise_equal(got[0], want[0])
        assert_bitwise_equal(got[1], want[1])
        q, absmax = ops.quantize_blockwise(x.contiguous(), F.create_dynamic_map(), 256)
        q_c, absmax_c = ops.quantize_blockwise(x_c, F.create_dynamic_map().to(CUDA), 256)
        assert_bitwise_equal(q_c.contiguous(), q)
        assert_bitwise_equal(absmax_c, absmax)


def misaligned(t):
    """A contiguous copy of t on CUDA whose data starts one element past an aligned address."""
    base = torch.empty(t.numel() + 1, dtype=t.dtype, device=CUDA)
    view = base[1:].view(t.shape)
    view.copy_(t)
    assert view.storage_offset() == 1 and view.is_contiguous()
    return view


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", (4096, 4099, 64 * 1001), ids=str)
def test_misaligned_pointers(dtype, n):
    """Inputs, packed bytes, absmax and out buffers at storage offset 1 (defeating 16-byte
    vector loads/stores) give the CPU results."""
    x = torch.randn(n).to(dtype)
    want_packed, want_absmax = ops.quantize_4bit(x, 64, "nf4", torch.uint8)
    got_packed, got_absmax = ops.quantize_4bit(misaligned(x), 64, "nf4", torch.uint8)
    assert_bitwise_equal(got_packed, want_packed)
    assert_bitwise_equal(got_absmax, want_absmax)
    want = ops.dequantize_4bit(want_packed, want_absmax, 64, "nf4", [n], dtype)
    out = misaligned(torch.zeros(n, dtype=dtype))
    ops.dequantize_4bit.out(misaligned(want_packed), misaligned(want_absmax), 64, "nf4", [n], dtype,
                            out=out)
    assert_bitwise_equal(out, want)
    nested = nested_args(x, 64, "nf4")[:5]
    want_n = ops.dequantize_4bit_nested(*nested, 64, 256, "nf4", [n], dtype)
    got_n = ops.dequantize_4bit_nested(*[misaligned(t) for t in nested], 64, 256, "nf4", [n], dtype)
    assert_bitwise_equal(got_n, want_n)
    q, absmax8 = ops.quantize_blockwise(x, F.create_dynamic_map(), 256)
    q_c, _ = ops.quantize_blockwise(misaligned(x), misaligned(F.create_dynamic_map()), 256)
    assert_bitwise_equal(q_c, q)
    got8 = ops.dequantize_blockwise(misaligned(q), misaligned(absmax8),
                                    misaligned(F.create_dynamic_map()), 256, dtype)
    assert_bitwise_equal(got8, ops.dequantize_blockwise(q, absmax8, F.create_dynamic_map(), 256,
                                                        dtype))


def test_runs_on_current_stream():
    """Ops enqueue on the current stream: results read after syncing a side stream are right."""
    x = torch.randn(1 << 20)
    want_packed, want_absmax = ops.quantize_4bit(x, 64, "nf4", torch.uint8)
    want = ops.dequantize_4bit(want_packed, want_absmax, 64, "nf4", [x.numel()], torch.float32)
    x_c = x.to(CUDA)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        packed, absmax = ops.quantize_4bit(x_c, 64, "nf4", torch.uint8)
        out = ops.dequantize_4bit(packed, absmax, 64, "nf4", [x.numel()], torch.float32)
    stream.synchronize()
    assert_bitwise_equal(out, want)


# ---------------------------------------------------------------------------- errors

def test_device_mismatch_is_value_error():
    """A scale, code or out tensor on the CPU while A is on CUDA is a ValueError naming it."""
    x = torch.randn(128, device=CUDA)
    packed, absmax = ops.quantize_4bit(x, 64, "nf4", torch.uint8)
    with pytest.raises(ValueError, match=r"absmax is on cpu but A is on cuda"):
        ops.dequantize_4bit(packed, absmax.cpu(), 64, "nf4", [128], torch.float32)
    with pytest.raises(ValueError, match=r"out is on cpu but A is on cuda"):
        ops.dequantize_4bit.out(packed, absmax, 64, "nf4", [128], torch.float32,
                                out=torch.empty(128))
    nested = [t.to(CUDA) for t in nested_args(x.cpu(), 64, "nf4")[:5]]
    nested[2] = nested[2].cpu()
    with pytest.raises(ValueError, match=r"nested_absmax is on cpu but A is on cuda"):
        ops.dequantize_4bit_nested(*nested, 64, 256, "nf4", [128], torch.float32)
    with pytest.raises(ValueError, match=r"code is on cpu but A is on cuda"):
        ops.quantize_blockwise(x, F.create_dynamic_map(), 64)


def test_argument_errors_on_cuda():
    """The argument checks apply on CUDA too (bad blocksize, truncated packed tensor)."""
    x = torch.randn(128, device=CUDA)
    with pytest.raises(ValueError, match=r"blocksize must be one of .*got 48"):
        ops.quantize_4bit(x, 48, "nf4", torch.uint8)
    packed, absmax = ops.quantize_4bit(x, 64, "nf4", torch.uint8)
    with pytest.raises(ValueError, match=r"A holds 10 bytes .*needs 64"):
        ops.dequantize_4bit(packed[:10], absmax, 64, "nf4", [128], torch.float32)


# ---------------------------------------------------------------------------- opcheck / compile

SAMPLE_IDS = [f"{op_name(s.op)}-{s.name}" for s in SAMPLES]


@pytest.fixture(scope="module")
def cuda_samples():
    return list(sample_inputs(CUDA))


@pytest.mark.parametrize("index", range(len(SAMPLES)), ids=SAMPLE_IDS)
def test_opcheck_cuda(cuda_samples, index):
    """torch.library.opcheck of every op on CUDA, with the shared sample inputs."""
    sample = cuda_samples[index]
    assert sample.args[0].device.type == CUDA, op_name(sample.op)
    torch.library.opcheck(sample.op, sample.args, sample.kwargs)


def test_compile_cuda_matches_eager():
    """torch.compile(fullgraph=True) of nested NF4 dequant + matmul on CUDA equals eager."""
    torch._dynamo.reset()
    w = torch.randn(256, 512, dtype=torch.bfloat16, device=CUDA)
    packed, state = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    x = torch.randn(8, 512, dtype=torch.bfloat16, device=CUDA)

    def f(x, packed, state):
        wd = F.dequantize_4bit(packed, state)
        return wd, x @ wd.t()

    for backend in ("aot_eager", "inductor"):
        torch._dynamo.reset()
        got_w, got_y = torch.compile(f, fullgraph=True, backend=backend)(x, packed, state)
        want_w, want_y = f(x, packed, state)
        assert_bitwise_equal(got_w, want_w, backend)
        assert_bitwise_equal(got_y, want_y, backend)


# ---------------------------------------------------------------------------- bitsandbytes CUDA

@pytest.fixture(scope="module")
def bnb_cuda():
    """bitsandbytes.functional when its CUDA backend works here; skips otherwise (the GPU
    machine has no bitsandbytes unless its wheel is carried there)."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    try:
        packed, state = bnbf.quantize_4bit(torch.randn(64, device=CUDA), quant_type="nf4")
        bnbf.dequantize_4bit(packed, state)
        torch.cuda.synchronize()
    except Exception as e:  # no CUDA library in this bitsandbytes build
        pytest.skip(f"bitsandbytes' CUDA backend is not usable: {e}")
    return bnbf


@pytest.mark.parametrize("nested", (False, True), ids=("plain", "nested"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_dequantize_parity_with_bnb_cuda(bnb_cuda, quant_type, dtype, nested):
    """fourbit's CUDA dequantization of bnb-CUDA-quantized weights equals bnb's CUDA
    dequantization, and bnb's CUDA dequantization of fourbit's weights equals fourbit's."""
    for shape in ((3, 5), (1,), (7, 33), (4099,), (64, 64), (512, 1024)):
        for blocksize in (32, 64, 4096):
            x = torch.randn(shape, device=CUDA).to(dtype)
            packed, state = bnb_cuda.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type,
                                                   compress_statistics=nested)
            want = bnb_cuda.dequantize_4bit(packed, state)
            loaded = F.QuantState.from_dict(dict(state.as_dict(packed=True)), device=CUDA)
            assert_bitwise_equal(F.dequantize_4bit(packed, loaded), want, (shape, blocksize))

            packed_f, state_f = F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type,
                                                compress_statistics=nested)
            ours = F.dequantize_4bit(packed_f, state_f)
            ref_state = bnb_cuda.QuantState.from_dict(dict(state_f.as_dict(packed=True)),
                                                      device=CUDA)
            assert_bitwise_equal(bnb_cuda.dequantize_4bit(packed_f, ref_state), ours,
                                 (shape, blocksize))


# ---------------------------------------------------------------- fused fragment-layout kernels

import copy  # noqa: E402

from test_matmul import UNIT_ROUNDOFF, assert_close  # noqa: E402
from test_matmul import gemm as _gemm  # noqa: E402
from test_matmul import gemm_grad_input as _gemm_grad_input  # noqa: E402
from test_matmul import quantized_weight as _quantized_weight  # noqa: E402

# (M, N, K, blocksize): odd M and N, K a multiple of 64 and of the blocksize (the fragment
# layout's requirement); M = 1 / 8 on long K take split-K, M > 16 the 64-row tile.
FUSED_SHAPES = [(1, 8, 64, 64), (3, 40, 192, 32), (1, 37, 128, 64), (17, 200, 640, 128), (33, 1000, 256, 256),
                (130, 72, 512, 64), (3, 64, 1024, 64), (1, 37, 2048, 128), (2, 1024, 128, 64),
                (300, 136, 1024, 1024)]
# Llama-sized: long split-K runs (the "large" in the name keeps them out of gpu_check's sanitizer stage).
FUSED_LARGE_SHAPES = [(1, 4096, 4096, 64), (8, 1024, 14336, 64), (64, 4096, 4096, 64)]


@pytest.mark.parametrize("nested", (False, True), ids=("plain", "nested"))
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_fused_matches_cpu_twin(dtype, quant_type, nested):
    """algo="fused" (fragment layout, cp.async pipeline, mma.sync, split-K) and the CPU twin
    both within the documented bound of the float64 product (the fused kernel rounds the
    weight once to the activation dtype: u_w = u of bf16/fp16), forward with bias and the
    input gradient (N % 8 == 0). Odd M and N, blocksize 32..1024, 2- and 4-way split-K
    (forward), 2-way (input gradient)."""
    _check_fused(dtype, quant_type, nested, FUSED_SHAPES)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_fused_matches_cpu_twin_large_shapes(dtype):
    """The same on Llama-8B-sized shapes (nested NF4, blocksize 64): 5- to 16-way split-K."""
    _check_fused(dtype, "nf4", True, FUSED_LARGE_SHAPES)


def _check_fused(dtype, quant_type, nested, shapes, algo="fused"):
    for M, N, K, blocksize in shapes:
        q, qs, Wd = _quantized_weight(N, K, quant_type, nested, blocksize, device="cuda")
        X = torch.randn(M, K).to(dtype).cuda()
        bias = torch.randn(N).to(dtype).cuda()
        got = _gemm(X, q, qs, bias, algo=algo)
        assert_close(got, X, Wd.t(), bias, weight_roundoff=UNIT_ROUNDOFF[dtype])
        qs_cpu = copy.deepcopy(qs)
        qs_cpu.to("cpu")  # in place, as bitsandbytes' QuantState.to
        cpu = _gemm(X.cpu(), q.cpu(), qs_cpu, bias.cpu())
        assert_close(cpu, X, Wd.t(), bias, weight_roundoff=UNIT_ROUNDOFF[dtype])
        if N % 8 == 0:
            dY = torch.randn(M, N).to(dtype).cuda()
            assert_close(_gemm_grad_input(dY, q, qs, algo=algo), dY, Wd, None,
                         weight_roundoff=UNIT_ROUNDOFF[dtype])


# algo="fused_sm90" (Hopper wgmma, cuda/gemm_4bit_fused_sm90.cu): 128 x 128 CTA tiles over (X rows,
# W rows), no split-K. Training-sized M, and ragged edges: M and N off the tile, N off 16
# (padded fragment rows), blocksize 32..1024, one-stage K, M < 128 (one partial tile).
FUSED_SM90_SHAPES = [(1024, 4096, 512, 64), (1030, 200, 640, 128), (5, 40, 192, 32), (300, 1000, 256, 256),
                     (2048, 136, 1024, 1024), (129, 17, 64, 64)]


def _fused_sm90_runs():
    """True on an sm90 GPU with a build that holds sm_90a code (FOURBIT_CUDA_ARCHS with 90a)."""
    if torch.cuda.get_device_capability() != (9, 0):
        return False
    q, qs, _ = _quantized_weight(16, 64, "nf4", False, 64, device="cuda")
    try:
        _gemm(torch.zeros(1, 64, dtype=torch.bfloat16, device="cuda"), q, qs, algo="fused_sm90")
    except ValueError as e:
        if "sm_90a" in str(e):
            return False
        raise
    return True


@pytest.mark.parametrize("nested", (False, True), ids=("plain", "nested"))
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_fused_sm90_matches_cpu_twin(dtype, quant_type, nested):
    """algo="fused_sm90" (wgmma with the decoded weight as register A, X through the shared-memory
    descriptor) and the CPU twin within the same bound as algo="fused", forward with bias; its
    input gradient is "fused"'s kernel (checked the same way)."""
    if not _fused_sm90_runs():
        pytest.skip("algo='fused_sm90' needs an sm90 GPU and a build with 90a in FOURBIT_CUDA_ARCHS")
    _check_fused(dtype, quant_type, nested, FUSED_SM90_SHAPES, algo="fused_sm90")


def test_fused_sm90_is_refused_off_hopper():
    """Off sm90 (or without sm_90a code) algo="fused_sm90" is a ValueError naming what it needs,
    never a launch of the trapping body."""
    if _fused_sm90_runs():
        pytest.skip("this GPU runs algo='fused_sm90'")
    q, qs, _ = _quantized_weight(16, 64, "nf4", False, 64, device="cuda")
    with pytest.raises(ValueError, match="sm_90a"):
        _gemm(torch.randn(3, 64, dtype=torch.bfloat16, device="cuda"), q, qs, algo="fused_sm90")


def test_fused_cache_sees_in_place_writes_and_rejects_unsupported_shapes():
    """The fragment copy is rebuilt after an in-place write to the weight; shapes outside
    the layout (K % 64 != 0) and fp32 activations are refused with a ValueError."""
    q, qs, _ = _quantized_weight(64, 128, "nf4", False, 64, device="cuda")
    X = torch.randn(5, 128, dtype=torch.bfloat16, device="cuda")
    first = _gemm(X, q, qs, algo="fused")
    q2, qs2, Wd2 = _quantized_weight(64, 128, "nf4", False, 64, device="cuda")
    q.copy_(q2)
    qs.absmax.copy_(qs2.absmax)
    again = _gemm(X, q, qs, algo="fused")
    assert not torch.equal(first, again)
    assert_close(again, X, Wd2.t(), None, weight_roundoff=UNIT_ROUNDOFF[torch.bfloat16])
    q3, qs3, _ = _quantized_weight(16, 96, "nf4", False, 32, device="cuda")
    with pytest.raises(ValueError, match="K % 64 == 0"):
        _gemm(torch.randn(2, 96, dtype=torch.bfloat16, device="cuda"), q3, qs3, algo="fused")
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        _gemm(torch.randn(2, 128, device="cuda"), q, qs, algo="fused")
