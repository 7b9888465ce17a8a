"""Every argument error of the functional API, the torch ops and QuantState.from_dict is a
ValueError whose message names the argument and the bad value (DESIGN.md: "no assert, no
abort, no silent garbage")."""

import json

import pytest
import torch

import fourbit.functional as F

ops = torch.ops.fourbit

X = torch.randn(128)  # two blocks of 64
CODE8 = F.create_dynamic_map()
PACKED, ABSMAX = ops.quantize_4bit(X, 64, "nf4", torch.uint8)
PACKED_N, STATE_N = F.quantize_4bit(X, quant_type="nf4", compress_statistics=True)
Q8, ABSMAX8 = ops.quantize_blockwise(X, CODE8, 64)
SHAPE = [128]


def dequant(A=PACKED, absmax=ABSMAX, blocksize=64, quant_type="nf4", shape=SHAPE,
            dtype=torch.float32):
    return ops.dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype)


def dequant_nested(A=PACKED_N, absmax=STATE_N.absmax, nested_absmax=STATE_N.state2.absmax,
                   nested_code=STATE_N.state2.code, offset=STATE_N.offset, blocksize=64,
                   nested_blocksize=256, quant_type="nf4", shape=SHAPE, dtype=torch.float32):
    return ops.dequantize_4bit_nested(A, absmax, nested_absmax, nested_code, offset, blocksize,
                                      nested_blocksize, quant_type, shape, dtype)


def state_with(**changes):
    """A copy of a plain NF4 QuantState of X with some fields replaced."""
    _, st = F.quantize_4bit(X, quant_type="nf4")
    for k, v in changes.items():
        setattr(st, k, v)
    return st


def expect_value_error(fn, pattern):
    with pytest.raises(ValueError, match=pattern):
        fn()


# ---------------------------------------------------------------------------- dtypes

DTYPE_CASES = {
    "functional-quantize_4bit": (lambda: F.quantize_4bit(X.int()),
                                 r"A\.dtype must be torch\.float32, .*got torch\.int32"),
    "op-quantize_4bit": (lambda: ops.quantize_4bit(X.int(), 64, "nf4", torch.uint8),
                         r"A\.dtype must be torch\.float32, .*got Int"),
    "functional-quantize_blockwise": (lambda: F.quantize_blockwise(X.int()),
                                      r"A\.dtype must be .*got torch\.int32"),
    "op-quantize_blockwise": (lambda: ops.quantize_blockwise(X.int(), CODE8, 64),
                              r"A\.dtype must be .*got Int"),
    "op-dequantize_4bit-dtype": (lambda: dequant(dtype=torch.int32), r"dtype must be .*got Int"),
    "op-dequantize_4bit_nested-dtype": (lambda: dequant_nested(dtype=torch.int32),
                                        r"dtype must be .*got Int"),
    "op-dequantize_blockwise-dtype": (
        lambda: ops.dequantize_blockwise(Q8, ABSMAX8, CODE8, 64, torch.int32),
        r"dtype must be .*got Int"),
    "op-dequantize_blockwise-A": (lambda: ops.dequantize_blockwise(X, ABSMAX8, CODE8, 64,
                                                                   torch.float32),
                                  r"A must have dtype Byte, got Float"),
    "functional-dequantize_blockwise-A": (lambda: F.dequantize_blockwise(X, absmax=ABSMAX8),
                                          r"A must be uint8, got torch\.float32"),
    "functional-dequantize_4bit-state-dtype": (
        lambda: F.dequantize_4bit(PACKED, state_with(dtype=torch.int32)),
        r"quant_state\.dtype must be .*got torch\.int32"),
    "op-quantize_4bit-quant_storage": (lambda: ops.quantize_4bit(X, 64, "nf4", torch.complex64),
                                       r"quant_storage must be a real dtype .*got ComplexFloat"),
}


@pytest.mark.parametrize("case", DTYPE_CASES, ids=str)
def test_bad_dtype(case):
    """An unsupported input/output dtype is a ValueError naming the argument and dtype."""
    expect_value_error(*DTYPE_CASES[case])


# ---------------------------------------------------------------------------- blocksize

def blocksize_calls(bs):
    return {
        "functional-quantize_4bit": lambda: F.quantize_4bit(X, blocksize=bs),
        "op-quantize_4bit": lambda: ops.quantize_4bit(X, bs, "nf4", torch.uint8),
        "functional-quantize_blockwise": lambda: F.quantize_blockwise(X, blocksize=bs),
        "op-quantize_blockwise": lambda: ops.quantize_blockwise(X, CODE8, bs),
        "op-dequantize_4bit": lambda: dequant(blocksize=bs),
        "op-dequantize_4bit_nested": lambda: dequant_nested(blocksize=bs),
        "op-dequantize_blockwise": lambda: ops.dequantize_blockwise(Q8, ABSMAX8, CODE8, bs,
                                                                    torch.float32),
        "functional-dequantize_4bit-state": lambda: F.dequantize_4bit(PACKED,
                                                                      state_with(blocksize=bs)),
    }


@pytest.mark.parametrize("call", list(blocksize_calls(0)))
@pytest.mark.parametrize("blocksize", (48, 8192, 0))
def test_bad_blocksize(blocksize, call):
    """A blocksize outside {32, ..., 4096} is a ValueError naming blocksize and the value."""
    expect_value_error(blocksize_calls(blocksize)[call], rf"blocksize must be one of .*got {blocksize}\b")


@pytest.mark.parametrize("nested_blocksize", (48, 8192, 0))
def test_bad_nested_blocksize(nested_blocksize):
    """A bad nested_blocksize is a ValueError naming nested_blocksize and the value."""
    expect_value_error(lambda: dequant_nested(nested_blocksize=nested_blocksize),
                       rf"nested_blocksize must be one of .*got {nested_blocksize}\b")


# ---------------------------------------------------------------------------- quant_type

QUANT_TYPE_CALLS = {
    "functional-quantize_4bit": lambda: F.quantize_4bit(X, quant_type="nf5"),
    "functional-dequantize_4bit-state": lambda: F.dequantize_4bit(PACKED,
                                                                  state_with(quant_type="nf5")),
    "op-quantize_4bit": lambda: ops.quantize_4bit(X, 64, "nf5", torch.uint8),
    "op-dequantize_4bit": lambda: dequant(quant_type="nf5"),
    "op-dequantize_4bit_nested": lambda: dequant_nested(quant_type="nf5"),
}


@pytest.mark.parametrize("call", QUANT_TYPE_CALLS)
def test_bad_quant_type(call):
    """quant_type 'nf5' is a ValueError (not a RuntimeError) naming quant_type and 'nf5'."""
    expect_value_error(QUANT_TYPE_CALLS[call], r"quant_type must be 'nf4' or 'fp4', got 'nf5'")


# ---------------------------------------------------------------------------- scale tensors

def strided(t):
    """A non-contiguous view with the values of t (every other element of a 2x buffer)."""
    return torch.stack([t, t], dim=-1)[..., 0]


SCALE_CASES = {
    "absmax-too-few": (lambda: dequant(absmax=ABSMAX[:1]),
                       r"absmax must have 2 elements \(one per block\), got 1"),
    "absmax-too-many": (lambda: dequant(absmax=torch.cat([ABSMAX, ABSMAX])),
                        r"absmax must have 2 elements \(one per block\), got 4"),
    "absmax-float64": (lambda: dequant(absmax=ABSMAX.double()),
                       r"absmax must have dtype Float, got Double"),
    "absmax-non-contiguous": (lambda: dequant(absmax=strided(ABSMAX)),
                              r"absmax must be contiguous, got strides \[2\]"),
    "nested-absmax-float": (lambda: dequant_nested(absmax=STATE_N.absmax.float()),
                            r"absmax must have dtype Byte, got Float"),
    "nested-absmax-too-few": (lambda: dequant_nested(absmax=STATE_N.absmax[:1]),
                              r"absmax must have 2 elements \(one uint8 per block when nested\), got 1"),
    "nested-absmax-non-contiguous": (lambda: dequant_nested(absmax=strided(STATE_N.absmax)),
                                     r"absmax must be contiguous, got strides \[2\]"),
    "nested_absmax-empty": (lambda: dequant_nested(nested_absmax=torch.empty(0)),
                            r"nested_absmax must have 1 elements .*got 0"),
    "nested_absmax-float16": (lambda: dequant_nested(nested_absmax=STATE_N.state2.absmax.half()),
                              r"nested_absmax must have dtype Float, got Half"),
    "nested_code-255": (lambda: dequant_nested(nested_code=STATE_N.state2.code[:255]),
                        r"nested_code must have 256 elements .*got 255"),
    "offset-2": (lambda: dequant_nested(offset=STATE_N.offset.reshape(1).repeat(2)),
                 r"offset must have 1 elements .*got 2"),
    "offset-float64": (lambda: dequant_nested(offset=STATE_N.offset.double()),
                       r"offset must have dtype Float, got Double"),
    "blockwise-absmax-too-few": (
        lambda: ops.dequantize_blockwise(Q8, ABSMAX8[:1], CODE8, 64, torch.float32),
        r"absmax must have 2 elements \(one per block\), got 1"),
    "blockwise-absmax-float16": (
        lambda: ops.dequantize_blockwise(Q8, ABSMAX8.half(), CODE8, 64, torch.float32),
        r"absmax must have dtype Float, got Half"),
    "blockwise-code-255": (lambda: ops.quantize_blockwise(X, CODE8[:255], 64),
                           r"code must have 256 elements \(a 256-entry map\), got 255"),
    "blockwise-code-float64": (lambda: ops.quantize_blockwise(X, CODE8.double(), 64),
                               r"code must have dtype Float, got Double"),
    "blockwise-code-non-contiguous": (lambda: ops.quantize_blockwise(X, strided(CODE8), 64),
                                      r"code must be contiguous"),
    "blockwise-code-unsorted": (lambda: ops.quantize_blockwise(X, CODE8.flip(0).contiguous(), 64),
                                r"code must be sorted ascending, but code\[0\] = 1 > code\[1\]"),
    "dequantize-blockwise-code-255": (
        lambda: ops.dequantize_blockwise(Q8, ABSMAX8, CODE8[:255], 64, torch.float32),
        r"code must have 256 elements .*got 255"),
}


@pytest.mark.parametrize("case", SCALE_CASES)
def test_bad_scale_tensors(case):
    """Wrong size, dtype or layout of absmax/nested_absmax/code/offset is a ValueError
    naming the tensor and what it got."""
    expect_value_error(*SCALE_CASES[case])


# ---------------------------------------------------------------------------- packed tensor

PACKED_CASES = {
    "too-small": (lambda: dequant(A=PACKED[:10]),
                  r"A holds 10 bytes of packed 4-bit codes, but shape \[128\] \(128 elements\) needs 64"),
    "too-large": (lambda: dequant(A=torch.cat([PACKED, PACKED[:1]])),
                  r"A holds 65 bytes .*needs 64"),
    "functional-truncated": (lambda: F.dequantize_4bit(PACKED[:10], state_with()),
                             r"A holds 10 bytes .*needs 64"),
    "nested-too-small": (lambda: dequant_nested(A=PACKED_N[:63]), r"A holds 63 bytes .*needs 64"),
    "non-contiguous": (lambda: dequant(A=strided(PACKED.flatten()).reshape(-1, 1)),
                       r"A must be contiguous, got strides"),
    "negative-shape": (lambda: dequant(shape=[-1, 128]),
                       r"shape must have non-negative sizes, got \[-1, 128\]"),
    "blockwise-A-non-contiguous": (
        lambda: ops.dequantize_blockwise(strided(Q8), ABSMAX8, CODE8, 64, torch.float32),
        r"A must be contiguous"),
}


@pytest.mark.parametrize("case", PACKED_CASES)
def test_bad_packed_tensor(case):
    """A packed tensor too small/large for the shape, or non-contiguous, is a ValueError
    naming A, the byte count and the shape."""
    expect_value_error(*PACKED_CASES[case])


def test_missing_state_arguments():
    """Dequantizing without a quant_state (or absmax/out) is a ValueError saying what is needed."""
    expect_value_error(lambda: F.dequantize_4bit(PACKED),
                       r"dequantize_4bit needs quant_state, or both absmax and out")
    expect_value_error(lambda: F.dequantize_4bit(PACKED, absmax=ABSMAX),
                       r"needs quant_state, or both absmax and out")
    expect_value_error(lambda: F.dequantize_blockwise(Q8),
                       r"dequantize_blockwise needs quant_state or absmax")


# ---------------------------------------------------------------------------- devices

DEVICE_CASES = {
    "dequantize_4bit-absmax": (lambda: dequant(absmax=ABSMAX.to("meta")), r"absmax.* meta"),
    "dequantize_4bit_nested-nested_absmax": (
        lambda: dequant_nested(nested_absmax=STATE_N.state2.absmax.to("meta")),
        r"nested_absmax.* meta"),
    "quantize_blockwise-code": (lambda: ops.quantize_blockwise(X, CODE8.to("meta"), 64),
                                r"code.* meta"),
    "dequantize_blockwise-absmax": (
        lambda: ops.dequantize_blockwise(Q8, ABSMAX8.to("meta"), CODE8, 64, torch.float32),
        r"absmax.* meta"),
}


@pytest.mark.parametrize("case", DEVICE_CASES)
def test_mismatched_devices(case):
    """A scale/code tensor on another device (meta) than A (cpu) is a ValueError naming the
    tensor and the devices, rather than a silently returned uninitialized tensor.
    (test_cuda.py checks cpu vs cuda on the GPU machine.)"""
    expect_value_error(*DEVICE_CASES[case])


# ---------------------------------------------------------------------------- from_dict

def packed_dict(nested=False, quant_type="nf4", edit_json=None, shape=(128,)):
    """as_dict(packed=True) of a state of randn(shape), with its JSON edited by edit_json(d)."""
    _, st = F.quantize_4bit(torch.randn(shape), quant_type=quant_type, compress_statistics=nested)
    d = st.as_dict(packed=True)
    if edit_json is not None:
        key = f"quant_state.bitsandbytes__{quant_type}"
        extras = json.loads(bytes(d[key].tolist()))
        edit_json(extras)
        d[key] = torch.tensor(list(json.dumps(extras).encode()), dtype=torch.uint8)
    return d


def edited(**changes):
    """edit_json callback: sets keys to values, deletes keys whose value is ..."""
    def edit(d):
        for k, v in changes.items():
            if v is ...:
                del d[k]
            else:
                d[k] = v
    return edit


def with_tensor(d, key, value):
    d = dict(d)
    if value is ...:
        del d[key]
    else:
        d[key] = value
    return d


def truncated_json():
    d = packed_dict()
    d["quant_state.bitsandbytes__nf4"] = d["quant_state.bitsandbytes__nf4"][:-5]
    return d


def two_packed_keys():
    d = packed_dict()
    d["quant_state.bitsandbytes__fp4"] = d["quant_state.bitsandbytes__nf4"].clone()
    return d


def renamed(d, old, new):
    d = dict(d)
    d[new] = d.pop(old)
    return d


FROM_DICT_CASES = {
    "non-dict": (lambda: [1, 2], r"qs_dict must be a dict, got list"),
    "neither-packed-nor-unpacked": (
        lambda: {k: v for k, v in packed_dict().items() if not k.startswith("quant_state")},
        r"expected packed or unpacked quant_state items, found neither .*'absmax'"),
    "packed-json-missing-quant_type": (lambda: packed_dict(edit_json=edited(quant_type=...)),
                                       r"quant_state is missing key 'quant_type'"),
    "packed-json-missing-blocksize": (lambda: packed_dict(edit_json=edited(blocksize=...)),
                                      r"quant_state is missing key 'blocksize'"),
    "two-packed-keys": (two_packed_keys,
                        r"exactly one .*found \['quant_state\.bitsandbytes__nf4', "
                        r"'quant_state\.bitsandbytes__fp4'\]"),
    "packed-key-bad-suffix": (
        lambda: renamed(packed_dict(), "quant_state.bitsandbytes__nf4",
                        "quant_state.bitsandbytes__int4"),
        r"exactly one .*found \['quant_state\.bitsandbytes__int4'\]"),
    "truncated-json": (truncated_json,
                       r"quant_state key 'quant_state\.bitsandbytes__nf4' does not hold valid JSON"),
    "non-utf8-json": (
        lambda: with_tensor(packed_dict(), "quant_state.bitsandbytes__nf4",
                            torch.tensor([0xFF, 0xFE, 0x7B], dtype=torch.uint8)),
        r"quant_state key 'quant_state\.bitsandbytes__nf4' does not hold valid JSON"),
    "json-not-an-object": (
        lambda: with_tensor(packed_dict(), "quant_state.bitsandbytes__nf4",
                            torch.tensor(list(b"[1, 2]"), dtype=torch.uint8)),
        r"quant_state key 'quant_state\.bitsandbytes__nf4' must hold a JSON object, got list"),
    "packed-tensor-not-uint8": (
        lambda: with_tensor(packed_dict(), "quant_state.bitsandbytes__nf4",
                            packed_dict()["quant_state.bitsandbytes__nf4"].long()),
        r"quant_state key 'quant_state\.bitsandbytes__nf4' must be a uint8 tensor"),
    "wrong-key-name": (lambda: renamed(packed_dict(), "quant_map", "code"),
                       r"unexpected quant_state keys \['code'\]"),
    "extra-key": (lambda: with_tensor(packed_dict(), "absmaxx", torch.zeros(2)),
                  r"unexpected quant_state keys \['absmaxx'\]"),
    "missing-absmax": (lambda: with_tensor(packed_dict(), "absmax", ...),
                       r"quant_state is missing key 'absmax'"),
    "absmax-not-a-tensor": (lambda: with_tensor(packed_dict(), "absmax", [1.0, 2.0]),
                            r"quant_state key 'absmax' must be a tensor, got list"),
    "absmax-truncated": (
        lambda: with_tensor(packed_dict(), "absmax", packed_dict()["absmax"][:1]),
        r"quant_state key 'absmax' has 1 elements, but shape \[128\] with blocksize 64 needs 2"),
    "nested-absmax-truncated": (
        lambda: with_tensor(packed_dict(nested=True), "absmax",
                            packed_dict(nested=True)["absmax"][:1]),
        r"quant_state key 'absmax' has 1 elements, but shape \[128\] with blocksize 64 needs 2"),
    "nested_absmax-truncated": (
        lambda: with_tensor(packed_dict(nested=True), "nested_absmax", torch.empty(0)),
        r"quant_state key 'nested_absmax' has 0 elements, but 2 blocks with nested_blocksize "
        r"256 need 1"),
    "quant_map-15": (lambda: with_tensor(packed_dict(), "quant_map", torch.zeros(15)),
                     r"quant_state key 'quant_map' must have 16 elements, got 15"),
    "nested_quant_map-255": (
        lambda: with_tensor(packed_dict(nested=True), "nested_quant_map", torch.zeros(255)),
        r"quant_state key 'nested_quant_map' must have 256 elements, got 255"),
    "plain-absmax-float16": (
        lambda: with_tensor(packed_dict(), "absmax", packed_dict()["absmax"].half()),
        r"quant_state key 'absmax' must be float32, got torch\.float16"),
    "nested-absmax-float32": (
        lambda: with_tensor(packed_dict(nested=True), "absmax",
                            packed_dict(nested=True)["absmax"].float()),
        r"quant_state key 'absmax' must be uint8 when nested, got torch\.float32"),
    "json-blocksize-48": (lambda: packed_dict(edit_json=edited(blocksize=48)),
                          r"quant_state key 'blocksize' must be one of .*got 48"),
    "json-blocksize-string": (lambda: packed_dict(edit_json=edited(blocksize="64")),
                              r"quant_state key 'blocksize' must be an int, got '64'"),
    "json-blocksize-bool": (lambda: packed_dict(edit_json=edited(blocksize=True)),
                            r"quant_state key 'blocksize' must be an int, got True"),
    "json-nested_blocksize-100": (
        lambda: packed_dict(nested=True, edit_json=edited(nested_blocksize=100)),
        r"quant_state key 'nested_blocksize' must be one of .*got 100"),
    "json-quant_type-nf5": (lambda: packed_dict(edit_json=edited(quant_type="nf5")),
                            r"quant_state key 'quant_type' must be 'nf4' or 'fp4', got 'nf5'"),
    "json-dtype-unknown": (lambda: packed_dict(edit_json=edited(dtype="float99")),
                           r"quant_state key 'dtype' must be 'float32', 'float16' or 'bfloat16', got 'float99'"),
    "json-dtype-not-a-dtype": (lambda: packed_dict(edit_json=edited(dtype="randn")),
                               r"quant_state key 'dtype' must be 'float32', 'float16' or 'bfloat16', got 'randn'"),
    "json-nested_dtype-unknown": (
        lambda: packed_dict(nested=True, edit_json=edited(nested_dtype="int99")),
        r"quant_state key 'nested_dtype' must be 'float32', 'float16' or 'bfloat16', got 'int99'"),
    "json-shape-negative": (lambda: packed_dict(edit_json=edited(shape=[-1])),
                            r"quant_state key 'shape' must be a list of non-negative ints, got \[-1\]"),
    "json-shape-string": (lambda: packed_dict(edit_json=edited(shape="128")),
                          r"quant_state key 'shape' must be a list of non-negative ints, got '128'"),
    "json-nested_offset-string": (
        lambda: packed_dict(nested=True, edit_json=edited(nested_offset="abc")),
        r"quant_state key 'nested_offset' must be a finite number, got 'abc'"),
    "json-nested-missing-offset": (
        lambda: packed_dict(nested=True, edit_json=edited(nested_offset=...)),
        r"quant_state is missing key 'nested_offset'"),
}


@pytest.mark.parametrize("case", FROM_DICT_CASES)
def test_from_dict_malformed(case):
    """QuantState.from_dict on a malformed dict is a ValueError naming the offending key
    (and the bad value where there is one)."""
    make, pattern = FROM_DICT_CASES[case]
    qs_dict = make()
    with pytest.raises(ValueError, match=pattern):
        F.QuantState.from_dict(qs_dict, device="cpu")


def test_from_dict_does_not_mutate_input():
    """from_dict leaves the caller's dict (e.g. a state_dict) untouched, even on error."""
    d = packed_dict(nested=True)
    keys = sorted(d)
    F.QuantState.from_dict(d, device="cpu")
    assert sorted(d) == keys
    bad = renamed(packed_dict(), "quant_map", "code")
    bad_keys = sorted(bad)
    with pytest.raises(ValueError, match="unexpected quant_state keys"):
        F.QuantState.from_dict(bad, device="cpu")
    assert sorted(bad) == bad_keys


# ---------------------------------------------------------------------------- codebooks

@pytest.mark.parametrize("kwargs,pattern", [
    ({"total_bits": 9}, r"total_bits must be in \[2, 8\], got 9"),
    ({"total_bits": 1}, r"total_bits must be in \[2, 8\], got 1"),
    ({"max_exponent_bits": 0}, r"max_exponent_bits must be in \[1, total_bits - 1 = 7\], got 0"),
    ({"max_exponent_bits": 8}, r"max_exponent_bits must be in \[1, total_bits - 1 = 7\], got 8"),
    ({"max_exponent_bits": 4, "total_bits": 4},
     r"max_exponent_bits must be in \[1, total_bits - 1 = 3\], got 4"),
], ids=str)
def test_create_dynamic_map_invalid_bits(kwargs, pattern):
    """create_dynamic_map with impossible bit counts is a ValueError naming the argument."""
    expect_value_error(lambda: F.create_dynamic_map(**kwargs), pattern)


@pytest.mark.parametrize("typename", ("int4", "af4", "NF4", ""))
def test_get_4bit_type_unknown(typename):
    """get_4bit_type of anything but 'nf4'/'fp4' is a ValueError naming the typename."""
    expect_value_error(lambda: F.get_4bit_type(typename),
                       rf"typename must be 'nf4' or 'fp4', got '{typename}'")
