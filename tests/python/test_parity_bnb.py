"""Byte-for-byte parity of fourbit.functional with bitsandbytes.functional (its CPU backend).

4-bit codes, absmax, nested statistics, codebooks and the packed serialized form must be
identical. The one documented exception (docs/format.md) is 8-bit blockwise quantization,
where bitsandbytes' CPU search sometimes picks the farther code: see
_helpers.assert_8bit_codes_nearest.
"""

import io

import pytest
import torch

import fourbit.functional as F
from _helpers import (DTYPES, INPUT_KINDS, QUANT_TYPES, assert_8bit_codes_nearest, bnb_eager,
                      bnb_cpu_dequantize_4bit_is_reliable, bnb_dequantize_4bit, import_bnb,
                      make_input, seed_for)

bnbf = import_bnb()

BLOCKSIZES = (32, 64, 128, 256, 4096)
# Odd numel, numel not a multiple of any blocksize, and one exact multiple.
SHAPES = ((3, 5), (1,), (7, 33), (4096 + 3,), (64, 64))
PACKED_KEY = {q: f"quant_state.bitsandbytes__{q}" for q in QUANT_TYPES}


def bnb_code(quant_type):
    return bnbf.get_4bit_type(quant_type, device="cpu")


def assert_same_packed_dict(ours: dict, theirs: dict, quant_type: str):
    """The as_dict(packed=True) of both libraries: same keys, equal tensors, same JSON bytes."""
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        if key == "absmax" and value.dtype == torch.uint8:
            continue  # nested absmax codes: compared with the 8-bit nearest rule by the caller
        assert torch.equal(ours[key], value), key
    key = PACKED_KEY[quant_type]
    assert bytes(ours[key].tolist()) == bytes(theirs[key].tolist())


def assert_equals_bnb_dequantize(ours, packed, bnb_state):
    """`ours` equals bitsandbytes' dequantization of (packed, bnb_state): always its portable
    kernel, and its CPU C kernel too wherever that kernel is right for the shape."""
    assert torch.equal(ours, bnb_dequantize_4bit(packed, bnb_state))
    if bnb_cpu_dequantize_4bit_is_reliable(bnb_state.shape, bnb_state.blocksize):
        with bnb_eager():
            assert torch.equal(ours, bnbf.dequantize_4bit(packed, bnb_state))


# ---------------------------------------------------------------------------- quantize_4bit

@pytest.mark.parametrize("kind", INPUT_KINDS)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_quantize_4bit_plain_matches_bnb(quant_type, dtype, blocksize, kind):
    """Plain quantize_4bit, every shape of SHAPES: packed bytes, fp32 absmax, quant_map and
    packed dict equal bnb's."""
    for shape in SHAPES:
        x = make_input(kind, shape, dtype, blocksize, bnb_code(quant_type),
                       seed_for(quant_type, dtype, blocksize, kind, shape))
        packed, state = F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
        ref_packed, ref_state = bnbf.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
        assert packed.dtype == torch.uint8 and packed.shape == ref_packed.shape, shape
        assert torch.equal(packed, ref_packed), shape
        assert torch.equal(state.absmax, ref_state.absmax), shape
        assert torch.equal(state.code, ref_state.code), shape
        assert state.shape == ref_state.shape and state.dtype == ref_state.dtype, shape
        assert_same_packed_dict(state.as_dict(packed=True), ref_state.as_dict(packed=True),
                                quant_type)


@pytest.mark.parametrize("kind", INPUT_KINDS)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_quantize_4bit_nested_matches_bnb(quant_type, dtype, blocksize, kind):
    """compress_statistics=True, every shape of SHAPES: bytes, offset, nested absmax and
    quant maps equal bnb's; the uint8 absmax codes equal bnb's up to bnb's approximate
    8-bit search."""
    for shape in SHAPES:
        x = make_input(kind, shape, dtype, blocksize, bnb_code(quant_type),
                       seed_for(quant_type, dtype, blocksize, kind, shape))
        packed, state = F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type,
                                        compress_statistics=True)
        ref_packed, ref_state = bnbf.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type,
                                                   compress_statistics=True)
        assert torch.equal(packed, ref_packed), shape
        assert state.nested and ref_state.nested
        assert torch.equal(state.offset, ref_state.offset), shape
        assert torch.equal(state.state2.absmax, ref_state.state2.absmax), shape
        assert torch.equal(state.state2.code, ref_state.state2.code), shape
        assert state.state2.blocksize == ref_state.state2.blocksize == 256
        assert torch.equal(state.code, ref_state.code), shape
        assert state.absmax.dtype == ref_state.absmax.dtype == torch.uint8
        # The fp32 statistics that were double-quantized (plain absmax is bnb-exact, above).
        raw_absmax = F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)[1].absmax
        assert_8bit_codes_nearest(raw_absmax - state.offset, state.state2.absmax,
                                  state.state2.code, 256, state.absmax, ref_state.absmax)
        assert_same_packed_dict(state.as_dict(packed=True), ref_state.as_dict(packed=True),
                                quant_type)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_nested_absmax_codes_differ_rarely(quant_type):
    """Over 32768 nested absmax values, fewer than 1% of uint8 codes differ from bnb's."""
    x = torch.randn(2**20)
    _, state = F.quantize_4bit(x, blocksize=32, quant_type=quant_type, compress_statistics=True)
    _, ref_state = bnbf.quantize_4bit(x, blocksize=32, quant_type=quant_type,
                                      compress_statistics=True)
    raw_absmax = F.quantize_4bit(x, blocksize=32, quant_type=quant_type)[1].absmax
    assert raw_absmax.numel() == 2**15
    assert_8bit_codes_nearest(raw_absmax - state.offset, state.state2.absmax, state.state2.code,
                              256, state.absmax, ref_state.absmax)


@pytest.mark.parametrize("quant_storage", (torch.uint8, torch.bfloat16, torch.float16, torch.float32),
                         ids=str)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_quant_storage_matches_bnb(quant_type, quant_storage):
    """Any quant_storage holds bnb's bytes, shaped [(n+1)//(2*itemsize), 1], and dequantizes alike."""
    x = torch.randn(64, 64, dtype=torch.bfloat16)
    packed, state = F.quantize_4bit(x, quant_type=quant_type, quant_storage=quant_storage)
    ref_packed, ref_state = bnbf.quantize_4bit(x, quant_type=quant_type, quant_storage=quant_storage)
    itemsize = torch.empty((), dtype=quant_storage).element_size()
    assert packed.dtype == quant_storage
    assert packed.shape == ((x.numel() + 1) // (2 * itemsize), 1) == ref_packed.shape
    assert torch.equal(packed.view(torch.uint8), ref_packed.view(torch.uint8))
    assert_equals_bnb_dequantize(F.dequantize_4bit(packed, state), ref_packed, ref_state)


# ---------------------------------------------------------------------------- codebooks

@pytest.mark.parametrize("args", [(True, 7, 8), (False, 7, 8), (True, 4, 8), (True, 3, 5),
                                  (True, 1, 2)], ids=str)
def test_create_dynamic_map_matches_bnb(args):
    """create_dynamic_map(signed, max_exponent_bits, total_bits) equals bnb's exactly."""
    ours = F.create_dynamic_map(*args)
    theirs = bnbf.create_dynamic_map(*args)
    assert ours.dtype == theirs.dtype == torch.float32
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_get_4bit_type_matches_bnb(quant_type):
    """get_4bit_type('nf4'/'fp4') equals bnb's 16 values in bnb's code order, byte for byte
    (torch.equal alone would let FP4's +0.0 at code 8 pass as -0.0: quant_map bytes differ)."""
    ours = F.get_4bit_type(quant_type)
    theirs = bnbf.get_4bit_type(quant_type, device="cpu")
    assert ours.dtype == theirs.dtype == torch.float32
    assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32))


# ---------------------------------------------------------------------------- dequantize_4bit

DEQ_SHAPES = ((3, 5), (1,), (7, 33), (4099,), (64, 64), (16, 48), (8, 32))


def fourbit_state_from_bnb(s):
    """A fourbit QuantState holding exactly the tensors and fields of a bnb QuantState."""
    state2 = None
    if s.nested:
        state2 = F.QuantState(absmax=s.state2.absmax, code=s.state2.code,
                              blocksize=s.state2.blocksize, dtype=s.state2.dtype)
    return F.QuantState(absmax=s.absmax, shape=s.shape, code=s.code, blocksize=s.blocksize,
                        quant_type=s.quant_type, dtype=s.dtype, offset=s.offset, state2=state2)


@pytest.mark.parametrize("shape", DEQ_SHAPES, ids=str)
@pytest.mark.parametrize("blocksize", (32, 64, 4096))
@pytest.mark.parametrize("nested", (False, True), ids=("plain", "nested"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_dequantize_bnb_state_matches_bnb(quant_type, dtype, nested, blocksize, shape):
    """fourbit dequantizes bnb's bytes + QuantState (converted, as-is, and via bnb's packed
    dict + fourbit from_dict) to exactly bnb's output."""
    x = torch.randn(shape).to(dtype)
    packed, ref_state = bnbf.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type,
                                           compress_statistics=nested)
    ours = F.dequantize_4bit(packed, fourbit_state_from_bnb(ref_state))
    assert_equals_bnb_dequantize(ours, packed, ref_state)
    assert torch.equal(F.dequantize_4bit(packed, ref_state), ours)
    loaded = F.QuantState.from_dict(dict(ref_state.as_dict(packed=True)), device="cpu")
    assert loaded.nested == nested
    assert torch.equal(F.dequantize_4bit(packed, loaded), ours)


@pytest.mark.parametrize("blocksize", (32, 64, 4096))
@pytest.mark.parametrize("nested", (False, True), ids=("plain", "nested"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_fourbit_packed_dict_loads_in_bnb(quant_type, dtype, nested, blocksize):
    """fourbit as_dict(packed=True) -> bnb QuantState.from_dict -> bnb dequantize equals
    fourbit's own dequantization, every shape of DEQ_SHAPES."""
    for shape in DEQ_SHAPES:
        x = torch.randn(shape).to(dtype)
        packed, state = F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type,
                                        compress_statistics=nested)
        ours = F.dequantize_4bit(packed, state)
        assert ours.shape == x.shape and ours.dtype == dtype
        ref_state = bnbf.QuantState.from_dict(dict(state.as_dict(packed=True)), device="cpu")
        assert ref_state.nested == nested
        assert_equals_bnb_dequantize(ours, packed, ref_state)


@pytest.mark.parametrize("nested", (False, True), ids=("plain", "nested"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_safetensors_round_trip_both_ways(quant_type, dtype, nested):
    """A state_dict-like dict (weight + packed quant state) saved with safetensors by either
    library loads in both and dequantizes to the same tensor."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    x = torch.randn(48, 40).to(dtype)
    for make in (F.quantize_4bit, bnbf.quantize_4bit):
        packed, state = make(x, blocksize=64, quant_type=quant_type, compress_statistics=nested)
        sd = {"weight": packed}
        sd.update({f"weight.{k}": v for k, v in state.as_dict(packed=True).items()})
        loaded = safetensors_torch.load(safetensors_torch.save(sd))
        assert sorted(loaded) == sorted(sd)
        qs = {k[len("weight."):]: v for k, v in loaded.items() if k != "weight"}
        ours = F.dequantize_4bit(loaded["weight"], F.QuantState.from_dict(dict(qs), device="cpu"))
        assert_equals_bnb_dequantize(ours, loaded["weight"],
                                     bnbf.QuantState.from_dict(dict(qs), device="cpu"))
        original = (bnb_dequantize_4bit(packed, state) if make is bnbf.quantize_4bit
                    else F.dequantize_4bit(packed, state))
        assert torch.equal(ours, original)


def test_torch_save_of_packed_dict_round_trips():
    """torch.save/torch.load (weights_only) of a packed fourbit dict restores an equal state."""
    _, state = F.quantize_4bit(torch.randn(33, 7), quant_type="nf4", compress_statistics=True)
    buf = io.BytesIO()
    torch.save(state.as_dict(packed=True), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert F.QuantState.from_dict(loaded, device="cpu") == state


# ---------------------------------------------------------------------------- 8-bit blockwise

BLOCKWISE_SHAPES = ((3, 5), (1,), (7, 33), (4099,), (64, 64))


@pytest.mark.parametrize("blocksize", (32, 64, 256, 4096))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ("normal", "uniform", "student_t", "outlier", "zero_blocks"))
def test_quantize_blockwise_matches_bnb(kind, dtype, blocksize):
    """8-bit quantize_blockwise, every shape of BLOCKWISE_SHAPES: absmax equal; codes equal
    except where bnb's approximate search is not strictly nearer (fourbit is always at
    least as near)."""
    code = bnbf.create_dynamic_map()
    # Heavy tails and outliers put most values where bnb's search is mostly wrong (see
    # assert_8bit_codes_nearest): only the per-position rule applies to them.
    max_fraction = None if kind in ("student_t", "outlier") else 0.01
    for shape in BLOCKWISE_SHAPES:
        x = make_input(kind, shape, dtype, blocksize, code, seed_for(kind, dtype, blocksize, shape))
        q, state = F.quantize_blockwise(x, blocksize=blocksize)
        ref_q, ref_state = bnbf.quantize_blockwise(x, blocksize=blocksize)
        assert q.dtype == torch.uint8 and q.shape == ref_q.shape == x.shape, shape
        assert torch.equal(state.absmax, ref_state.absmax), shape
        assert torch.equal(state.code, ref_state.code), shape
        assert_8bit_codes_nearest(x, state.absmax, code, blocksize, q, ref_q, max_fraction)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_blockwise_codes_differ_rarely(dtype):
    """Over 2**16 values, fewer than 1% of 8-bit codes differ from bnb's."""
    code = bnbf.create_dynamic_map()
    x = torch.randn(2**16).to(dtype)
    q, state = F.quantize_blockwise(x, blocksize=256)
    ref_q, ref_state = bnbf.quantize_blockwise(x, blocksize=256)
    assert torch.equal(state.absmax, ref_state.absmax)
    assert_8bit_codes_nearest(x, state.absmax, code, 256, q, ref_q)


def test_8bit_comparison_helper_rejects_farther_codes():
    """The 8-bit comparison is not vacuous: it fails when fourbit's code is the farther one."""
    code = bnbf.create_dynamic_map()
    x = torch.randn(4096)
    q, state = F.quantize_blockwise(x, blocksize=256)
    worse = q.clone()
    worse[10] = 255 if int(q[10]) < 128 else 0
    with pytest.raises(AssertionError, match="strictly nearer"):
        assert_8bit_codes_nearest(x, state.absmax, code, 256, worse, q)
    # Too many (but individually allowed) differences trip the rate check.
    with pytest.raises(AssertionError, match="more than expected"):
        assert_8bit_codes_nearest(x, state.absmax, code, 256, q, worse.fill_(0))


def test_quantize_blockwise_exact_codes_are_exact():
    """Inputs equal to code values * absmax map to exactly those codes (bnb's search may not)."""
    code = bnbf.create_dynamic_map()
    x = code.clone()
    q, state = F.quantize_blockwise(x, blocksize=256)
    assert float(state.absmax) == 1.0
    # Duplicated values resolve to their first index.
    expected = torch.searchsorted(code, code)
    assert torch.equal(q.long(), expected)
    assert_8bit_codes_nearest(x, state.absmax, code, 256, q, bnbf.quantize_blockwise(x, blocksize=256)[0])


@pytest.mark.parametrize("shape", BLOCKWISE_SHAPES, ids=str)
@pytest.mark.parametrize("blocksize", (32, 256, 4096))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("nested", (False, True), ids=("plain", "nested"))
def test_dequantize_blockwise_of_bnb_matches_bnb(nested, dtype, blocksize, shape):
    """fourbit dequantize_blockwise of bnb's quantize_blockwise output (plain and nested
    state) equals bnb's dequantization."""
    x = torch.randn(shape).to(dtype)
    q, ref_state = bnbf.quantize_blockwise(x, blocksize=blocksize, nested=nested)
    expected = bnbf.dequantize_blockwise(q, ref_state)
    state2 = None
    if nested:
        s2 = ref_state.state2
        state2 = F.QuantState(absmax=s2.absmax, code=s2.code, blocksize=s2.blocksize, dtype=s2.dtype)
    state = F.QuantState(absmax=ref_state.absmax, code=ref_state.code, blocksize=blocksize,
                         dtype=ref_state.dtype, offset=ref_state.offset, state2=state2)
    out = F.dequantize_blockwise(q, state)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out, expected)
    if not nested:
        assert torch.equal(F.dequantize_blockwise(q, absmax=ref_state.absmax, blocksize=blocksize),
                           bnbf.dequantize_blockwise(q, absmax=ref_state.absmax, blocksize=blocksize))
