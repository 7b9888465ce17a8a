"""fourbit.integrations.peft: PEFT's LoRA on fourbit Linear4bit layers.

On a tiny random transformers Llama (hidden 64, 2 layers, in_features multiples of 64, CPU):
PEFT's dispatch picks fourbit's layer and its fused op; outputs and gradients equal an unfused
reference (dequantized weight + scaling * B A x); only LoRA parameters get gradients;
adapters saved by fourbit + PEFT load onto a bitsandbytes + PEFT model and give the same
outputs, and the reverse; merge / unmerge / merge_and_unload; disable_adapter; several
adapters; the options fourbit rejects.

The bitsandbytes side: bitsandbytes' own ``Linear4bit`` layers quantized on the CPU from the
same float weights (the packed bytes equal fourbit's), and ``model.is_loaded_in_4bit = True``
so that PEFT uses its bitsandbytes LoRA layer (PEFT takes that flag from transformers'
quantizer; a model converted by hand lacks it and would get PEFT's generic ``lora.Linear``).
PEFT's bitsandbytes dispatch itself works on the CPU. One bitsandbytes 0.50 CPU behaviour is
turned off: on CPUs with AVX512-BF16, an eval-mode no-grad forward repacks the weight into an
internal layout (in place, dropping the double quantization) and computes in bfloat16
(``support_avx512bf16_for_cpu``); the tests set it False per layer so that bitsandbytes runs
its standard fp32 path and keeps its standard bytes.
"""

import copy
import json
import math
import os
import warnings

import pytest
import torch
from torch import nn

import fourbit
import fourbit.functional as F
from fourbit.nn import Linear4bit, replace_linear

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

import fourbit.integrations.peft as fpeft  # noqa: E402
from fourbit.integrations.peft import LoraLinear4bitPeft  # noqa: E402

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def tiny_llama(bias=False, seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      attention_bias=bias, mlp_bias=bias, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).eval()


def fourbit_model(ref, nested=True):
    return replace_linear(copy.deepcopy(ref), quant_type="nf4", compress_statistics=nested)


def bnb_model(ref, nested=True):
    """The same model with bitsandbytes' Linear4bit layers (module docstring)."""
    bnb = pytest.importorskip("bitsandbytes")
    model = copy.deepcopy(ref)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and name != "lm_head":
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          quant_type="nf4", compress_statistics=nested)
                layer.load_state_dict(child.state_dict())
                layer = layer.to("cpu")
                layer.support_avx512bf16_for_cpu = False
                setattr(parent, name, layer)
    model.is_loaded_in_4bit = True
    return model


def lora_config(**kw):
    kw.setdefault("r", 4)
    kw.setdefault("lora_alpha", 8)
    kw.setdefault("target_modules", list(PROJ))
    kw.setdefault("init_lora_weights", False)  # random A and B: the adapter is not a no-op
    return LoraConfig(**kw)


def lora_layers(model, cls=LoraLinear4bitPeft):
    return {n: m for n, m in model.named_modules() if isinstance(m, cls)}


def reference(layer: LoraLinear4bitPeft, x, adapters=("default",)):
    """Unfused fp32 reference: x deq(W)^T + bias + sum of scaling * B A x."""
    base = layer.get_base_layer()
    w = F.dequantize_4bit(base.weight, base.quant_state).float()
    y = x.float() @ w.t()
    if base.bias is not None:
        y = y + base.bias.float()
    for name in adapters:
        y = y + layer.scaling[name] * (x.float() @ layer.lora_A[name].weight.float().t()) @ layer.lora_B[name].weight.float().t()
        if layer.lora_bias[name]:
            y = y + layer.scaling[name] * layer.lora_B[name].bias.float()
    return y


class CountFused:
    """Counts calls of fourbit.functional._lora_4bit (the fused LoRA op)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = F._lora_4bit

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(F, "_lora_4bit", counted)


def single_layer(bias=True, in_features=128, out_features=64, **cfg):
    """A PEFT model around one fourbit Linear4bit: returns (peft model, its LoRA layer)."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(in_features, out_features, bias=bias))
    replace_linear(model)
    pm = get_peft_model(model, lora_config(target_modules=["proj"], **cfg))
    return pm, pm.base_model.model.proj


# ----------------------------------------------------------------------------- dispatch

def test_dispatch_picks_fourbit_layer_for_every_target():
    model = get_peft_model(fourbit_model(tiny_llama()), lora_config(target_modules=["q_proj", "down_proj"]))
    layers = lora_layers(model)
    assert sorted(n.rsplit(".", 1)[-1] for n in layers) == ["down_proj"] * 2 + ["q_proj"] * 2
    for layer in layers.values():
        assert type(layer.get_base_layer()) is Linear4bit
    # Untargeted layers stay plain fourbit Linear4bit; nothing got PEFT's generic lora.Linear.
    assert not lora_layers(model, peft.tuners.lora.Linear)
    assert isinstance(model.base_model.model.model.layers[0].self_attn.k_proj, Linear4bit)


def test_dispatch_is_installed_once_and_defers_to_peft_for_other_layers():
    wrapped = peft.tuners.lora.LoraModel._create_new_module
    fpeft._install()  # a second install (re-import) does not wrap twice
    assert peft.tuners.lora.LoraModel._create_new_module is wrapped
    assert wrapped._fourbit_dispatch and not getattr(wrapped.__wrapped__, "_fourbit_dispatch", False)
    # A float model: PEFT's own layers, untouched by fourbit's dispatcher.
    model = get_peft_model(tiny_llama(), lora_config(target_modules=["q_proj"]))
    assert len(lora_layers(model, peft.tuners.lora.Linear)) == 2 and not lora_layers(model)


def test_user_custom_module_mapping_wins():
    class MyLora(LoraLinear4bitPeft):
        pass

    config = lora_config(target_modules=["q_proj"])
    config._register_custom_module({Linear4bit: MyLora})
    model = get_peft_model(fourbit_model(tiny_llama()), config)
    assert {type(m) for m in lora_layers(model).values()} == {MyLora}


# ----------------------------------------------------------------------------- forward and gradients

@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_is_fused_and_equals_unfused_reference(monkeypatch, bias, use_rslora):
    pm, layer = single_layer(bias=bias, use_rslora=use_rslora, r=8, lora_alpha=16)
    assert layer.scaling["default"] == (16 / math.sqrt(8) if use_rslora else 2.0)
    fused = CountFused(monkeypatch)
    x = torch.randn(3, 5, 128)
    with torch.no_grad():
        out = pm(x)
    assert fused.calls == 1
    torch.testing.assert_close(out, reference(layer, x), rtol=1e-5, atol=1e-5)


def test_gradients_match_unfused_reference():
    pm, layer = single_layer(bias=True)
    pm.train()
    x = torch.randn(4, 128, requires_grad=True)
    grad_out = torch.randn(4, 64)
    (pm(x) * grad_out).sum().backward()
    got = (x.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad)

    xr = x.detach().clone().requires_grad_(True)
    a = layer.lora_A["default"].weight.detach().clone().requires_grad_(True)
    b = layer.lora_B["default"].weight.detach().clone().requires_grad_(True)
    base = layer.get_base_layer()
    w = F.dequantize_4bit(base.weight, base.quant_state).float()
    y = xr @ w.t() + base.bias + layer.scaling["default"] * (xr @ a.t()) @ b.t()
    (y * grad_out).sum().backward()
    for g, r in zip(got, (xr.grad, a.grad, b.grad)):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    assert base.weight.grad is None and base.bias.grad is None  # frozen by PEFT


def test_dropout_applies_to_adapter_input_only(monkeypatch):
    pm, layer = single_layer(bias=False, lora_dropout=0.5)
    pm.train()
    fused = CountFused(monkeypatch)
    x = torch.randn(6, 128)
    torch.manual_seed(7)
    out = pm(x)
    torch.manual_seed(7)
    x_drop = nn.functional.dropout(x, 0.5, training=True)
    base = layer.get_base_layer()
    w = F.dequantize_4bit(base.weight, base.quant_state).float()
    expected = x @ w.t() + layer.scaling["default"] * (x_drop @ layer.lora_A["default"].weight.t()) @ \
        layer.lora_B["default"].weight.t()
    assert fused.calls == 1
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    pm.eval()  # no dropout at inference
    with torch.no_grad():
        torch.testing.assert_close(pm(x), reference(layer, x), rtol=1e-5, atol=1e-5)


def test_bf16_compute_keeps_fp32_adapter_and_is_close_to_reference():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(128, 64))
    replace_linear(model, compute_dtype=torch.bfloat16)
    pm = get_peft_model(model, lora_config(target_modules=["proj"]))
    layer = pm.base_model.model.proj
    assert layer.lora_A["default"].weight.dtype == torch.float32  # PEFT's autocast_adapter_dtype
    x = torch.randn(8, 128)
    out = pm(x)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert layer.lora_A["default"].weight.grad.dtype == torch.float32
    ref = reference(layer, x)
    # bf16 inputs and weights: about 3 significant digits.
    assert (out - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_only_lora_parameters_get_gradients_and_change():
    model = get_peft_model(fourbit_model(tiny_llama()), lora_config())
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 2 * len(PROJ)
    out = model(IDS, labels=IDS)
    out.loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in trainable)


# ----------------------------------------------------------------------------- adapters both ways

def _assert_same_outputs(a, b):
    """Same logits within a few times the gap of the two libraries' base models (their 4-bit
    kernels' rounding), and the adapters' effect far above that gap."""
    with torch.no_grad():
        ya, yb = a(IDS).logits, b(IDS).logits
        with a.disable_adapter(), b.disable_adapter():
            base_a, base_b = a(IDS).logits, b(IDS).logits
    base_gap = float((base_a - base_b).abs().max())
    assert float((ya - base_a).abs().max()) > 20 * base_gap
    torch.testing.assert_close(ya, yb, rtol=0, atol=4 * base_gap + 1e-5)


def test_fourbit_adapter_loads_onto_bitsandbytes_model(tmp_path):
    ref = tiny_llama()
    fb = get_peft_model(fourbit_model(ref), lora_config())
    fb.save_pretrained(tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and sorted(config["target_modules"]) == sorted(PROJ)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in saved
    assert len(saved) == 2 * 2 * len(PROJ) and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in saved)

    bb = PeftModel.from_pretrained(bnb_model(ref), tmp_path)
    bnb_layers = lora_layers(bb, peft.tuners.lora.bnb.Linear4bit)
    assert len(bnb_layers) == 2 * len(PROJ)  # PEFT's bitsandbytes LoRA layer, on the CPU
    for name, layer in bnb_layers.items():
        assert torch.equal(layer.get_base_layer().weight.data,
                           fb.get_submodule(name).get_base_layer().weight.data)  # same 4-bit bytes
    _assert_same_outputs(fb.eval(), bb.eval())


def test_bitsandbytes_adapter_loads_onto_fourbit_model(tmp_path):
    ref = tiny_llama()
    bb = get_peft_model(bnb_model(ref), lora_config())
    bb.save_pretrained(tmp_path)
    fb = PeftModel.from_pretrained(fourbit_model(ref), tmp_path)
    assert len(lora_layers(fb)) == 2 * len(PROJ)
    for name, layer in lora_layers(fb).items():
        assert torch.equal(layer.lora_A["default"].weight, bb.get_submodule(name).lora_A["default"].weight)
        assert torch.equal(layer.lora_B["default"].weight, bb.get_submodule(name).lora_B["default"].weight)
    _assert_same_outputs(fb.eval(), bb.eval())


def test_fourbit_adapter_round_trip_through_peft_from_pretrained(tmp_path):
    ref = tiny_llama(bias=True)
    fb = get_peft_model(fourbit_model(ref), lora_config(lora_bias=True, lora_dropout=0.1))
    fb.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(fourbit_model(ref), tmp_path)
    assert not any(p.requires_grad for p in loaded.parameters())  # inference mode by default
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(IDS).logits, fb.eval()(IDS).logits, rtol=0, atol=0)
    trainable = PeftModel.from_pretrained(fourbit_model(ref), tmp_path, is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == \
        {n for n, p in fb.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------- merging

def test_merge_requantizes_exactly_and_unmerge_restores(monkeypatch):
    pm, layer = single_layer(bias=True)
    base = layer.get_base_layer()
    x = torch.randn(5, 128)
    with torch.no_grad():
        unmerged = pm(x)
    qs = base.quant_state

    def requantized(w):
        return F.quantize_4bit(w, blocksize=qs.blocksize, compress_statistics=True, quant_type="nf4")[0]

    with torch.no_grad():
        delta = layer.get_delta_weight("default")
        expected_w = F.dequantize_4bit(base.weight, qs).float() + delta
    with pytest.warns(UserWarning, match="re-quantizes"):
        layer.merge()
    assert layer.merged and layer.merged_adapters == ["default"]
    assert torch.equal(base.weight.data, requantized(expected_w))
    assert base.quant_state.quant_type == "nf4" and base.quant_state.nested and base.quant_state.dtype == torch.float32
    fused = CountFused(monkeypatch)
    with torch.no_grad():
        merged = pm(x)
        merged_w = F.dequantize_4bit(base.weight, base.quant_state).float()
    assert fused.calls == 0  # merged: the base layer alone
    # The merged output differs from the unmerged one by the re-quantization error only.
    quant_err = float((x @ (merged_w - expected_w).t()).abs().max())
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=quant_err * 1.01 + 1e-5)
    with pytest.warns(UserWarning, match="re-quantizes"):
        layer.unmerge()
    assert not layer.merged and layer.merged_adapters == []
    assert torch.equal(base.weight.data, requantized(merged_w - delta))


def test_merge_bytes_equal_bitsandbytes_peft_merge(tmp_path):
    """Without double quantization: bitsandbytes' CPU 8-bit absmax quantizer sometimes picks the
    farther code (see _helpers.assert_8bit_codes_nearest), so nested absmax bytes may differ."""
    ref = tiny_llama()
    fb = get_peft_model(fourbit_model(ref, nested=False), lora_config(target_modules=["q_proj", "down_proj"]))
    fb.save_pretrained(tmp_path)
    bb = PeftModel.from_pretrained(bnb_model(ref, nested=False), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fm = fb.merge_and_unload()
        bm = bb.merge_and_unload()
    assert not lora_layers(fm) and isinstance(fm.model.layers[0].self_attn.q_proj, Linear4bit)
    fsd, bsd = fm.state_dict(), bm.state_dict()
    assert fsd.keys() == bsd.keys()
    for key in fsd:
        if "_proj.weight" in key:  # packed codes, absmax, quant_map, quant_state JSON
            assert torch.equal(fsd[key], bsd[key]), key
    with torch.no_grad():
        torch.testing.assert_close(fm(IDS).logits, bm(IDS).logits, rtol=1e-4, atol=1e-4)


def test_merge_and_unload_returns_fourbit_model_with_merged_output():
    pm, layer = single_layer(bias=True, lora_bias=True)
    with torch.no_grad():
        layer.lora_B["default"].bias.normal_()
        base = layer.get_base_layer()
        w = F.dequantize_4bit(base.weight, base.quant_state).float() + layer.get_delta_weight("default")
        bias = base.bias + layer.scaling["default"] * layer.lora_B["default"].bias
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = pm.merge_and_unload()
    proj = merged.proj
    assert type(proj) is Linear4bit and not lora_layers(merged)
    packed, _ = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(proj.weight.data, packed)
    torch.testing.assert_close(proj.bias.data, bias, rtol=0, atol=0)  # lora_B bias merged with its scaling
    x = torch.randn(4, 128)
    with torch.no_grad():
        expected = x @ F.dequantize_4bit(proj.weight, proj.quant_state).float().t() + bias
        torch.testing.assert_close(merged(x), expected, rtol=1e-5, atol=1e-5)


def test_safe_merge_rejects_broken_adapter():
    pm, layer = single_layer()
    with torch.no_grad():
        layer.lora_A["default"].weight[0, 0] = float("nan")
    packed = layer.get_base_layer().weight.data.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter default"):
            layer.merge(safe_merge=True)
    assert not layer.merged and torch.equal(layer.get_base_layer().weight.data, packed)


def test_merge_lora_bias_without_base_bias_is_an_error():
    with pytest.warns(UserWarning, match="lora_bias=True"):  # PEFT's own warning at creation
        pm, layer = single_layer(bias=False, lora_bias=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="adapter 'default': it has a lora_B bias .* base layer has no bias"):
            layer.merge()


# ----------------------------------------------------------------------------- adapters: several, disabled

def test_disable_adapter_gives_base_output():
    ref = tiny_llama()
    plain = fourbit_model(ref)
    with torch.no_grad():
        base_out = plain(IDS).logits
    pm = get_peft_model(fourbit_model(ref), lora_config())
    with torch.no_grad():
        with pm.disable_adapter():
            torch.testing.assert_close(pm(IDS).logits, base_out, rtol=0, atol=0)
        assert (pm(IDS).logits - base_out).abs().max() > 1e-3


def test_disable_adapter_unmerges_merged_adapter():
    pm, layer = single_layer()
    x = torch.randn(2, 128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer.merge()
        with pm.disable_adapter(), torch.no_grad():
            out = pm(x)
    assert not layer.merged
    base = layer.get_base_layer()
    w = F.dequantize_4bit(base.weight, base.quant_state).float()
    torch.testing.assert_close(out, x @ w.t() + base.bias, rtol=1e-5, atol=1e-5)


def test_multiple_adapters(monkeypatch):
    pm, layer = single_layer(bias=True)
    pm.add_adapter("second", lora_config(target_modules=["proj"], r=2, lora_alpha=6))
    assert set(layer.lora_A) == {"default", "second"} and layer.scaling["second"] == 3.0
    x = torch.randn(4, 128)
    fused = CountFused(monkeypatch)
    with torch.no_grad():
        first = pm(x)
        pm.set_adapter("second")
        second = pm(x)
    assert fused.calls == 2
    torch.testing.assert_close(first, reference(layer, x, ["default"]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second, reference(layer, x, ["second"]), rtol=1e-5, atol=1e-5)
    assert layer.lora_A["second"].weight.requires_grad and not layer.lora_A["default"].weight.requires_grad

    pm.base_model.set_adapter(["default", "second"])  # two active: the general path
    with torch.no_grad():
        both = pm(x)
    assert fused.calls == 2
    torch.testing.assert_close(both, reference(layer, x, ["default", "second"]), rtol=1e-5, atol=1e-5)

    pm.eval()  # PEFT allows adapter_names at inference only
    with torch.no_grad():  # mixed batch: one adapter per row
        mixed = pm(x, adapter_names=["default", "second", "__base__", "default"])
    expected = torch.stack([first[0], second[1], reference(layer, x, [])[2], first[3]])
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-5)

    pm.base_model.set_adapter("second")
    pm.delete_adapter("default")
    assert set(layer.lora_A) == {"second"}
    with torch.no_grad():
        torch.testing.assert_close(pm(x), second, rtol=0, atol=0)


def test_merge_several_adapters_then_unmerge():
    """Each merge and unmerge is one re-quantization of (dequantized weight +/- delta), in order."""
    pm, layer = single_layer(bias=True)
    pm.add_adapter("second", lora_config(target_modules=["proj"], r=2))
    base = layer.get_base_layer()
    qs = base.quant_state

    def step(packed, quant_state, delta):
        w = F.dequantize_4bit(packed, quant_state).float() + delta
        return F.quantize_4bit(w, blocksize=qs.blocksize, compress_statistics=True, quant_type="nf4")

    with torch.no_grad():
        d1, d2 = layer.get_delta_weight("default"), layer.get_delta_weight("second")
        p1, q1 = step(base.weight.data, qs, d1)
        p2, q2 = step(p1, q1, d2)
        p3, q3 = step(p2, q2, -d2)
        p4, _ = step(p3, q3, -d1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer.merge(adapter_names=["default", "second"])
        assert layer.merged_adapters == ["default", "second"] and torch.equal(base.weight.data, p2)
        layer.unmerge()
    assert not layer.merged and torch.equal(base.weight.data, p4)


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("option, value, shown", [
    ("use_dora", True, "use_dora=True"),
    ("init_lora_weights", "pissa", "init_lora_weights='pissa'"),
    ("init_lora_weights", "olora", "init_lora_weights='olora'"),
    ("init_lora_weights", "orthogonal", "init_lora_weights='orthogonal'"),
    ("init_lora_weights", "loftq", "init_lora_weights='loftq'"),
    ("use_qalora", True, "use_qalora=True"),
])
def test_unsupported_options_are_rejected_by_name(option, value, shown):
    model = fourbit_model(tiny_llama())
    kw = {option: value}
    if value == "loftq":
        kw["loftq_config"] = peft.LoftQConfig(loftq_bits=4)
    with pytest.raises(ValueError, match=f"does not support {shown} \\(adapter 'default', layer "
                                         r"model\.layers\.0\.self_attn\.q_proj\)"):
        get_peft_model(model, lora_config(target_modules=["q_proj"], **kw))


def test_unsupported_option_on_added_adapter_leaves_existing_one():
    pm, layer = single_layer()
    with pytest.raises(ValueError, match="does not support use_dora=True \\(adapter 'dora'"):
        pm.add_adapter("dora", lora_config(target_modules=["proj"], use_dora=True))
    assert set(layer.lora_A) == {"default"}


def test_layer_on_non_fourbit_base_is_an_error():
    with pytest.raises(ValueError, match="base_layer must be a fourbit.nn.Linear4bit, got Linear"):
        LoraLinear4bitPeft(nn.Linear(64, 64), "default", config=lora_config())


def test_fan_in_fan_out_is_corrected_with_a_warning():
    with pytest.warns(UserWarning, match="fan_in_fan_out=True does not apply to a Linear4bit"):
        pm, layer = single_layer(fan_in_fan_out=True)
    assert layer.fan_in_fan_out is False


# ----------------------------------------------------------------------------- GPU

@pytest.mark.cuda
def test_cuda_fused_forward_and_gradients_match_cpu():
    pm, layer = single_layer(bias=True)
    x = torch.randn(16, 128)
    cpu_out = pm(x)
    cpu_out.sum().backward()
    cpu_grads = [layer.lora_A["default"].weight.grad.clone(), layer.lora_B["default"].weight.grad.clone()]
    pm.zero_grad()
    pm.cuda()
    out = pm(x.cuda())
    out.sum().backward()
    torch.testing.assert_close(out.cpu(), cpu_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.lora_A["default"].weight.grad.cpu(), cpu_grads[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.lora_B["default"].weight.grad.cpu(), cpu_grads[1], rtol=1e-4, atol=1e-4)
