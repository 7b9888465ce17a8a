"""Property-based fuzzing of the load paths (issue 17): random mutations of valid serialized
4-bit states (a Linear4bit state_dict: tensors, the quant-state JSON, its key) and of
optimizer state dicts. Every case must end in one of two ways:

- a clear error: ValueError (RuntimeError from ``load_state_dict``, which gathers the
  per-key ValueErrors) whose message names a key, with the module / optimizer bit-identical
  to before the call; or
- an exact load: what was loaded is what was given, and using it (a forward, a dequantize,
  an optimizer step) works at once (no late surprise).

Any other exception (TypeError, KeyError, AttributeError, RecursionError, ...) fails the test.
At least 10,000 cases run per CI run; FOURBIT_FUZZ_EXAMPLES scales them (see docs/errors.md).
"""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fourbit  # noqa: E402
from fourbit.nn import LinearNF4  # noqa: E402

# Cases per test; the three tests below run 3 x 3,400 = 10,200 by default.
EXAMPLES = int(os.environ.get("FOURBIT_FUZZ_EXAMPLES", "3400"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False,
                suppress_health_check=list(HealthCheck))

QS_SUFFIX = "quant_state.bitsandbytes__nf4"


def _layer(nested: bool) -> LinearNF4:
    torch.manual_seed(1)
    lin = LinearNF4(40, 24, compress_statistics=nested)
    lin.load_state_dict(torch.nn.Linear(40, 24).state_dict())
    return lin.quantize()


SOURCES = {nested: _layer(nested).state_dict() for nested in (False, True)}


# ---------------------------------------------------------------------------- value strategies

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.sampled_from(["nf4", "fp4", "float32", "bfloat16", "int32", "uint8", "float99"]),
    st.sampled_from([32, 64, 128, 256, 4096, 0, -64, 48]),
)
json_values = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                                 st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                           max_leaves=6)

tensor_dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.uint8, torch.int32,
                                 torch.float64, torch.bool])


@st.composite
def mutated_tensor(draw, t: torch.Tensor):
    kind = draw(st.sampled_from(["dtype", "numel", "strided", "meta", "nonfinite", "not_tensor", "shape"]))
    if not isinstance(t, torch.Tensor) or t.is_meta:
        kind = "not_tensor"
    if kind == "dtype":
        return t.to(draw(tensor_dtypes))
    if kind == "numel":
        n = max(0, t.numel() + draw(st.integers(-3, 3)))
        return torch.zeros(n, dtype=t.dtype)
    if kind == "strided":
        wide = torch.zeros(t.numel() * 2, dtype=t.dtype)
        wide[::2] = t.flatten()
        return torch.as_strided(wide, t.shape, [2 * s for s in t.contiguous().stride()])
    if kind == "meta":
        return torch.empty(t.shape, dtype=t.dtype, device="meta")
    if kind == "nonfinite" and t.is_floating_point() and t.numel():
        t = t.clone()
        t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        return t
    if kind == "shape" and t.numel():
        return t.reshape(1, -1) if t.dim() != 2 else t.reshape(-1)
    return draw(st.one_of(st.integers(), st.text(max_size=4), st.lists(st.integers(), max_size=3), st.none()))


@st.composite
def mutated_linear_state(draw):
    nested = draw(st.booleans())
    sd = dict(SOURCES[nested])
    key = "weight." + QS_SUFFIX
    fields = json.loads(bytes(sd[key].tolist()))
    for _ in range(draw(st.integers(1, 3))):
        what = draw(st.sampled_from(["json_field", "json_drop", "json_add", "json_raw", "tensor", "drop", "add",
                                     "rename_qs", "bytes"]))
        is_dict = isinstance(fields, dict)
        if what == "json_field" and is_dict and fields:
            fields[draw(st.sampled_from(sorted(fields)))] = draw(json_values)
        elif what == "json_drop" and is_dict and fields:
            fields.pop(draw(st.sampled_from(sorted(fields))))
        elif what == "json_add" and is_dict:
            fields[draw(st.text(max_size=8))] = draw(json_values)
        elif what == "json_raw":
            fields = draw(st.sampled_from([None, [], 5, "x", "[" * 3000 + "]" * 3000]))
        elif what == "tensor":
            k = draw(st.sampled_from(sorted(k for k in sd if k != key)))
            sd[k] = draw(mutated_tensor(sd[k]))
        elif what == "drop":
            sd.pop(draw(st.sampled_from(sorted(sd))))
        elif what == "add":
            sd["weight." + draw(st.sampled_from(["absmax2", "nested_offset", "quant_state.bitsandbytes__fp4",
                                                 "extra"]))] = torch.zeros(3)
        elif what == "rename_qs" and key in sd:
            sd["weight.quant_state.bitsandbytes__fp4"] = sd.pop(key)
            key = "weight.quant_state.bitsandbytes__fp4"
        elif what == "bytes" and key in sd:
            raw = bytearray(json.dumps(fields).encode() if not isinstance(fields, str) else fields.encode())
            if raw:
                raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
            fields = raw.decode("latin-1")
    if key in sd:
        text = fields if isinstance(fields, str) else json.dumps(fields, allow_nan=True)
        sd[key] = torch.tensor(list(text.encode("utf-8", "surrogatepass")), dtype=torch.uint8)
    return nested, sd


def _module_fingerprint(m: torch.nn.Module):
    out = {n: (p, p.detach().clone()) for n, p in m.named_parameters()}
    out["__qs__"] = m.quant_state
    return out


def _assert_same_module(m, fp):
    for n, p in m.named_parameters():
        assert p is fp[n][0] and p.dtype == fp[n][1].dtype and torch.equal(p.detach(), fp[n][1]), n
    assert m.quant_state is fp["__qs__"]


def _clear_error(e: Exception) -> bool:
    return isinstance(e, (ValueError, RuntimeError)) and ("weight" in str(e) or "bias" in str(e)
                                                          or "quant_state" in str(e))


# ---------------------------------------------------------------------------- the properties

@FUZZ
@given(case=mutated_linear_state(), target_quantized=st.booleans())
def test_fuzz_linear4bit_load(case, target_quantized):
    nested, sd = case
    target = _layer(nested) if target_quantized else LinearNF4(40, 24, compress_statistics=nested)
    before = _module_fingerprint(target)
    try:
        target.load_state_dict(sd)
    except Exception as e:  # noqa: BLE001 - the property is about which exceptions
        if not _clear_error(e):
            raise
        _assert_same_module(target, before)
        return
    # Loaded: the layer saves what it was given and runs at once.
    saved = target.state_dict()
    for k, v in sd.items():
        assert k in saved, k
        if k.startswith("weight.quant_state."):  # the same fields; the offset is stored in float32
            given, now = json.loads(bytes(v.tolist())), json.loads(bytes(saved[k].tolist()))
            if "nested_offset" in given:
                given["nested_offset"] = torch.tensor(float(given["nested_offset"])).item()
            assert given == now, (given, now)
            continue
        got, want = saved[k].cpu(), v.cpu().to(saved[k].dtype)  # plain parameters convert, as in torch
        assert got.shape == want.shape and torch.allclose(got, want, rtol=0, atol=0, equal_nan=True), k
    y = target(torch.randn(2, 40))
    assert y.shape == (2, 24)


@FUZZ
@given(case=mutated_linear_state())
def test_fuzz_quant_state_from_dict(case):
    nested, sd = case
    entries = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
    try:
        qs = fourbit.functional.QuantState.from_dict(entries, device="cpu")
    except ValueError as e:
        assert "quant_state" in str(e) or "key" in str(e), str(e)
        return
    if qs.shape is not None and sd.get("weight") is SOURCES[nested]["weight"]:
        out = fourbit.functional.dequantize_4bit(sd["weight"], qs)  # no late failure
        assert out.shape == qs.shape


def _stepped_optimizer(eight_bit: bool):
    torch.manual_seed(2)
    params = [torch.nn.Parameter(torch.randn(600)), torch.nn.Parameter(torch.randn(20, 30))]
    cls = fourbit.optim.AdamW8bit if eight_bit else fourbit.optim.AdamW
    opt = cls(params, min_8bit_size=500)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    return params, opt


OPT_SOURCES = {bits: _stepped_optimizer(bits)[1].state_dict() for bits in (False, True)}


@st.composite
def mutated_optimizer_state(draw):
    eight_bit = draw(st.booleans())
    sd = copy.deepcopy(OPT_SOURCES[eight_bit])
    for _ in range(draw(st.integers(1, 3))):
        what = draw(st.sampled_from(["step", "tensor", "drop_state_key", "group_field", "group_drop", "state_type",
                                     "wrap", "root", "extra_param"]))
        idx = draw(st.sampled_from(sorted(sd["state"], key=str))) if isinstance(sd.get("state"), dict) and sd["state"] else None
        if what == "step" and idx is not None and isinstance(sd["state"][idx], dict):
            sd["state"][idx]["step"] = draw(st.one_of(json_scalars, st.just(torch.tensor(3.0)),
                                                      st.just(torch.tensor([1.0, 2.0]))))
        elif what == "tensor" and idx is not None and isinstance(sd["state"][idx], dict):
            inner = sd["state"][idx].get("__bnb_optimizer_quant_state__")
            if isinstance(inner, dict) and inner:
                k = draw(st.sampled_from(sorted(inner, key=str)))
                inner[k] = draw(mutated_tensor(inner[k]))
        elif what == "drop_state_key" and idx is not None and isinstance(sd["state"][idx], dict):
            inner = sd["state"][idx].get("__bnb_optimizer_quant_state__")
            pool = sorted(sd["state"][idx], key=str) + (sorted(inner, key=str) if isinstance(inner, dict) else [])
            if not pool:
                continue
            k = draw(st.sampled_from(pool))
            sd["state"][idx].pop(k, None)
            if isinstance(inner, dict):
                inner.pop(k, None)
        elif what == "group_field" and isinstance(sd.get("param_groups"), list) and sd["param_groups"]:
            g = sd["param_groups"][0]
            if isinstance(g, dict):
                g[draw(st.sampled_from(["lr", "eps", "weight_decay", "betas", "params"]))] = draw(
                    st.one_of(json_values, st.just((0.9, 0.999)), st.just("(0.5, 0.6)")))
        elif what == "group_drop" and isinstance(sd.get("param_groups"), list) and sd["param_groups"]:
            g = sd["param_groups"][0]
            if isinstance(g, dict) and g:
                g.pop(draw(st.sampled_from(sorted(g, key=str))))
        elif what == "state_type" and idx is not None:
            sd["state"][idx] = draw(st.one_of(st.lists(st.integers(), max_size=2), st.none(), st.text(max_size=3)))
        elif what == "wrap" and idx is not None and isinstance(sd["state"][idx], dict):
            sd["state"][idx]["__bnb_optimizer_quant_state__"] = draw(json_values)
        elif what == "root":
            sd[draw(st.sampled_from(["state", "param_groups"]))] = draw(json_values)
        elif what == "extra_param" and isinstance(sd.get("state"), dict):
            sd["state"][draw(st.integers(2, 5))] = {"step": 1}
    return eight_bit, sd


def _optimizer_fingerprint(opt):
    return copy.deepcopy(opt.param_groups), {p: {k: (v.clone() if isinstance(v, torch.Tensor) else v)
                                                 for k, v in s.items()} for p, s in opt.state.items()}


def _assert_same_optimizer(opt, fp):
    groups, state = fp
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == \
        [{k: v for k, v in g.items() if k != "params"} for g in groups]
    assert set(opt.state) == set(state)
    for p, s in state.items():
        for k, v in s.items():
            now = opt.state[p][k]
            assert (torch.equal(now, v) and now.dtype == v.dtype) if isinstance(v, torch.Tensor) else now == v, k


@FUZZ
@given(case=mutated_optimizer_state(), target_eight_bit=st.booleans())
def test_fuzz_optimizer_load(case, target_eight_bit):
    _, sd = case
    params, target = _stepped_optimizer(target_eight_bit)
    before = _optimizer_fingerprint(target)
    try:
        target.load_state_dict(sd)
    except ValueError as e:
        assert any(w in str(e) for w in ("parameter", "param_groups", "state_dict", "lr", "eps", "beta",
                                         "weight_decay")), str(e)
        _assert_same_optimizer(target, before)
        return
    # Loaded: the states are what was given (dtype kept), and a step works at once.
    for p in params:
        s = target.state.get(p)
        if s:
            assert s["state1"].dtype == s["state2"].dtype
            assert s["state1"].shape == p.shape
        p.grad = torch.randn_like(p)
    target.step()
