"""The torch ops themselves (torch.ops.fourbit.*) on the CPU: opcheck, torch.compile,
empty tensors, a plain-PyTorch reference, .out overloads and a large round trip."""

import math
from dataclasses import dataclass, field

import pytest
import torch

import fourbit.functional as F
from _helpers import DTYPES, QUANT_TYPES, make_input, numel, seed_for, sorted_midpoints

ops = torch.ops.fourbit


# ---------------------------------------------------------------------------- reference

def ref_quantize_4bit(x: torch.Tensor, blocksize: int, code: torch.Tensor):
    """Plain-PyTorch 4-bit quantization (the rule of docs/format.md), for finite inputs.

    Per block: absmax = max |x|; full blocks are scaled by the fp32 reciprocal of
    max(absmax, 1e-38) and store the raw absmax, the trailing partial block divides by the
    clamped absmax and stores that. The code is the nearest codebook value, found with
    torch.bucketize against the fp32 midpoints of the sorted codebook (a value exactly on a
    midpoint takes the lower one). Two codes per byte, the element with the lower index in
    the high nibble; an odd numel pads with the code of 0.0.
    Returns (packed uint8 [(n + 1) // 2, 1], absmax fp32).
    """
    flat = x.reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    body = flat[:full].reshape(-1, blocksize)
    body_max = body.abs().amax(dim=1) if full else torch.empty(0)
    scaled = [(body * (1.0 / body_max.clamp(min=1e-38)).unsqueeze(1)).reshape(-1)]
    absmax = [body_max]
    if n % blocksize:
        tail_max = flat[full:].abs().max().clamp(min=1e-38)
        scaled.append(flat[full:] / tail_max)
        absmax.append(tail_max.reshape(1))
    scaled = torch.cat(scaled)
    if n % 2:
        scaled = torch.cat([scaled, torch.zeros(1)])
    order = torch.argsort(code.float())  # order[k] = code of the k-th smallest value
    position = torch.bucketize(scaled, sorted_midpoints(code), right=False)
    codes = order[position].to(torch.uint8)
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed.reshape(-1, 1), torch.cat(absmax)


def ref_dequantize_4bit(packed, absmax, blocksize, code, shape, dtype):
    """Plain-PyTorch 4-bit dequantization: code value * block absmax in fp32, rounded once."""
    b = packed.reshape(-1).view(torch.uint8).long()
    nibbles = torch.stack([b >> 4, b & 0xF], dim=1).reshape(-1)[:numel(shape)]
    scale = absmax.float().repeat_interleave(blocksize)[:nibbles.numel()]
    return (code.float()[nibbles] * scale).to(dtype).reshape(shape)


def nested_args(x, blocksize, quant_type, quant_storage=torch.uint8):
    """(packed, absmax_q, nested_absmax, nested_code, offset) of a double-quantized x."""
    packed, st = F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type,
                                 compress_statistics=True, quant_storage=quant_storage)
    return packed, st.absmax, st.state2.absmax, st.state2.code, st.offset, st


# ---------------------------------------------------------------------------- sample inputs

@dataclass
class Sample:
    op: object
    args: tuple
    kwargs: dict = field(default_factory=dict)
    name: str = ""
    dtype: torch.dtype = torch.float32


# (dtype, shape, blocksize, quant_type, quant_storage): every dtype, odd sizes, a partial
# last block, every quant_storage family.
SAMPLE_CASES = [
    (torch.float32, (7, 33), 64, "nf4", torch.uint8),
    (torch.float16, (3, 5), 32, "fp4", torch.uint8),
    (torch.bfloat16, (4099,), 4096, "nf4", torch.bfloat16),
    (torch.float32, (1,), 128, "fp4", torch.float32),
    (torch.bfloat16, (64, 64), 256, "fp4", torch.float16),
]


def sample_inputs(device="cpu"):
    """One shared list of inputs for every op, covering all dtypes and odd sizes, with its
    tensors on `device` (test_cuda.py runs the same list on the GPU)."""
    torch.manual_seed(1234)
    code8 = F.create_dynamic_map().to(device)
    for dtype, shape, bs, qt, storage in SAMPLE_CASES:
        tag = f"{str(dtype).removeprefix('torch.')}-{'x'.join(map(str, shape))}-{bs}-{qt}"
        x = torch.randn(shape, dtype=dtype).to(device)
        if storage.is_floating_point:
            # opcheck compares outputs with assert_close, where NaN != NaN: keep the packed
            # bytes, read as floats, clear of NaN bit patterns (high byte <= 0x77) by using
            # only the codes 0..7 (negative values for NF4, non-negative ones for FP4).
            # test_compile_quant_storage_bitwise checks arbitrary bytes bitwise.
            x = -x.abs() if qt == "nf4" else x.abs()
        yield Sample(ops.quantize_4bit.default, (x, bs, qt, storage), {}, f"{tag}-{storage}", dtype)
        packed, absmax = ops.quantize_4bit(x, bs, qt, storage)
        deq = (packed, absmax, bs, qt, list(shape), dtype)
        yield Sample(ops.dequantize_4bit.default, deq, {}, tag, dtype)
        yield Sample(ops.dequantize_4bit.out, deq,
                     {"out": torch.empty(shape, dtype=dtype, device=device)}, tag, dtype)
        packed_n, absmax_q, nested_absmax, nested_code, offset, _ = nested_args(x, bs, qt, storage)
        nested = (packed_n, absmax_q, nested_absmax, nested_code, offset, bs, 256, qt,
                  list(shape), dtype)
        yield Sample(ops.dequantize_4bit_nested.default, nested, {}, tag, dtype)
        yield Sample(ops.dequantize_4bit_nested.out, nested,
                     {"out": torch.empty(shape, dtype=dtype, device=device)}, tag, dtype)
        yield Sample(ops.quantize_blockwise.default, (x, code8, bs), {}, tag, dtype)
        q, qabsmax = ops.quantize_blockwise(x, code8, bs)
        yield Sample(ops.dequantize_blockwise.default, (q, qabsmax, code8, bs, dtype), {}, tag,
                     dtype)


SAMPLES = list(sample_inputs())
ALL_OPS = {"quantize_4bit", "dequantize_4bit", "dequantize_4bit.out", "dequantize_4bit_nested",
           "dequantize_4bit_nested.out", "quantize_blockwise", "dequantize_blockwise"}


def op_name(op):
    name = op._schema.name.split("::")[1]
    return f"{name}.{op._overloadname}" if op._overloadname != "default" else name


def test_sample_inputs_cover_every_op_and_dtype():
    """The shared sample list exercises every registered op overload with every dtype."""
    assert {op_name(s.op) for s in SAMPLES} == ALL_OPS
    for name in ALL_OPS:
        assert {s.dtype for s in SAMPLES if op_name(s.op) == name} == set(DTYPES), name
    assert any(numel(s.args[0].shape) % 2 for s in SAMPLES), "no odd-sized sample"


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: f"{op_name(s.op)}-{s.name}")
def test_opcheck(sample):
    """torch.library.opcheck (schema, fake kernel, autograd registration, AOT dispatch)."""
    torch.library.opcheck(sample.op, sample.args, sample.kwargs)


# ---------------------------------------------------------------------------- torch.compile

def dequant_matmul(x, packed, state):
    return x @ F.dequantize_4bit(packed, state).t()


def test_compile_fullgraph_nested_nf4_no_graph_break():
    """A nested NF4 dequantize + matmul compiles to one graph that calls the fourbit op."""
    w = torch.randn(48, 40, dtype=torch.bfloat16)
    packed, state = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    x = torch.randn(5, 40, dtype=torch.bfloat16)
    explanation = torch._dynamo.explain(dequant_matmul)(x, packed, state)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(dequant_matmul, fullgraph=True, backend=record)
    assert torch.equal(compiled(x, packed, state), dequant_matmul(x, packed, state))
    targets = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    assert any(t.startswith("fourbit.dequantize_4bit_nested") for t in targets), targets


@pytest.mark.parametrize("quant_storage", (torch.bfloat16, torch.float32), ids=str)
def test_compile_quant_storage_bitwise(quant_storage):
    """Compiled quantize_4bit with a float quant_storage returns the eager bytes exactly
    (including byte patterns that read as NaN, which opcheck's comparison cannot)."""
    torch._dynamo.reset()
    x = torch.randn(64, 64)

    def f(x):
        return ops.quantize_4bit(x, 64, "fp4", quant_storage)

    packed, absmax = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    want_packed, want_absmax = f(x)
    assert packed.dtype == quant_storage and packed.shape == want_packed.shape
    assert torch.equal(packed.view(torch.uint8), want_packed.view(torch.uint8))
    assert torch.equal(absmax, want_absmax)


def test_compile_aot_eager_matches_eager():
    """torch.compile(fullgraph=True, backend='aot_eager') of nested NF4 dequant + matmul
    gives exactly the eager result, also with dynamic shapes."""
    torch._dynamo.reset()
    w = torch.randn(48, 40, dtype=torch.bfloat16)
    packed, state = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    compiled = torch.compile(dequant_matmul, fullgraph=True, backend="aot_eager", dynamic=True)
    for m in (1, 5, 17):
        x = torch.randn(m, 40, dtype=torch.bfloat16)
        assert torch.equal(compiled(x, packed, state), dequant_matmul(x, packed, state))


def test_compile_inductor_matches_eager():
    """torch.compile(fullgraph=True) with inductor: plain FP4 dequant + matmul equals eager."""
    torch._dynamo.reset()
    w = torch.randn(32, 64)
    packed, state = F.quantize_4bit(w, quant_type="fp4", blocksize=32)
    x = torch.randn(3, 64)

    def f(x, packed, state):
        wd = F.dequantize_4bit(packed, state)
        return wd, x @ wd.t()

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    got_w, got_y = compiled(x, packed, state)
    want_w, want_y = f(x, packed, state)
    assert torch.equal(got_w, want_w)
    assert torch.equal(got_y, want_y)


# ---------------------------------------------------------------------------- empty tensors

@pytest.mark.parametrize("shape", ((0,), (0, 5), (5, 0)), ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_tensors_every_op(dtype, shape):
    """numel 0 works for every op and overload and gives correctly shaped empty outputs."""
    x = torch.empty(shape, dtype=dtype)
    packed, absmax = ops.quantize_4bit(x, 64, "nf4", torch.uint8)
    assert packed.shape == (0, 1) and absmax.shape == (0,) and absmax.dtype == torch.float32
    out = ops.dequantize_4bit(packed, absmax, 64, "nf4", list(shape), dtype)
    assert out.shape == shape and out.dtype == dtype
    buf = torch.empty(shape, dtype=dtype)
    ops.dequantize_4bit.out(packed, absmax, 64, "nf4", list(shape), dtype, out=buf)
    nested = (packed, torch.empty(0, dtype=torch.uint8), torch.empty(0), F.create_dynamic_map(),
              torch.tensor(0.0), 64, 256, "nf4", list(shape), dtype)
    assert ops.dequantize_4bit_nested(*nested).shape == shape
    ops.dequantize_4bit_nested.out(*nested, out=buf)
    q, qabsmax = ops.quantize_blockwise(x, F.create_dynamic_map(), 256)
    assert q.shape == shape and q.dtype == torch.uint8 and qabsmax.shape == (0,)
    deq = ops.dequantize_blockwise(q, qabsmax, F.create_dynamic_map(), 256, dtype)
    assert deq.shape == shape and deq.dtype == dtype
    # And the functional API, nested statistics included.
    packed_f, state = F.quantize_4bit(x, quant_type="fp4", compress_statistics=True)
    assert F.dequantize_4bit(packed_f, state).shape == shape
    q_f, state_b = F.quantize_blockwise(x)
    assert F.dequantize_blockwise(q_f, state_b).shape == shape


# ---------------------------------------------------------------------------- reference parity

REF_SHAPES = ((3, 5), (1,), (7, 33), (4099,), (64, 64))


@pytest.mark.parametrize("kind", ("normal", "midpoints", "zero_blocks", "outlier"))
@pytest.mark.parametrize("blocksize", (32, 64, 256, 4096))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_quantize_4bit_matches_plain_pytorch_reference(quant_type, dtype, blocksize, kind):
    """The op's bytes and absmax equal the in-test reference byte for byte, and its
    dequantization equals the reference dequantization, for every shape of REF_SHAPES."""
    code = F.get_4bit_type(quant_type)
    for shape in REF_SHAPES:
        x = make_input(kind, shape, dtype, blocksize, code, seed_for("ref", quant_type, dtype,
                                                                     blocksize, kind, shape))
        packed, absmax = ops.quantize_4bit(x, blocksize, quant_type, torch.uint8)
        ref_packed, ref_absmax = ref_quantize_4bit(x, blocksize, code)
        assert torch.equal(packed, ref_packed), shape
        assert torch.equal(absmax, ref_absmax), shape
        out = ops.dequantize_4bit(packed, absmax, blocksize, quant_type, list(shape), dtype)
        assert torch.equal(out, ref_dequantize_4bit(packed, absmax, blocksize, code, shape, dtype))


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_nested_op_equals_plain_op_on_decoded_absmax(quant_type):
    """dequantize_4bit_nested equals dequantize_4bit fed with the absmax decoded in fp32
    (code[q] * nested_absmax, then + offset), i.e. the fused decode adds no error."""
    x = torch.randn(3000 * 64 + 7)  # more than one nested block of 256, partial last one
    packed, absmax_q, nested_absmax, nested_code, offset, _ = nested_args(x, 64, quant_type)
    decoded = (nested_code[absmax_q.long()]
               * nested_absmax.repeat_interleave(256)[:absmax_q.numel()]) + offset
    for dtype in DTYPES:
        want = ops.dequantize_4bit(packed, decoded, 64, quant_type, [x.numel()], dtype)
        got = ops.dequantize_4bit_nested(packed, absmax_q, nested_absmax, nested_code, offset, 64,
                                         256, quant_type, [x.numel()], dtype)
        assert torch.equal(got, want), dtype


# ---------------------------------------------------------------------------- .out overloads

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantize_4bit_out_writes_into_buffer(dtype):
    """dequantize_4bit.out fills the given buffer in place with the functional result."""
    x = torch.randn(7, 33, dtype=dtype)
    packed, absmax = ops.quantize_4bit(x, 64, "nf4", torch.uint8)
    out = torch.full((7, 33), float("nan"), dtype=dtype)
    ptr = out.data_ptr()
    assert ops.dequantize_4bit.out(packed, absmax, 64, "nf4", [7, 33], dtype, out=out) is None
    assert out.data_ptr() == ptr
    assert torch.equal(out, ops.dequantize_4bit(packed, absmax, 64, "nf4", [7, 33], dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantize_4bit_nested_out_writes_into_buffer(dtype):
    """dequantize_4bit_nested.out fills the given buffer in place; the functional
    dequantize_4bit(out=) returns that same buffer."""
    x = torch.randn(7, 33, dtype=dtype)
    packed, absmax_q, nested_absmax, nested_code, offset, state = nested_args(x, 32, "fp4")
    args = (packed, absmax_q, nested_absmax, nested_code, offset, 32, 256, "fp4", [7, 33], dtype)
    out = torch.full((7, 33), float("nan"), dtype=dtype)
    ptr = out.data_ptr()
    assert ops.dequantize_4bit_nested.out(*args, out=out) is None
    assert out.data_ptr() == ptr
    assert torch.equal(out, ops.dequantize_4bit_nested(*args))
    buf = torch.full((7, 33), float("nan"), dtype=dtype)
    result = F.dequantize_4bit(packed, state, out=buf)
    assert result is buf and torch.equal(buf, out)


def out_call(overload, bad_out):
    """Calls a dequantize .out overload (plain or nested) on a (7, 33) fp32 NF4 tensor."""
    x = torch.randn(7, 33)
    if overload == "plain":
        packed, absmax = ops.quantize_4bit(x, 64, "nf4", torch.uint8)
        ops.dequantize_4bit.out(packed, absmax, 64, "nf4", [7, 33], torch.float32, out=bad_out)
    else:
        packed, absmax_q, nested_absmax, nested_code, offset, _ = nested_args(x, 64, "nf4")
        ops.dequantize_4bit_nested.out(packed, absmax_q, nested_absmax, nested_code, offset, 64,
                                       256, "nf4", [7, 33], torch.float32, out=bad_out)


@pytest.mark.parametrize("overload", ("plain", "nested"))
def test_out_rejects_wrong_shape(overload):
    """An out buffer of the wrong shape is a ValueError naming out and both shapes."""
    with pytest.raises(ValueError, match=r"out must have shape \[7, 33\], got \[7, 34\]"):
        out_call(overload, torch.empty(7, 34))
    with pytest.raises(ValueError, match=r"out must have shape \[7, 33\], got \[231\]"):
        out_call(overload, torch.empty(231))


@pytest.mark.parametrize("overload", ("plain", "nested"))
def test_out_rejects_wrong_dtype(overload):
    """An out buffer of the wrong dtype is a ValueError naming out and both dtypes."""
    with pytest.raises(ValueError, match=r"out must have dtype Float, got BFloat16"):
        out_call(overload, torch.empty(7, 33, dtype=torch.bfloat16))


@pytest.mark.parametrize("overload", ("plain", "nested"))
def test_out_rejects_non_contiguous(overload):
    """A non-contiguous out buffer is a ValueError naming out and its strides."""
    with pytest.raises(ValueError, match=r"out must be contiguous, got strides \[1, 7\]"):
        out_call(overload, torch.empty(33, 7).t())


@pytest.mark.parametrize("overload", ("plain", "nested"))
def test_out_rejects_wrong_device(overload):
    """An out buffer on another device (meta) than A (cpu) is rejected, naming out and
    both devices, instead of being silently ignored."""
    with pytest.raises(ValueError, match=r"out.* meta"):
        out_call(overload, torch.empty(7, 33, device="meta"))


# ---------------------------------------------------------------------------- large tensor

@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_large_tensor_round_trip(quant_type):
    """2**22 elements: bytes equal the reference, dequantization equals the reference, every
    error is within half the widest codebook gap times the block absmax, and re-quantizing
    the dequantized tensor reproduces it exactly."""
    n = 2**22
    x = torch.randn(n // 1024, 1024)
    code = F.get_4bit_type(quant_type)
    packed, absmax = ops.quantize_4bit(x, 64, quant_type, torch.uint8)
    ref_packed, ref_absmax = ref_quantize_4bit(x, 64, code)
    assert torch.equal(packed, ref_packed) and torch.equal(absmax, ref_absmax)
    deq = ops.dequantize_4bit(packed, absmax, 64, quant_type, list(x.shape), torch.float32)
    assert torch.equal(deq, ref_dequantize_4bit(packed, absmax, 64, code, x.shape, torch.float32))
    # Nearest-code rounding: |x / absmax - code| <= half the widest gap (plus fp32 rounding).
    half_gap = float((code.sort().values.diff().max()) / 2)
    bound = absmax.repeat_interleave(64).reshape(x.shape) * (half_gap + 4 * torch.finfo().eps)
    assert ((x - deq).abs() <= bound).all()
    packed2, absmax2 = ops.quantize_4bit(deq, 64, quant_type, torch.uint8)
    deq2 = ops.dequantize_4bit(packed2, absmax2, 64, quant_type, list(x.shape), torch.float32)
    assert torch.equal(deq2, deq)
    # The nested path on the same tensor, through the functional API.
    packed_n, state = F.quantize_4bit(x, quant_type=quant_type, compress_statistics=True)
    assert torch.equal(packed_n, packed)
    deq_n = F.dequantize_4bit(packed_n, state)
    decoded = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    assert torch.equal(deq_n, ref_dequantize_4bit(packed, decoded, 64, code, x.shape, torch.float32))
    assert math.isfinite(float(deq_n.abs().max()))
