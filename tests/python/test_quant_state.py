"""QuantState: the serialized layout (as bitsandbytes'), from_dict round trips, .to(),
the legacy list layout, FSDP-style attribute access, and NaN/Inf behaviour."""

import copy
import functools
import pickle

import pytest
import torch

import fourbit.functional as F
from _helpers import DTYPES, QUANT_TYPES, bnb_dequantize_4bit, import_bnb

bnbf = import_bnb()


def both_states(nested, quant_type="nf4", shape=(33, 17), dtype=torch.bfloat16, blocksize=64):
    """(fourbit state, bnb state) of the same input."""
    x = torch.randn(shape).to(dtype)
    _, ours = F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type,
                              compress_statistics=nested)
    _, theirs = bnbf.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type,
                                   compress_statistics=nested)
    return ours, theirs


NESTED = pytest.mark.parametrize("nested", (False, True), ids=("plain", "nested"))


# ---------------------------------------------------------------------------- as_dict

@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@NESTED
def test_as_dict_unpacked_matches_bnb(nested, quant_type):
    """as_dict(packed=False) has bnb's keys in bnb's order and bnb's non-tensor values."""
    ours, theirs = both_states(nested, quant_type)
    a, b = ours.as_dict(packed=False), theirs.as_dict(packed=False)
    assert list(a) == list(b)
    for key in b:
        if isinstance(b[key], torch.Tensor):
            assert isinstance(a[key], torch.Tensor) and a[key].dtype == b[key].dtype, key
        else:
            assert a[key] == b[key] and type(a[key]) is type(b[key]), key


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@NESTED
def test_as_dict_packed_matches_bnb(nested, quant_type):
    """as_dict(packed=True) has exactly bnb's keys (tensors only, safetensors-ready), with
    the non-tensor fields in the 'quant_state.bitsandbytes__<type>' uint8 JSON tensor."""
    ours, theirs = both_states(nested, quant_type)
    a, b = ours.as_dict(packed=True), theirs.as_dict(packed=True)
    assert list(a) == list(b)
    expected = ["absmax", "quant_map"]
    if nested:
        expected += ["nested_absmax", "nested_quant_map"]
    assert list(a) == expected + [f"quant_state.bitsandbytes__{quant_type}"]
    assert all(isinstance(v, torch.Tensor) for v in a.values())
    key = f"quant_state.bitsandbytes__{quant_type}"
    assert a[key].dtype == torch.uint8 and a[key].dim() == 1
    assert bytes(a[key].tolist()) == bytes(b[key].tolist())


def test_as_dict_nested_quant_map_does_not_share_storage():
    """The packed dict's tensors share no storage (safetensors refuses shared tensors)."""
    _, state = F.quantize_4bit(torch.randn(64, 64), compress_statistics=True)
    d = state.as_dict(packed=True)
    ptrs = [v.untyped_storage().data_ptr() for v in d.values()]
    assert len(set(ptrs)) == len(ptrs)


# ---------------------------------------------------------------------------- from_dict

@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("packed", (False, True), ids=("unpacked", "packed"))
@NESTED
def test_from_dict_round_trip(nested, packed, quant_type):
    """from_dict(as_dict()) gives a state == the original, with the same fields."""
    state, _ = both_states(nested, quant_type, dtype=torch.float16, blocksize=128)
    loaded = F.QuantState.from_dict(state.as_dict(packed=packed), device="cpu")
    assert loaded == state
    assert loaded.nested == nested
    assert loaded.shape == state.shape and isinstance(loaded.shape, torch.Size)
    assert loaded.dtype == torch.float16 and loaded.blocksize == 128
    assert loaded.quant_type == quant_type
    assert torch.equal(loaded.absmax, state.absmax) and torch.equal(loaded.code, state.code)
    if nested:
        assert torch.equal(loaded.offset, state.offset)
        assert torch.equal(loaded.state2.absmax, state.state2.absmax)
        assert torch.equal(loaded.state2.code, state.state2.code)
        assert loaded.state2.blocksize == 256 and loaded.state2.dtype == torch.float32


@NESTED
def test_from_dict_strips_key_prefixes(nested):
    """Keys with a state_dict prefix ('model.layers.0.weight.absmax', ...) load the same."""
    state, _ = both_states(nested)
    prefixed = {f"model.layers.0.weight.{k}": v for k, v in state.as_dict(packed=True).items()}
    assert F.QuantState.from_dict(prefixed, device="cpu") == state


def test_from_dict_moves_tensors_to_device():
    """from_dict(device=...) puts every tensor of the state on that device."""
    state, _ = both_states(True)
    loaded = F.QuantState.from_dict(state.as_dict(packed=True), device="meta")
    for t in (loaded.absmax, loaded.code, loaded.offset, loaded.state2.absmax, loaded.state2.code):
        assert t.device.type == "meta"


@NESTED
def test_equality(nested):
    """== compares contents: a different blocksize/quant_type/absmax makes states unequal."""
    state, _ = both_states(nested)
    assert state == copy.deepcopy(state)
    other = copy.deepcopy(state)
    other.blocksize = 128
    assert state != other
    other = copy.deepcopy(state)
    other.quant_type = "fp4"
    assert state != other
    other = copy.deepcopy(state)
    other.absmax = other.absmax.clone()
    other.absmax[0] += 1
    assert state != other
    assert state != "not a state"


@NESTED
def test_deepcopy_and_pickle(nested):
    """deepcopy and pickle (used by model.to()/copy.deepcopy of modules) keep the state
    equal, despite the custom __getattr__."""
    state, _ = both_states(nested)
    assert copy.deepcopy(state) == state
    assert pickle.loads(pickle.dumps(state)) == state


# ---------------------------------------------------------------------------- .to()

@NESTED
def test_to_cpu_keeps_values(nested):
    """.to('cpu') moves in place (returns None, like bnb) and keeps every value."""
    state, _ = both_states(nested)
    before = copy.deepcopy(state)
    assert state.to("cpu") is None
    assert state == before
    assert state.absmax.device.type == "cpu"


@NESTED
def test_to_moves_every_tensor(nested):
    """.to(device) moves absmax, code and, when nested, offset and state2's tensors."""
    state, _ = both_states(nested)
    state.to("meta")
    tensors = [state.absmax, state.code]
    if nested:
        tensors += [state.offset, state.state2.absmax, state.state2.code]
    assert all(t.device.type == "meta" for t in tensors)


# ---------------------------------------------------------------------------- legacy access

@NESTED
def test_getitem_legacy_layout(nested):
    """state[i] follows bnb's legacy list [absmax, shape, dtype, blocksize, [offset, state2]
    or None, quant_type], as bnb's QuantState does."""
    ours, theirs = both_states(nested)
    assert ours[0] is ours.absmax
    assert ours[1] == theirs[1] == ours.shape
    assert ours[2] == theirs[2] == torch.bfloat16
    assert ours[3] == theirs[3] == 64
    assert ours[5] == theirs[5] == "nf4"
    assert ours[-1] == theirs[-1] == "nf4"
    if nested:
        offset, state2 = ours[4]
        assert offset is ours.offset and state2 is ours.state2
        assert len(theirs[4]) == 2
    else:
        assert ours[4] is None and theirs[4] is None
    assert ours[1:4] == [ours.shape, ours.dtype, ours.blocksize]
    with pytest.raises(IndexError):
        ours[6]


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_getattr_packed_key(quant_type):
    """getattr(state, 'bitsandbytes__<type>') returns the packed JSON tensor, so FSDP can
    resolve the state_dict key 'weight.quant_state.bitsandbytes__<type>' with getattr."""
    state, _ = both_states(True, quant_type)
    packed = state.as_dict(packed=True)[f"quant_state.bitsandbytes__{quant_type}"]
    got = getattr(state, f"bitsandbytes__{quant_type}")
    assert torch.equal(got, packed)

    class Holder:  # stands in for a Params4bit that owns a quant_state
        pass

    holder = Holder()
    holder.quant_state = state
    fqn = f"quant_state.bitsandbytes__{quant_type}"
    assert torch.equal(functools.reduce(getattr, fqn.split("."), holder), packed)
    other = "fp4" if quant_type == "nf4" else "nf4"
    with pytest.raises(AttributeError):
        getattr(state, f"bitsandbytes__{other}")
    assert not hasattr(state, "no_such_attribute")


# ---------------------------------------------------------------------------- NaN / Inf

def assert_same_with_nan(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_nan_and_inf_blocks(quant_type, dtype):
    """A NaN makes its block's absmax NaN and every code of the block the top code (15 for
    NF4); +-Inf makes absmax inf; bytes, absmax and dequantization equal bnb's."""
    x = torch.randn(5 * 64 + 10)
    x[3] = float("nan")           # block 0
    x[64 + 5] = float("inf")      # block 1
    x[128 + 9] = float("-inf")    # block 2
    x[5 * 64 + 4] = float("nan")  # the partial last block
    x = x.to(dtype)               # block 3 and 4 stay finite
    packed, state = F.quantize_4bit(x, quant_type=quant_type)
    ref_packed, ref_state = bnbf.quantize_4bit(x, quant_type=quant_type)
    assert torch.equal(packed, ref_packed)
    assert_same_with_nan(state.absmax, ref_state.absmax)
    absmax = state.absmax
    assert absmax[0].isnan() and absmax[5].isnan()
    assert absmax[1] == float("inf") and absmax[2] == float("inf")
    assert torch.isfinite(absmax[3:5]).all()
    top = int(torch.argmax(F.get_4bit_type(quant_type)))  # the code of +1.0: 15 for NF4
    if quant_type == "nf4":
        assert top == 15
    codes = torch.stack([packed.flatten() >> 4, packed.flatten() & 0xF], 1).flatten()
    assert (codes[:64] == top).all()
    assert (codes[320:330] == top).all()
    deq = F.dequantize_4bit(packed, state)
    assert deq[:64].isnan().all()
    assert_same_with_nan(deq, bnb_dequantize_4bit(ref_packed, ref_state))
    # Nested statistics of a NaN absmax are NaN, but the 4-bit bytes are unchanged.
    packed_n, _ = F.quantize_4bit(x, quant_type=quant_type, compress_statistics=True)
    ref_packed_n, _ = bnbf.quantize_4bit(x, quant_type=quant_type, compress_statistics=True)
    assert torch.equal(packed_n, packed) and torch.equal(packed_n, ref_packed_n)
