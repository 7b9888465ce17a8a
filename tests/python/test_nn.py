"""fourbit.nn: Params4bit, Linear4bit, LinearNF4, LinearFP4 as drop-ins for bitsandbytes'.

Constructor defaults, quantization on the first move, state_dict keys and bytes equal to
bitsandbytes' (loaded both ways), checked loading, copies, the compute-dtype rule and its
warning, gradients, torch.compile. Shapes keep in_features a multiple of the blocksize
where bitsandbytes' forward is compared: its CPU dequantize is wrong when blocks straddle
rows (see _helpers.bnb_cpu_dequantize_4bit_is_reliable).
"""

import copy
import inspect
import io
import pickle
import warnings

import pytest
import torch

import fourbit
import fourbit.functional as F
from fourbit.nn import Linear4bit, LinearFP4, LinearNF4, Params4bit
from _helpers import QUANT_TYPES, assert_8bit_codes_nearest, import_bnb

bnbf = import_bnb()
import bitsandbytes as bnb  # noqa: E402  (after import_bnb, which handles its import warning)

NESTED = pytest.mark.parametrize("nested", (False, True), ids=("plain", "nested"))
STORAGES = pytest.mark.parametrize("quant_storage", (torch.uint8, torch.bfloat16), ids=str)
IN, OUT = 128, 48  # in_features a multiple of the blocksize (64)


def float_linear(in_features=IN, out_features=OUT, bias=True, dtype=torch.float32):
    lin = torch.nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_features, in_features))
        if bias:
            lin.bias.copy_(torch.randn(out_features))
    return lin.to(dtype)


def make_pair(quant_type="nf4", nested=True, quant_storage=torch.uint8, dtype=torch.float32, bias=True):
    """(fourbit Linear4bit, bitsandbytes Linear4bit, the float nn.Linear) loaded with the same
    float weights and quantized on the CPU by their first .cpu()."""
    ref = float_linear(bias=bias, dtype=dtype)
    kwargs = dict(bias=bias, compress_statistics=nested, quant_type=quant_type, quant_storage=quant_storage)
    ours, theirs = Linear4bit(IN, OUT, **kwargs), bnb.nn.Linear4bit(IN, OUT, **kwargs)
    for m in (ours, theirs):
        m.to(dtype).load_state_dict(ref.state_dict())
        m.cpu()
    return ours, theirs, ref


def quantized_linear(quant_type="nf4", nested=True, quant_storage=torch.uint8, bias=True, cls=Linear4bit,
                     in_features=IN, out_features=OUT):
    ref = float_linear(in_features, out_features, bias=bias)
    kwargs = dict(bias=bias, compress_statistics=nested, quant_storage=quant_storage)
    if cls is Linear4bit:
        kwargs["quant_type"] = quant_type
    lin = cls(in_features, out_features, **kwargs)
    lin.load_state_dict(ref.state_dict())
    return lin.quantize()


def dequantized_weight(lin):
    """The module's weight decoded in fp32 (the reference of every forward comparison)."""
    qs = lin.weight.quant_state
    qs32 = F.QuantState(absmax=qs.absmax, shape=qs.shape, code=qs.code, blocksize=qs.blocksize,
                        quant_type=qs.quant_type, dtype=torch.float32, offset=qs.offset, state2=qs.state2)
    return F.dequantize_4bit(lin.weight.data, qs32)


def reference_forward(lin, x):
    """x @ deq(W)^T + bias in float64."""
    y = x.double() @ dequantized_weight(lin).double().t()
    return y + lin.bias.double() if lin.bias is not None else y


def snapshot(lin):
    """Everything a load could change: the state_dict (cloned) and the QuantState object."""
    return {k: v.clone() for k, v in lin.state_dict().items()}, lin.quant_state, type(lin.weight)


def assert_unchanged(lin, snap):
    sd, qs, weight_type = snap
    now = lin.state_dict()
    assert list(now) == list(sd)
    for key in sd:
        assert now[key].dtype == sd[key].dtype and torch.equal(now[key], sd[key]), key
    assert lin.quant_state is qs and type(lin.weight) is weight_type


def assert_same_state_dict(ours, theirs, raw_absmax=None, nested_state=None):
    """Same keys in the same order, same dtypes and bytes, with one known exception: the
    uint8 nested absmax codes may differ where bitsandbytes' approximate CPU 8-bit search
    picks a farther code: compared with the 'at least as near' rule when raw_absmax is
    given, exactly otherwise.
    """
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and ours[key].shape == value.shape, key
        if key == "weight.absmax" and raw_absmax is not None:
            assert_8bit_codes_nearest(raw_absmax - nested_state.offset, nested_state.state2.absmax,
                                      nested_state.state2.code, 256, ours[key], value)
        else:
            assert torch.equal(ours[key].view(torch.uint8), value.view(torch.uint8)), key


def qs_from_state_dict(sd, prefix="weight."):
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


# ---------------------------------------------------------------------------- constructors

@pytest.mark.parametrize("name", ("Linear4bit", "LinearNF4", "LinearFP4"))
def test_constructor_signature_matches_bnb(name):
    ours = inspect.signature(getattr(fourbit.nn, name).__init__).parameters
    theirs = inspect.signature(getattr(bnb.nn, name).__init__).parameters
    assert [(p.name, p.default) for p in ours.values()] == [(p.name, p.default) for p in theirs.values()]


def test_params4bit_signature_matches_bnb():
    ours = inspect.signature(Params4bit.__new__).parameters
    theirs = inspect.signature(bnb.nn.Params4bit.__new__).parameters
    assert [(p.name, p.default) for p in ours.values()] == [(p.name, p.default) for p in theirs.values()]


@pytest.mark.parametrize("name", ("Linear4bit", "LinearNF4", "LinearFP4"))
def test_constructed_state_matches_bnb(name):
    ours, theirs = getattr(fourbit.nn, name)(IN, OUT), getattr(bnb.nn, name)(IN, OUT)
    assert isinstance(ours.weight, Params4bit) and isinstance(ours.weight, torch.nn.Parameter)
    for attr in ("blocksize", "compress_statistics", "quant_type", "quant_storage", "bnb_quantized",
                 "quant_state", "requires_grad", "shape", "dtype", "device"):
        assert getattr(ours.weight, attr) == getattr(theirs.weight, attr), attr
    for attr in ("in_features", "out_features", "compute_dtype", "compute_type_is_set", "quant_state",
                 "quant_storage"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert ours.bias.requires_grad and ours.bias.shape == (OUT,)
    assert ours.weight.quant_type == {"Linear4bit": "fp4", "LinearNF4": "nf4", "LinearFP4": "fp4"}[name]
    assert Linear4bit(IN, OUT, bias=False).bias is None
    assert Linear4bit(IN, OUT, device="meta").weight.device.type == "meta"


def test_params4bit_defaults_match_bnb():
    data = torch.randn(4, 64)
    ours, theirs = Params4bit(data), bnb.nn.Params4bit(data)
    for attr in ("blocksize", "compress_statistics", "quant_type", "quant_storage", "bnb_quantized",
                 "quant_state", "requires_grad", "module"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert Params4bit().shape == (0,)


# ---------------------------------------------------------------------------- quantization and moves

@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_first_cpu_move_quantizes_like_bnb(quant_type):
    """.cpu() / .to("cpu") of a float weight quantizes it there (bitsandbytes does the same
    on its CPU backend); the packed bytes equal bitsandbytes'."""
    ours, theirs, ref = make_pair(quant_type, nested=False)
    for m in (ours, theirs):
        assert m.weight.bnb_quantized and m.weight.shape == (IN * OUT // 2, 1) and m.weight.dtype == torch.uint8
        assert m.quant_state is m.weight.quant_state
    assert torch.equal(ours.weight.data, theirs.weight.data)
    # Moving again does not quantize again: same bytes, same QuantState.
    data, qs = ours.weight.data.clone(), ours.quant_state
    ours.to("cpu")
    ours.weight.to("cpu")
    assert torch.equal(ours.weight.data, data) and ours.quant_state is qs


def test_explicit_quantize_on_cpu():
    lin = Linear4bit(IN, OUT, quant_type="nf4", device="cpu")
    assert not lin.weight.bnb_quantized
    w = lin.weight.detach().clone()
    assert lin.quantize() is lin and lin.weight.bnb_quantized
    packed, qs = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    assert torch.equal(lin.weight.data, packed) and lin.quant_state == qs
    with pytest.raises(RuntimeError, match="already quantized"):
        lin.quantize()
    # Params4bit alone: quantize() in place, returns self.
    p = Params4bit(torch.randn(8, 64), quant_type="fp4", compress_statistics=False)
    assert p.quantize() is p and p.bnb_quantized and p.quant_state.quant_type == "fp4" and p.shape == (256, 1)


def test_move_with_dtype_casts_then_quantizes():
    p = Params4bit(torch.randn(8, 64), quant_type="nf4")
    q = p.to("cpu", torch.bfloat16)
    assert q.bnb_quantized and q.quant_state.dtype == torch.bfloat16
    # Before quantization a dtype-only move casts the float weight (as bitsandbytes does).
    lin = Linear4bit(IN, OUT).to(torch.bfloat16)
    assert not lin.weight.bnb_quantized and lin.weight.dtype == torch.bfloat16
    assert isinstance(lin.weight, Params4bit)
    lin.cpu()
    assert lin.quant_state.dtype == torch.bfloat16


@STORAGES
def test_quantized_weight_ignores_dtype_casts(quant_storage):
    """The packed bytes are codes: .to(dtype) on a quantized weight (or module) keeps them."""
    lin = quantized_linear(quant_storage=quant_storage)
    before = lin.weight.data.clone()
    x = torch.randn(2, IN)
    y = lin(x)
    lin.to(torch.float16)
    assert lin.weight.dtype == quant_storage and torch.equal(lin.weight.data, before)
    assert lin.bias.dtype == torch.float16
    assert torch.equal(lin.weight.to(torch.float32).data, before)
    assert torch.allclose(lin(x), y, rtol=1e-2, atol=1e-2)  # bias now float16


def test_forward_before_quantization_is_an_error():
    lin = Linear4bit(IN, OUT)
    with pytest.raises(RuntimeError, match=r"not quantized yet: call .cuda\(\), .to\(device\), .cpu\(\) or "
                                           r".quantize\(\)"):
        lin(torch.randn(2, IN))


def test_quantize_errors_name_the_problem():
    with pytest.raises(RuntimeError, match="meta device"):
        Linear4bit(IN, OUT, device="meta").quantize()
    with pytest.raises(ValueError, match="float32, float16 or bfloat16 weight .* got torch.float64"):
        Params4bit(torch.randn(4, 64, dtype=torch.float64)).quantize()
    # To meta, a float weight is only moved (nothing to quantize there).
    assert not Params4bit(torch.randn(4, 64)).to("meta").bnb_quantized


# ---------------------------------------------------------------------------- state_dict vs bitsandbytes

@STORAGES
@NESTED
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_state_dict_keys_and_bytes_match_bnb(quant_type, nested, quant_storage):
    ours, theirs, ref = make_pair(quant_type, nested, quant_storage)
    a, b = ours.state_dict(), theirs.state_dict()
    expected = ["weight", "bias", "weight.absmax", "weight.quant_map"]
    if nested:
        expected += ["weight.nested_absmax", "weight.nested_quant_map"]
    assert list(a) == expected + [f"weight.quant_state.bitsandbytes__{quant_type}"]
    assert a["weight"].dtype == quant_storage
    raw_absmax = None
    if nested:  # the fp32 statistics that were double-quantized
        raw_absmax = F.quantize_4bit(ref.weight.detach(), quant_type=quant_type)[1].absmax
    assert_same_state_dict(a, b, raw_absmax, ours.quant_state if nested else None)


@NESTED
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_state_dict_of_bf16_weights_matches_bnb(quant_type, nested):
    """A bf16 model: the JSON records dtype 'bfloat16' in both libraries."""
    ours, theirs, ref = make_pair(quant_type, nested, dtype=torch.bfloat16)
    a, b = ours.state_dict(), theirs.state_dict()
    key = f"weight.quant_state.bitsandbytes__{quant_type}"
    assert bytes(a[key].tolist()) == bytes(b[key].tolist()) and b'"bfloat16"' in bytes(a[key].tolist())
    assert torch.equal(a["weight"], b["weight"]) and torch.equal(a["bias"], b["bias"])


@STORAGES
@NESTED
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_loads_bnb_state_dict(quant_type, nested, quant_storage):
    """bitsandbytes' saved Linear4bit loads into fourbit's: re-saved byte for byte, and the
    forward equals bitsandbytes' forward (fp32: both decode the weight in fp32)."""
    _, theirs, _ = make_pair(quant_type, nested, quant_storage)
    sd = theirs.state_dict()
    ours = Linear4bit(IN, OUT, quant_type=quant_type)  # not quantized, default nesting and storage
    assert str(ours.load_state_dict(sd)) == "<All keys matched successfully>"
    assert ours.weight.bnb_quantized and ours.weight.quant_storage == quant_storage
    assert ours.weight.compress_statistics == nested and ours.quant_state.nested == nested
    assert_same_state_dict(ours.state_dict(), sd)
    x = torch.randn(5, IN)
    got, want = ours(x), theirs(x)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-4)
    assert torch.allclose(got.double(), reference_forward(ours, x), rtol=1e-5, atol=1e-4)


@STORAGES
@NESTED
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_bnb_loads_fourbit_state_dict(quant_type, nested, quant_storage):
    """fourbit's state_dict loads into bitsandbytes the way bitsandbytes loads checkpoints
    (Params4bit.from_prequantized, what transformers calls; its Linear4bit has no
    _load_from_state_dict): bitsandbytes re-saves the same bytes and computes the same
    forward."""
    ours = quantized_linear(quant_type, nested, quant_storage)
    sd = {k: v.clone() for k, v in ours.state_dict().items()}
    theirs = bnb.nn.Linear4bit(IN, OUT, quant_type=quant_type, compress_statistics=nested,
                               quant_storage=quant_storage)
    theirs.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], qs_from_state_dict(sd), device="cpu",
                                                        module=theirs)
    with torch.no_grad():
        theirs.bias.copy_(sd["bias"])
    assert_same_state_dict(theirs.state_dict(), sd)
    x = torch.randn(5, IN)
    assert torch.allclose(theirs(x), ours(x), rtol=1e-5, atol=1e-4)


def test_checkpoint_round_trip_through_torch_save():
    ours = quantized_linear("nf4")
    buf = io.BytesIO()
    torch.save(ours.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    other = LinearNF4(IN, OUT)
    other.load_state_dict(loaded)
    x = torch.randn(3, IN)
    assert torch.equal(other(x), ours(x))


def test_from_prequantized_takes_bnb_stats():
    _, theirs, _ = make_pair("fp4", True, torch.bfloat16)
    sd = theirs.state_dict()
    p = Params4bit.from_prequantized(sd["weight"], qs_from_state_dict(sd), device="cpu")
    assert p.bnb_quantized and p.quant_storage == torch.bfloat16 and p.quant_type == "fp4" and p.compress_statistics
    assert not p.requires_grad
    with pytest.raises(ValueError, match=r"'data' has shape \[10, 1\]"):
        Params4bit.from_prequantized(sd["weight"][:10], qs_from_state_dict(sd), device="cpu")


def test_quant_state_properties_for_fsdp_names():
    """'weight.absmax' etc. resolve by getattr on the parameter, as with bitsandbytes."""
    lin = quantized_linear(nested=True)
    sd = lin.state_dict()
    for name in ("absmax", "quant_map", "nested_absmax", "nested_quant_map"):
        assert torch.equal(getattr(lin.weight, name), sd["weight." + name]), name
    assert lin.weight.code is lin.quant_state.code and lin.weight.nested_blocksize == 256
    assert lin.weight.nested_offset == lin.quant_state.offset and lin.weight.nested_dtype == torch.float32
    plain = quantized_linear(nested=False)
    with pytest.raises(AttributeError, match="nested_absmax"):
        plain.weight.nested_absmax
    with pytest.raises(AttributeError, match="absmax"):
        Params4bit(torch.randn(2, 64)).absmax


# ---------------------------------------------------------------------------- checked loading

def _drop(key):
    return lambda sd: {k: v for k, v in sd.items() if k != key}


def _replace(key, fn):
    return lambda sd: {k: (fn(v) if k == key else v) for k, v in sd.items()}


BAD_DICTS = {
    "missing weight.absmax": (_drop("weight.absmax"), r"weight\.\*: quant_state is missing key 'absmax'"),
    "missing weight.nested_absmax": (_drop("weight.nested_absmax"),
                                     r"weight\.nested_absmax: missing, but the state_dict holds a double-quantized"),
    "missing weight.nested_quant_map": (_drop("weight.nested_quant_map"), r"weight\.nested_quant_map: missing"),
    "unknown weight entry": (lambda sd: {**sd, "weight.extra": torch.zeros(1)},
                             r"weight\.\*: unexpected quant_state keys \['extra'\]"),
    "missing quant_state blob": (_drop("weight.quant_state.bitsandbytes__nf4"),
                                 r"weight\.quant_state\.bitsandbytes__nf4 \(or __fp4\): expected exactly one"),
    "missing weight": (_drop("weight"), r"weight: missing, but the state_dict holds its quantization entries"),
    "truncated JSON": (_replace("weight.quant_state.bitsandbytes__nf4", lambda v: v[:-5]),
                       r"weight\.\*: quant_state key 'quant_state.bitsandbytes__nf4' does not hold valid JSON"),
    "wrong absmax size": (_replace("weight.absmax", lambda v: v[:-1]),
                          r"weight\.\*: quant_state key 'absmax' has 95 elements"),
    "truncated packed weight": (_replace("weight", lambda v: v[:-8]),
                                r"weight: 'weight' has shape \[3064, 1\], but packed 4-bit codes of a \[48, 128\]"),
    "wrong bias shape": (_replace("bias", lambda v: v[:-1]),
                         r"bias: has shape \[47\], but this module's bias is \[48\]"),
}


@pytest.mark.parametrize("case", list(BAD_DICTS))
def test_bad_state_dict_names_the_key_and_changes_nothing(case):
    mutate, message = BAD_DICTS[case]
    source = quantized_linear("nf4", nested=True, in_features=IN, out_features=OUT)
    for target in (quantized_linear("nf4", nested=False), LinearNF4(IN, OUT)):  # quantized and float
        snap = snapshot(target)
        with pytest.raises(RuntimeError, match=message):
            target.load_state_dict(mutate(source.state_dict()))
        assert_unchanged(target, snap)


def test_missing_bias_is_a_missing_key():
    """Torch semantics for a missing entry: strict=True raises naming it, strict=False loads
    the rest. The quantized weight and its QuantState always arrive together."""
    source = quantized_linear("nf4").state_dict()
    target = quantized_linear("nf4")
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "bias"'):
        target.load_state_dict(_drop("bias")(source))
    target = quantized_linear("nf4")
    bias = target.bias.detach().clone()
    result = target.load_state_dict(_drop("bias")(source), strict=False)
    assert result.missing_keys == ["bias"] and result.unexpected_keys == []
    assert torch.equal(target.weight.data, source["weight"]) and torch.equal(target.bias, bias)
    assert_same_state_dict({k: v for k, v in target.state_dict().items() if k != "bias"}, _drop("bias")(source))


def test_mismatched_module_names_the_key_and_changes_nothing():
    source = quantized_linear("nf4").state_dict()
    cases = [
        (LinearFP4(IN, OUT), r"weight\.quant_state\.bitsandbytes__nf4: the checkpoint's quant_type is 'nf4', "
                             r"but this LinearFP4 was built with quant_type='fp4'"),
        (LinearNF4(2 * IN, OUT // 2), r"the checkpoint's weight shape is \[48, 128\], but this LinearNF4 is "
                                      r"\[24, 256\]"),
        (quantized_linear("nf4", in_features=64), r"weight shape is \[48, 128\]"),
    ]
    for target, message in cases:
        snap = snapshot(target)
        with pytest.raises(RuntimeError, match=message):
            target.load_state_dict(source)
        assert_unchanged(target, snap)


def test_float_state_dict_into_quantized_module_is_an_error():
    target = quantized_linear("nf4")
    snap = snapshot(target)
    with pytest.raises(RuntimeError, match=r"weight: this Linear4bit is already quantized, but the state_dict "
                                           r"holds an unquantized \[48, 128\] torch.float32 weight"):
        target.load_state_dict(float_linear().state_dict())
    assert_unchanged(target, snap)
    # Into a float module, a float weight of the wrong shape fails before the bias is touched.
    target = Linear4bit(IN, OUT)
    snap = snapshot(target)
    with pytest.raises(RuntimeError, match=r"weight: has shape \[48, 64\], but this module's weight is \[48, 128\]"):
        target.load_state_dict(float_linear(64, OUT).state_dict())
    assert_unchanged(target, snap)


def test_load_into_model_with_prefix():
    model = torch.nn.Sequential(torch.nn.Linear(IN, IN), LinearNF4(IN, OUT))
    source = torch.nn.Sequential(torch.nn.Linear(IN, IN), quantized_linear("nf4"))
    model.load_state_dict(source.state_dict())
    assert "1.weight.quant_state.bitsandbytes__nf4" in model.state_dict()
    x = torch.randn(2, IN)
    assert torch.equal(model(x), source(x))


# ---------------------------------------------------------------------------- copies

def test_deepcopy_pickle_and_copy_round_trip():
    lin = quantized_linear("nf4")
    x = torch.randn(4, IN)
    y = lin(x)
    for clone in (copy.deepcopy(lin), pickle.loads(pickle.dumps(lin))):
        assert type(clone.weight) is Params4bit and clone.weight.bnb_quantized
        assert clone.quant_state is clone.weight.quant_state and clone.quant_state is not lin.quant_state
        assert clone.quant_state == lin.quant_state
        assert clone.weight.data.data_ptr() != lin.weight.data.data_ptr()
        assert torch.equal(clone(x), y)
        assert_same_state_dict(clone.state_dict(), lin.state_dict())
    buf = io.BytesIO()
    torch.save(lin, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), y)
    shallow = copy.copy(lin.weight)
    assert type(shallow) is Params4bit and shallow.quant_state is lin.quant_state
    p = pickle.loads(pickle.dumps(Params4bit(torch.randn(2, 64), quant_type="nf4", blocksize=32)))
    assert (type(p), p.quant_type, p.blocksize, p.bnb_quantized) == (Params4bit, "nf4", 32, False)


def test_to_moves_data_and_quant_state_together():
    lin = quantized_linear("nf4")
    qs = lin.quant_state
    moved = lin.weight.to("cpu")
    assert moved is lin.weight
    new = lin.weight.to(torch.device("cpu"), non_blocking=True)
    assert isinstance(new, Params4bit) and new.quant_state is qs
    meta = copy.deepcopy(lin.weight).to("meta")
    assert meta.device.type == "meta" and meta.quant_state.absmax.device.type == "meta"
    assert meta.quant_state.state2.absmax.device.type == "meta" and meta.quant_state.offset.device.type == "meta"


# ---------------------------------------------------------------------------- forward

def test_compute_dtype_inferred_from_the_first_input():
    lin = quantized_linear("nf4")
    assert lin.compute_dtype is None and not lin.compute_type_is_set
    x = torch.randn(3, IN, dtype=torch.bfloat16)
    y = lin(x)
    assert lin.compute_dtype == torch.bfloat16 and lin.compute_type_is_set and y.dtype == torch.bfloat16
    # Later float32 inputs are computed in bfloat16 and returned as float32.
    x32 = torch.randn(3, IN)
    y32 = lin(x32)
    assert y32.dtype == torch.float32 and torch.equal(y32, lin(x32.bfloat16()).float())
    assert lin.bias.dtype == torch.float32  # the forward never changes a parameter (bitsandbytes does)
    # An explicit compute_dtype is kept.
    lin2 = quantized_linear("nf4")
    lin2.compute_dtype, lin2.compute_type_is_set = torch.float16, True
    assert torch.equal(lin2(x32), lin2(x32.half()).float())


@pytest.mark.parametrize("batch", (False, True), ids=("single", "batch"))
def test_float16_input_warns_like_bnb(batch, caplog):
    shape = (4, IN) if batch else (1, IN)
    x = torch.randn(shape, dtype=torch.float16)
    ours = quantized_linear("nf4")
    with pytest.warns(UserWarning) as record:
        y = ours(x)
    _, theirs, _ = make_pair("nf4")
    with caplog.at_level("WARNING"):
        theirs(x)
    assert [str(r.message) for r in record] == [caplog.records[-1].getMessage()]
    expected = "slow inference or training speed." if batch else "slow inference."
    assert str(record[0].message).endswith(expected)
    assert ours.compute_dtype is None and ours.compute_type_is_set and y.dtype == torch.float16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours(x)  # once per module
        lin = quantized_linear("nf4")
        lin.compute_dtype, lin.compute_type_is_set = torch.bfloat16, False
        lin(x)  # a bfloat16 compute dtype: no warning


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_forward_matches_dequantize_reference(quant_type, dtype):
    lin = quantized_linear(quant_type, nested=True)
    lin.compute_dtype, lin.compute_type_is_set = dtype, True
    x = torch.randn(2, 7, IN).to(dtype)
    y = lin(x)
    assert y.shape == (2, 7, OUT) and y.dtype == dtype
    ref = reference_forward(lin, x.reshape(-1, IN)).reshape(2, 7, OUT)
    tol = {torch.float32: 1e-4, torch.bfloat16: 6e-2, torch.float16: 1e-2}[dtype]
    assert torch.allclose(y.double(), ref, rtol=tol, atol=tol * 10)


@pytest.mark.parametrize("bias", (True, False), ids=("bias", "no_bias"))
def test_gradients_flow_to_input_and_bias(bias):
    lin = quantized_linear("fp4", nested=True, bias=bias)
    x = torch.randn(3, 5, IN, requires_grad=True)
    dy = torch.randn(3, 5, OUT)
    lin(x).backward(dy)
    assert lin.weight.grad is None and not lin.weight.requires_grad
    W = dequantized_weight(lin)
    x_ref = x.detach().clone().requires_grad_()
    b_ref = lin.bias.detach().clone().requires_grad_() if bias else None
    torch.nn.functional.linear(x_ref, W, b_ref).backward(dy)
    assert torch.allclose(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    if bias:
        assert torch.allclose(lin.bias.grad, b_ref.grad, rtol=1e-5, atol=1e-5)
        # And training works: one SGD step on the bias changes the output by exactly -lr * grad.
        x2 = torch.randn(2, IN)
        before = lin(x2).detach()
        step = lin.bias.grad.clone()
        torch.optim.SGD([lin.bias], lr=0.1).step()
        assert torch.allclose(lin(x2), before - 0.1 * step, rtol=1e-5, atol=1e-5)


def test_bf16_bias_and_input_gradients_keep_their_dtypes():
    lin = quantized_linear("nf4").to(torch.bfloat16)
    x = torch.randn(4, IN, dtype=torch.float32, requires_grad=True)
    lin.compute_dtype, lin.compute_type_is_set = torch.bfloat16, True
    lin(x).sum().backward()
    assert x.grad.dtype == torch.float32 and lin.bias.grad.dtype == torch.bfloat16


def test_forward_reuses_unpacked_state_until_it_changes():
    """The weight arguments are unpacked once; a new QuantState (a load) or a moved one
    (new tensors) is noticed."""
    lin = quantized_linear("nf4")
    x = torch.randn(2, IN)
    y = lin(x)
    cache = lin._gemm_cache
    lin(x)
    assert lin._gemm_cache is cache
    other = quantized_linear("nf4")
    lin.load_state_dict(other.state_dict())
    assert torch.equal(lin(x), other(x)) and not torch.equal(lin(x), y)
    assert lin._gemm_cache is not cache and lin._gemm_cache[0] is lin.quant_state
    lin.quant_state.absmax = lin.quant_state.absmax.clone()  # what QuantState.to does on a move
    lin(x)
    assert lin._gemm_cache[1] is lin.quant_state.absmax


def test_torch_compile_fullgraph_forward_and_backward():
    lin = quantized_linear("nf4", nested=True)
    x = torch.randn(8, IN, requires_grad=True)
    lin(x).pow(2).mean().backward()
    g_x, g_b = x.grad.clone(), lin.bias.grad.clone()
    x.grad = None
    lin.bias.grad = None
    compiled = torch.compile(lin, fullgraph=True, backend="aot_eager")
    loss = compiled(x).pow(2).mean()
    loss.backward()
    assert torch.allclose(x.grad, g_x, rtol=1e-5, atol=1e-7) and torch.allclose(lin.bias.grad, g_b, rtol=1e-5)
    # From a fresh module (compute_dtype is inferred while tracing) and with the default backend.
    fresh = quantized_linear("fp4", nested=False)
    xb = torch.randn(3, IN, dtype=torch.bfloat16)
    with torch.no_grad():
        got = torch.compile(fresh, fullgraph=True)(xb)
    assert fresh.compute_dtype == torch.bfloat16 and torch.equal(got, fresh(xb))


# ---------------------------------------------------------------------------- argument errors

def test_argument_errors_name_the_argument_and_value():
    with pytest.raises(ValueError, match="quant_type must be 'nf4' or 'fp4', got 'int4'"):
        Linear4bit(IN, OUT, quant_type="int4")
    with pytest.raises(ValueError, match="quant_storage must be a real torch dtype .* got 'uint8'"):
        Linear4bit(IN, OUT, quant_storage="uint8")
    with pytest.raises(ValueError, match="compute_dtype must be None, torch.float32, torch.float16 or "
                                         "torch.bfloat16, got torch.float64"):
        LinearNF4(IN, OUT, compute_dtype=torch.float64)
    with pytest.raises(ValueError, match=r"blocksize must be one of \(32, .*\), got 48"):
        Params4bit(torch.randn(4, 64), blocksize=48)
    with pytest.raises(ValueError, match="quant_type must be 'nf4' or 'fp4', got 'NF4'"):
        Params4bit(torch.randn(4, 64), quant_type="NF4")
    with pytest.raises(ValueError, match="bnb_quantized=True needs the quant_state"):
        Params4bit(torch.randn(4, 1), bnb_quantized=True)
    lin = quantized_linear("nf4")
    with pytest.raises(ValueError, match=r"X's last dimension must equal in_features K=128, got shape \[2, 64\]"):
        lin(torch.randn(2, 64))


# ---------------------------------------------------------------------------- CUDA

@pytest.mark.cuda
@STORAGES
@NESTED
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_cuda_first_move_quantizes_on_gpu(quant_type, nested, quant_storage):
    """.cuda() quantizes on the GPU: same bytes as on the CPU (fourbit's kernels agree), the
    QuantState lives on the GPU, the forward matches the CPU module's, and .cpu() brings
    both back."""
    ref = float_linear()
    kwargs = dict(quant_type=quant_type, compress_statistics=nested, quant_storage=quant_storage)
    gpu, cpu = Linear4bit(IN, OUT, **kwargs), Linear4bit(IN, OUT, **kwargs)
    for m in (gpu, cpu):
        m.load_state_dict(ref.state_dict())
    gpu.cuda()
    cpu.quantize()
    if nested:
        # The nested offset is torch's fp32 mean of absmax on the quantizing device
        # (docs/format.md), whose last bit may differ between CUDA and the CPU (another
        # reduction order): the CPU reference quantizes absmax - (the GPU's offset).
        qs = cpu.quant_state
        offset = gpu.quant_state.offset.cpu()
        raw_absmax = F.quantize_4bit(ref.weight.data, quant_type=quant_type)[1].absmax
        assert torch.equal(offset, raw_absmax.cuda().mean().cpu())
        absmax_q, state2 = F.quantize_blockwise(raw_absmax - offset, blocksize=256)
        cpu.quant_state = F.QuantState(absmax=absmax_q, shape=qs.shape, code=qs.code, blocksize=qs.blocksize,
                                       quant_type=qs.quant_type, dtype=qs.dtype, offset=offset, state2=state2)
    assert gpu.weight.is_cuda and gpu.weight.bnb_quantized and gpu.bias.is_cuda
    assert gpu.quant_state.absmax.is_cuda and gpu.quant_state.code.is_cuda
    assert_same_state_dict({k: v.cpu() for k, v in gpu.state_dict().items()}, cpu.state_dict())
    x = torch.randn(6, IN)
    assert torch.allclose(gpu(x.cuda()).cpu(), cpu(x), rtol=1e-4, atol=1e-4)
    gpu.cpu()
    assert not gpu.weight.is_cuda and not gpu.quant_state.absmax.is_cuda
    assert torch.allclose(gpu(x), cpu(x), rtol=1e-5, atol=1e-5)
    gpu.to("cuda")
    assert gpu.quant_state.absmax.is_cuda and torch.allclose(gpu(x.cuda()).cpu(), cpu(x), rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
def test_cuda_checkpoint_loads_on_either_device_and_compiles():
    src = quantized_linear("nf4").cuda()
    sd = src.state_dict()
    on_cpu = LinearNF4(IN, OUT)
    on_cpu.load_state_dict(sd)  # the module's device (cpu) wins
    assert not on_cpu.weight.is_cuda and not on_cpu.quant_state.absmax.is_cuda
    on_gpu = LinearNF4(IN, OUT, device="cuda")
    on_gpu.load_state_dict({k: v.cpu() for k, v in sd.items()})
    assert on_gpu.weight.is_cuda and on_gpu.quant_state.state2.absmax.is_cuda
    x = torch.randn(4, IN, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    eager = on_gpu(x)
    compiled = torch.compile(on_gpu, fullgraph=True)(x)
    assert torch.allclose(compiled.float(), eager.float(), rtol=2e-2, atol=2e-2)
    compiled.float().sum().backward()
    assert x.grad is not None and on_gpu.bias.grad is not None
