"""fourbit.nn.LoraLinear4bit and the model-level LoRA helpers (add_lora, lora_state_dict,
load_lora_state_dict, merge_and_unload).

The reference is the unfused LoRA formula on the dequantized weight in float64:
``x deq(W)^T + b + scaling * (dropout(x) A^T) B^T``. Tolerances: fp32 products accumulate
K + r terms in fp32 (rtol/atol 1e-4 at these sizes); bf16 inputs round x, A, B and the
output to bf16 (rtol/atol 3e-2).
"""

import copy
import io
import math
import pickle

import pytest
import torch
from torch import nn

import fourbit
import fourbit.functional as F
from fourbit.nn import (Linear4bit, LoraLinear4bit, add_lora, load_lora_state_dict, lora_state_dict,
                        merge_and_unload)

IN, OUT, R = 128, 48, 8


def quantized(in_features=IN, out_features=OUT, bias=True, quant_type="nf4", nested=True):
    ref = nn.Linear(in_features, out_features, bias=bias)
    lin = Linear4bit(in_features, out_features, bias=bias, quant_type=quant_type, compress_statistics=nested)
    lin.load_state_dict(ref.state_dict())
    return lin.quantize()


def reference(layer: LoraLinear4bit, x: torch.Tensor, x_lora=None) -> torch.Tensor:
    base = layer.base_layer
    w = F.dequantize_4bit(base.weight, base.quant_state).double()
    x64 = x.double()
    xl = x64 if x_lora is None else x_lora.double()
    out = x64 @ w.t() + layer.scaling * (xl @ layer.lora_A.weight.double().t()) @ layer.lora_B.weight.double().t()
    if base.bias is not None:
        out = out + base.bias.double()
    return out


@pytest.mark.parametrize("quant_type", ("nf4", "fp4"))
@pytest.mark.parametrize("nested", (False, True), ids=("plain", "nested"))
@pytest.mark.parametrize("bias", (False, True), ids=("nobias", "bias"))
def test_forward_matches_unfused_reference(quant_type, nested, bias):
    layer = LoraLinear4bit(quantized(bias=bias, quant_type=quant_type, nested=nested), r=R, lora_alpha=16,
                           init_lora_weights=False)
    x = torch.randn(3, 5, IN)
    got = layer(x)
    assert got.shape == (3, 5, OUT) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), reference(layer, x), rtol=1e-4, atol=1e-4)


def test_bf16_input_runs_in_bf16_and_matches_reference():
    layer = LoraLinear4bit(quantized(), r=R, init_lora_weights=False)
    x = torch.randn(7, IN).bfloat16()
    got = layer(x)
    assert got.dtype == torch.bfloat16 and layer.lora_A.weight.dtype == torch.float32
    torch.testing.assert_close(got.double(), reference(layer, x.float()), rtol=3e-2, atol=3e-2)


def test_peft_initialisation_and_scaling():
    layer = LoraLinear4bit(quantized(), r=R, lora_alpha=32)
    assert layer.scaling == 32 / R
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    bound = 1 / math.sqrt(IN)  # kaiming_uniform(a=sqrt(5)) on [r, in]: U(-1/sqrt(in), 1/sqrt(in))
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.std() > bound / 4
    x = torch.randn(4, IN)
    assert torch.equal(layer(x), layer.base_layer(x))  # a new adapter is a no-op
    assert LoraLinear4bit(quantized(), r=16, lora_alpha=32, use_rslora=True).scaling == 32 / 4
    gauss = LoraLinear4bit(quantized(), r=R, init_lora_weights="gaussian")
    assert abs(gauss.lora_A.weight.std().item() - 1 / R) < 0.3 / R


def test_only_adapter_weights_train():
    layer = LoraLinear4bit(quantized(), r=R, init_lora_weights=False)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A.weight", "lora_B.weight"]
    x = torch.randn(6, IN, requires_grad=True)
    layer(x).square().sum().backward()
    assert layer.base_layer.bias.grad is None
    out = reference(layer, x.detach())
    assert out.shape == (6, OUT)
    # The gradients of A, B and x agree with autograd through the float64 reference.
    x64 = x.detach().double().requires_grad_()
    A = layer.lora_A.weight.detach().double().requires_grad_()
    B = layer.lora_B.weight.detach().double().requires_grad_()
    base = layer.base_layer
    w = F.dequantize_4bit(base.weight, base.quant_state).double()
    ref = x64 @ w.t() + base.bias.double() + layer.scaling * (x64 @ A.t()) @ B.t()
    ref.square().sum().backward()
    for got, want in ((x.grad, x64.grad), (layer.lora_A.weight.grad, A.grad), (layer.lora_B.weight.grad, B.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-3)


def test_dropout_applies_to_the_adapter_input_only_and_only_in_training():
    layer = LoraLinear4bit(quantized(), r=R, lora_dropout=0.5, init_lora_weights=False)
    x = torch.randn(16, IN)
    layer.eval()
    torch.testing.assert_close(layer(x).double(), reference(layer, x), rtol=1e-4, atol=1e-4)
    layer.train()
    torch.manual_seed(3)
    got = layer(x)
    torch.manual_seed(3)
    x_dropped = nn.functional.dropout(x, 0.5, training=True)
    torch.testing.assert_close(got.double(), reference(layer, x, x_dropped), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, layer.eval()(x))


def test_merge_and_unload_layer_equals_base_plus_adapter():
    layer = LoraLinear4bit(quantized(), r=R, lora_alpha=16, init_lora_weights=False)
    merged = layer.merge_and_unload()
    assert type(merged) is nn.Linear and merged.weight.dtype == torch.float32
    x = torch.randn(5, IN)
    torch.testing.assert_close(merged(x), layer(x), rtol=1e-4, atol=1e-4)
    assert layer.merge_and_unload(torch.bfloat16).weight.dtype == torch.bfloat16
    no_bias = LoraLinear4bit(quantized(bias=False), r=R, init_lora_weights=False)
    assert no_bias.merge_and_unload().bias is None


def tiny_model():
    model = nn.Sequential(nn.Linear(IN, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8))
    return fourbit.replace_linear(model, exclude=())


def test_add_lora_selects_by_name_and_freezes_the_rest():
    model = add_lora(tiny_model(), target_modules=["0", "2"], r=4)
    assert isinstance(model[0], LoraLinear4bit) and isinstance(model[2], LoraLinear4bit)
    assert isinstance(model[4], Linear4bit)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["0.lora_A.weight", "0.lora_B.weight", "2.lora_A.weight", "2.lora_B.weight"]
    add_lora(model, r=4)  # a second call wraps only what is left, never a LoRA layer's base
    assert isinstance(model[4], LoraLinear4bit) and isinstance(model[0].base_layer, Linear4bit)


def test_a_small_model_learns_and_its_adapter_round_trips():
    model = add_lora(tiny_model(), r=8, lora_alpha=16)
    x = torch.randn(64, IN)
    target = torch.randn(64, 8)
    opt = fourbit.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(30):
        loss = nn.functional.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]

    saved = lora_state_dict(model)
    assert sorted(saved) == sorted(f"{i}.lora_{ab}.weight" for i in (0, 2, 4) for ab in "AB")
    buf = io.BytesIO()
    torch.save(saved, buf)
    fresh = add_lora(tiny_model(), r=8, lora_alpha=16)
    fresh.load_state_dict(model.state_dict())  # same base weights
    for i in (0, 2, 4):
        fresh[i].reset_lora_parameters()
    assert not torch.equal(fresh(x), model(x))
    load_lora_state_dict(fresh, torch.load(io.BytesIO(buf.getvalue())))
    assert torch.equal(fresh(x), model(x))

    out = model(x)
    merged = merge_and_unload(model)
    assert all(type(m) is nn.Linear for m in (merged[0], merged[2], merged[4]))
    torch.testing.assert_close(merged(x), out, rtol=1e-4, atol=1e-4)


def test_copies_keep_the_adapter():
    layer = LoraLinear4bit(quantized(), r=R, init_lora_weights=False)
    x = torch.randn(3, IN)
    for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert torch.equal(other(x), layer(x))


def test_compiled_training_step_has_no_graph_break():
    layer = LoraLinear4bit(quantized(), r=R, init_lora_weights=False)
    x = torch.randn(8, IN)
    eager = layer(x)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    got = compiled(x)
    got.sum().backward()
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    assert layer.lora_A.weight.grad is not None


@pytest.mark.parametrize("kwargs, message", [
    (dict(r=0), "r must be a positive int, got 0"),
    (dict(r=2.5), "r must be a positive int, got 2.5"),
    (dict(lora_alpha=float("nan")), "lora_alpha must be a finite number, got nan"),
    (dict(lora_dropout=1.0), r"lora_dropout must be in \[0, 1\), got 1.0"),
    (dict(init_lora_weights="pissa"), "init_lora_weights must be True, False or 'gaussian', got 'pissa'"),
])
def test_bad_layer_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraLinear4bit(quantized(), **kwargs)


def test_base_layer_must_be_a_linear4bit():
    with pytest.raises(ValueError, match="base_layer must be a fourbit.nn.Linear4bit, got Linear"):
        LoraLinear4bit(nn.Linear(4, 4))


def test_add_lora_errors():
    with pytest.raises(ValueError, match=r"target_modules=\['attn'\] matched no fourbit.nn.Linear4bit"):
        add_lora(tiny_model(), target_modules=["attn"])
    with pytest.raises(ValueError, match="r must be a positive int, got -1"):
        add_lora(tiny_model(), r=-1)


def test_load_lora_state_dict_checks_everything_first():
    model = add_lora(tiny_model(), r=4, init_lora_weights=False)
    before = {k: v.clone() for k, v in lora_state_dict(model).items()}
    good = {k: torch.zeros_like(v) for k, v in before.items()}
    missing = dict(good)
    del missing["4.lora_B.weight"]
    with pytest.raises(ValueError, match=r"missing keys \['4.lora_B.weight'\], unexpected keys \[\]"):
        load_lora_state_dict(model, missing)
    with pytest.raises(ValueError, match=r"unexpected keys \['9.lora_A.weight'\]"):
        load_lora_state_dict(model, {**good, "9.lora_A.weight": torch.zeros(4, IN)})
    wrong = {**good, "2.lora_A.weight": torch.zeros(8, 64)}
    with pytest.raises(ValueError, match=r"2.lora_A.weight: expected shape \[4, 64\], got \[8, 64\]"):
        load_lora_state_dict(model, wrong)
    after = lora_state_dict(model)
    assert all(torch.equal(after[k], before[k]) for k in before)  # nothing half-loaded


def test_functional_lora_matmul_4bit_and_its_errors():
    lin = quantized()
    A, B = torch.randn(R, IN), torch.randn(OUT, R)
    x = torch.randn(4, IN)
    w = F.dequantize_4bit(lin.weight, lin.quant_state)
    got = F.lora_matmul_4bit(x, lin.weight.t(), lin.quant_state, A, B, 0.5, bias=lin.bias)
    torch.testing.assert_close(got, x @ w.t() + lin.bias + 0.5 * (x @ A.t()) @ B.t(), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"lora_A must be \[r, in_features=128\], got shape \(8, 64\)"):
        F.lora_matmul_4bit(x, lin.weight, lin.quant_state, torch.randn(R, 64), B, 1.0)
    with pytest.raises(ValueError, match=r"lora_B must be \[out_features=48, r=8\], got shape \(48, 4\)"):
        F.lora_matmul_4bit(x, lin.weight, lin.quant_state, A, torch.randn(OUT, 4), 1.0)
    with pytest.raises(ValueError, match=r"A_lora must have A's shape \(4, 128\), got \(2, 128\)"):
        F.lora_matmul_4bit(x, lin.weight, lin.quant_state, A, B, 1.0, A_lora=torch.randn(2, IN))
    with pytest.raises(ValueError, match="lora_matmul_4bit needs the weight's quant_state, got None"):
        F.lora_matmul_4bit(x, lin.weight, None, A, B, 1.0)
