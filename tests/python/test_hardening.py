"""Hostile and careless inputs (issue 17): each case feeds one bad input and checks the
error (type, and a message naming the argument or key and the value), or, for loads, that
the module / optimizer is bit-identical to what it was before the failed call."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import fourbit
import fourbit.functional as F
from fourbit.nn import LinearFP4, LinearNF4, LoraLinear4bit, add_lora, load_lora_state_dict, lora_state_dict
from fourbit.optim import paging

QS_KEY = "weight.quant_state.bitsandbytes__nf4"


def _quantized_layer(bias=True) -> LinearNF4:
    lin = LinearNF4(64, 32, bias=bias)
    lin.load_state_dict(torch.nn.Linear(64, 32, bias=bias).state_dict())
    return lin.quantize()


def _json(sd, key=QS_KEY) -> dict:
    return json.loads(bytes(sd[key].tolist()))


def _with_json(sd, fields=None, raw=None, key=QS_KEY) -> dict:
    text = raw if raw is not None else json.dumps({**_json(sd, key), **fields})
    out = dict(sd)
    out[key] = torch.tensor(list(text.encode()), dtype=torch.uint8)
    return out


def _snapshot(module: torch.nn.Module) -> dict:
    """Every tensor a load could change: parameters (identity and bytes) and the QuantState."""
    snap = {name: (p, p.detach().clone()) for name, p in module.named_parameters()}
    qs = getattr(module, "quant_state", None)
    snap["__qs__"] = (qs, None if qs is None else copy.deepcopy(qs.as_dict()))
    return snap


def _assert_unchanged(module: torch.nn.Module, snap: dict) -> None:
    for name, p in module.named_parameters():
        obj, data = snap[name]
        assert p is obj, f"{name} was replaced"
        assert p.dtype == data.dtype and torch.equal(p.detach(), data), f"{name} changed"
    qs, fields = snap["__qs__"]
    assert getattr(module, "quant_state", None) is qs
    if qs is not None:
        now = qs.as_dict()
        assert now.keys() == fields.keys()
        for k, v in fields.items():
            assert (torch.equal(now[k], v) if isinstance(v, torch.Tensor) else now[k] == v), k


# ---------------------------------------------------------------------------- crash / OOB

def test_paged_zeros_byte_count_overflow_is_an_error():
    with pytest.raises(ValueError, match=r"paged_zeros: size \[4611686018427387904\] has too many elements"):
        paging.paged_zeros((2**62,), torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"overflow int64"):
        paging.paged_zeros((2**32, 2**32), torch.uint8, "cpu")


def test_shape_whose_numel_overflows_is_named():
    A = torch.zeros(16, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"shape \[4294967296, 4294967296\] has too many elements"):
        torch.ops.fourbit.dequantize_4bit(A, torch.zeros(1), 64, "nf4", [2**32, 2**32], torch.float32)
    out = torch.empty(0)
    with pytest.raises(ValueError, match=r"shape \[4294967296, 4294967296\] has too many elements"):
        torch.ops.fourbit.dequantize_4bit.out(A, torch.zeros(1), 64, "nf4", [2**32, 2**32], torch.float32,
                                              out=out)


def test_dequantize_checks_packed_bytes_before_allocating():
    # 10^6 x 10^6 over 4 KB: a ValueError about the packed bytes, not a 4 TB allocation.
    A = torch.zeros(4096, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"A holds 4096 bytes .* \[1000000, 1000000\] .* needs 500000000000"):
        torch.ops.fourbit.dequantize_4bit(A, torch.zeros(4), 64, "nf4", [10**6, 10**6], torch.float32)


# ---------------------------------------------------------------------------- half-applied loads

def test_linear4bit_meta_bias_leaves_layer_unchanged():
    sd = _quantized_layer().state_dict()
    target = _quantized_layer()
    snap = _snapshot(target)
    bad = dict(sd)
    bad["bias"] = torch.empty(32, device="meta")
    with pytest.raises(RuntimeError, match=r"bias: is on the meta device"):
        target.load_state_dict(bad)
    _assert_unchanged(target, snap)


@pytest.mark.parametrize("quantized_target", [False, True])
def test_linear4bit_missing_bias_under_strict_leaves_layer_unchanged(quantized_target):
    sd = _quantized_layer().state_dict()
    del sd["bias"]
    target = _quantized_layer() if quantized_target else LinearNF4(64, 32)
    snap = _snapshot(target)
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "bias"'):
        target.load_state_dict(sd)
    _assert_unchanged(target, snap)
    target.load_state_dict(sd, strict=False)  # not strict: the weight loads, the bias stays
    assert torch.equal(target.weight, sd["weight"])


def test_load_lora_state_dict_bad_entry_changes_no_adapter():
    model = torch.nn.Sequential(_quantized_layer(), _quantized_layer())
    model[1] = LinearNF4(32, 32)
    model[1].load_state_dict(torch.nn.Linear(32, 32).state_dict())
    model[1].quantize()
    add_lora(model, r=4, init_lora_weights=False)
    good = {k: torch.randn_like(v) for k, v in lora_state_dict(model).items()}
    before = {k: v.clone() for k, v in lora_state_dict(model).items()}
    for bad_value, message in ((torch.empty(4, 32, device="meta"), "meta"),
                               (torch.zeros(4, 32, dtype=torch.int64), "int64")):
        bad = dict(good)
        bad["1.lora_A.weight"] = bad_value  # sorted after every 0.* entry
        with pytest.raises(ValueError, match=rf"1\.lora_A\.weight: must be a floating-point tensor .*{message}"):
            load_lora_state_dict(model, bad)
        for k, v in lora_state_dict(model).items():
            assert torch.equal(v, before[k]), f"{k} changed by a failed load"
    load_lora_state_dict(model, good)
    assert all(torch.equal(v, good[k]) for k, v in lora_state_dict(model).items())


def _stepped(opt_cls, n=4096 * 2, **kw):
    p = torch.nn.Parameter(torch.randn(n))
    opt = opt_cls([p], **kw)
    p.grad = torch.randn_like(p)
    opt.step()
    return p, opt


def _optim_snapshot(opt):
    return copy.deepcopy(opt.state_dict())


def _assert_same_optim(opt, snap):
    now = opt.state_dict()
    assert now["param_groups"] == snap["param_groups"]
    assert now["state"].keys() == snap["state"].keys()
    for k, st in snap["state"].items():
        inner, inner_now = st.get("__bnb_optimizer_quant_state__", {}), now["state"][k].get(
            "__bnb_optimizer_quant_state__", {})
        assert st["step"] == now["state"][k]["step"]
        for name, t in inner.items():
            assert inner_now[name].dtype == t.dtype and torch.equal(inner_now[name], t), name


def _wrapped(sd, i=0):
    return sd["state"][i]["__bnb_optimizer_quant_state__"]


@pytest.mark.parametrize("case", [
    "fp32_state2_in_8bit", "uint8_state2_in_32bit", "step_abc", "no_eps", "state_list", "absmax_nan",
    "qmap_other", "shape_flat", "exp_avg_only", "wrap_not_dict", "state_not_dict_root", "step_bool",
    "absmax_negative", "state1_string",
])
def test_optimizer_bad_state_dict_is_rejected_before_any_change(case):
    cls = fourbit.optim.AdamW if case == "uint8_state2_in_32bit" else fourbit.optim.AdamW8bit
    p, src = _stepped(cls)
    sd = copy.deepcopy(src.state_dict())
    expected = {
        "fp32_state2_in_8bit": r"state2 of parameter 0 has dtype torch.float32 but state1 has torch.uint8",
        "uint8_state2_in_32bit": r"state2 of parameter 0 has dtype torch.uint8 but state1 has torch.float32",
        "step_abc": r"step of parameter 0 must be a non-negative integer .* got 'abc'",
        "no_eps": r"param_groups\[0\] lacks 'eps'",
        "state_list": r"state of parameter 0 must be a dict, got list",
        "absmax_nan": r"absmax1 of parameter 0 must hold finite values >= 0",
        "qmap_other": r"qmap2 of parameter 0 is not bitsandbytes' unsigned dynamic map",
        "shape_flat": r"state1 of parameter 0 has shape \[2, 4096\] but the parameter has \[8192\]",
        "exp_avg_only": r"state of parameter 0 lacks 'exp_avg_sq'",
        "wrap_not_dict": r"__bnb_optimizer_quant_state__ of parameter 0 must be a dict, got list",
        "state_not_dict_root": r"state_dict\['state'\] must be a dict, got list",
        "step_bool": r"step of parameter 0 must be a non-negative integer .* got True",
        "absmax_negative": r"absmax2 of parameter 0 must hold finite values >= 0",
        "state1_string": r"state1 of parameter 0 must be a tensor with values, got str",
    }[case]
    if case == "fp32_state2_in_8bit":
        _wrapped(sd)["state2"] = torch.zeros(8192)
    elif case == "uint8_state2_in_32bit":
        _wrapped(sd)["state2"] = torch.zeros(8192, dtype=torch.uint8)
    elif case == "step_abc":
        sd["state"][0]["step"] = "abc"
    elif case == "no_eps":
        del sd["param_groups"][0]["eps"]
    elif case == "state_list":
        sd["state"][0] = [1, 2]
    elif case == "absmax_nan":
        _wrapped(sd)["absmax1"][3] = float("nan")
    elif case == "qmap_other":
        _wrapped(sd)["qmap2"] = F.create_dynamic_map(signed=True)
    elif case == "shape_flat":
        _wrapped(sd)["state1"] = _wrapped(sd)["state1"].reshape(2, 4096)
    elif case == "exp_avg_only":
        sd["state"][0] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros(8192)}
    elif case == "wrap_not_dict":
        sd["state"][0]["__bnb_optimizer_quant_state__"] = [1]
    elif case == "state_not_dict_root":
        sd["state"] = []
    elif case == "step_bool":
        sd["state"][0]["step"] = True
    elif case == "absmax_negative":
        _wrapped(sd)["absmax2"][0] = -1.0
    elif case == "state1_string":
        _wrapped(sd)["state1"] = "zeros"
    target_p, target = _stepped(cls)
    snap = _optim_snapshot(target)
    with pytest.raises(ValueError, match=expected):
        target.load_state_dict(sd)
    _assert_same_optim(target, snap)


def test_optimizer_loads_torch_adamw_state_with_tensor_step():
    p = torch.nn.Parameter(torch.randn(300))
    ref = torch.optim.AdamW([p])
    p.grad = torch.randn_like(p)
    ref.step()
    opt = fourbit.optim.AdamW([p])
    opt.load_state_dict(ref.state_dict())
    assert opt.state[p]["step"] == 1
    assert torch.equal(opt.state[p]["state1"], ref.state[p]["exp_avg"])


# ---------------------------------------------------------------------------- quant-state JSON

@pytest.mark.parametrize("offset, shown", [(float("nan"), "nan"), (float("inf"), "inf"), (True, "True"),
                                           ("0.5", "'0.5'"), (None, "None")])
def test_nested_offset_must_be_a_finite_number(offset, shown):
    sd = _quantized_layer().state_dict()
    target = LinearNF4(64, 32)
    snap = _snapshot(target)
    with pytest.raises(RuntimeError, match=rf"quant_state key 'nested_offset' must be a finite number, got {shown}"):
        target.load_state_dict(_with_json(sd, {"nested_offset": offset}))
    _assert_unchanged(target, snap)


def test_key_suffix_and_json_quant_type_must_agree():
    sd = _quantized_layer().state_dict()
    msg = r"'quant_state.bitsandbytes__nf4' names quant_type 'nf4' but its JSON says quant_type='fp4'"
    for target in (LinearFP4(64, 32), LinearNF4(64, 32)):
        with pytest.raises(RuntimeError, match=msg):
            target.load_state_dict(_with_json(sd, {"quant_type": "fp4"}))
    entries = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
    entries["quant_state.bitsandbytes__nf4"] = _with_json(sd, {"quant_type": "fp4"})[QS_KEY]
    with pytest.raises(ValueError, match=msg):
        F.QuantState.from_dict(entries, device="cpu")


def test_quant_map_must_be_the_codebook_of_quant_type():
    sd = _quantized_layer().state_dict()
    bad = dict(sd)
    bad["weight.quant_map"] = F.get_4bit_type("fp4")
    with pytest.raises(RuntimeError, match=r"quant_state key 'quant_map' is not the nf4 codebook"):
        LinearNF4(64, 32).load_state_dict(bad)


@pytest.mark.parametrize("mutate, message", [
    (lambda sd: {**sd, "weight.nested_absmax": sd["weight.nested_absmax"].half()},
     r"quant_state key 'nested_absmax' must be float32, got torch.float16"),
    (lambda sd: _with_json(sd, {"dtype": "int32"}),
     r"quant_state key 'dtype' must be 'float32', 'float16' or 'bfloat16', got 'int32'"),
    (lambda sd: _with_json(sd, {"nested_dtype": "uint8"}),
     r"quant_state key 'nested_dtype' must be 'float32', 'float16' or 'bfloat16', got 'uint8'"),
    (lambda sd: _with_json(sd, raw="[" * 30000 + "]" * 30000),
     r"quant_state key 'quant_state.bitsandbytes__nf4' holds JSON nested too deeply"),
    (lambda sd: _with_json(sd, raw="[1, 2]"), r"must hold a JSON object, got list"),
    (lambda sd: _with_json(sd, raw="5"), r"must hold a JSON object, got int"),
    (lambda sd: _with_json(sd, raw=json.dumps(_json(sd)).replace('"blocksize": 64', '"blocksize": ' + "6" * 5000)),
     r"quant_state key 'blocksize' must be an int, got <a 5000-digit integer>"),
    (lambda sd: _with_json(sd, raw=" " * 70000 + "{}"), r"holds 70002 bytes; a quant state's JSON is at most"),
    (lambda sd: _with_json(sd, {"shape": [32, True]}), r"quant_state key 'shape' must be a list of non-negative ints"),
], ids=["fp16-nested-absmax", "dtype-int32", "nested-dtype-uint8", "deep-json", "json-list", "json-number",
        "5000-digit-blocksize", "oversized-json", "bool-in-shape"])
def test_bad_entries_fail_at_load_naming_the_key(mutate, message):
    sd = _quantized_layer().state_dict()
    target = LinearNF4(64, 32)
    snap = _snapshot(target)
    with pytest.raises(RuntimeError, match=message):
        target.load_state_dict(mutate(sd))
    _assert_unchanged(target, snap)


def test_non_contiguous_absmax_loads_and_works():
    src = LinearNF4(64, 32, compress_statistics=False)
    src.load_state_dict(torch.nn.Linear(64, 32).state_dict())
    src.quantize()
    sd = src.state_dict()
    absmax = torch.empty(2 * sd["weight.absmax"].numel())
    absmax[::2] = sd["weight.absmax"]
    sd["weight.absmax"] = absmax[::2]
    assert not sd["weight.absmax"].is_contiguous()
    target = LinearNF4(64, 32, compress_statistics=False)
    target.load_state_dict(sd)
    x = torch.randn(3, 64)
    assert torch.equal(target(x), src(x))


def test_quant_state_without_shape_is_a_value_error():
    packed, qs = F.quantize_4bit(torch.randn(64, 64), quant_type="nf4")
    qs.shape = None
    with pytest.raises(ValueError, match=r"quant_state.shape must be the shape of the quantized tensor, got None"):
        F.dequantize_4bit(packed, qs)
    with pytest.raises(ValueError, match=r"quant_state\.shape must be the 2-D weight shape"):
        F.matmul_4bit(torch.randn(2, 64), packed.t(), qs)
    sd = {k: v for k, v in qs.as_dict(packed=True).items()}
    with pytest.raises(ValueError, match=r"'data': its quant_state has no shape"):
        fourbit.nn.Params4bit.from_prequantized(packed, sd, device="cpu")


# ---------------------------------------------------------------------------- raw ops check their own arguments

def test_adamw_step_rejects_unsorted_map():
    q1 = F.create_dynamic_map(signed=True).flip(0).contiguous()
    q2 = F.create_dynamic_map(signed=False)
    p, g = torch.randn(1024), torch.randn(1024)
    s1, s2 = torch.zeros(1024, dtype=torch.uint8), torch.zeros(1024, dtype=torch.uint8)
    before = p.clone()
    with pytest.raises(ValueError, match=r"qmap1 must be sorted ascending, but qmap1\[0\] = 1 > qmap1\[1\]"):
        torch.ops.fourbit.adamw_step([p], [g], [s1], [s2], [torch.zeros(4)], [torch.zeros(4)], q1, q2, [1],
                                     1e-3, 0.9, 0.999, 1e-8, 0.0)
    assert torch.equal(p, before)


def test_quantize_4bit_out_must_match_the_packed_codes():
    A = torch.randn(64)
    with pytest.raises(ValueError, match=r"out must be a torch.uint8 tensor of shape \[32, 1\] on cpu, got torch.float32"):
        F.quantize_4bit(A, out=torch.zeros(32, 1))
    with pytest.raises(ValueError, match=r"absmax must be a torch.float32 tensor of shape \[1\]"):
        F.quantize_4bit(A, absmax=torch.zeros(1, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"out must be a torch.uint8 tensor of shape \[64\]"):
        F.quantize_blockwise(A, out=torch.zeros(64), blocksize=64)
    out = torch.zeros(32, 1, dtype=torch.uint8)
    packed, _ = F.quantize_4bit(A, out=out)
    assert packed is out


def test_dequantize_out_overlapping_the_packed_input_is_rejected():
    A, qs = F.quantize_4bit(torch.randn(64), quant_type="nf4", compress_statistics=False)
    buf = torch.zeros(64)
    packed_in_buf = buf.view(torch.uint8)[:32].view(32, 1)
    packed_in_buf.copy_(A)
    with pytest.raises(ValueError, match=r"dequantize_4bit: out .* overlaps packed"):
        torch.ops.fourbit.dequantize_4bit.out(packed_in_buf, qs.absmax, 64, "nf4", [64], torch.float32, out=buf)


# ---------------------------------------------------------------------------- numerics

@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adamw8bit_non_finite_gradient_stays_in_its_element(bad, dtype):
    """Decided behaviour (docs/errors.md): as torch.optim.AdamW, a non-finite gradient element
    makes only its own parameter non-finite; its 256-block of 8-bit states stays finite."""
    torch.manual_seed(1)
    grads = [torch.randn(4096, dtype=dtype) for _ in range(3)]
    grads[0][5] = bad
    results = {}
    for name, cls in (("torch", torch.optim.AdamW), ("fourbit", fourbit.optim.AdamW8bit)):
        p = torch.nn.Parameter(torch.zeros(4096, dtype=dtype))
        opt = cls([p], lr=0.01)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        results[name] = p.detach().float()
        if name == "fourbit":
            st = opt.state[p]
            assert torch.isfinite(st["absmax1"]).all() and torch.isfinite(st["absmax2"]).all()
    for name, r in results.items():
        assert (~torch.isfinite(r)).nonzero().flatten().tolist() == [5], name
    finite = torch.isfinite(results["torch"])
    # Same direction as torch's step elsewhere (8-bit states are close, not equal).
    assert torch.allclose(results["fourbit"][finite], results["torch"][finite], atol=2e-3)
