"""fourbit.nn.replace_linear and fourbit.prepare_model_for_kbit_training.

On a tiny random transformers Llama (hidden 64, 2 layers, vocab 128, CPU): which layers
are converted (include/exclude rule), outputs close to the float model, bitsandbytes'
state_dict keys, streaming (each float weight is freed as soon as its layer is replaced,
checked at every quantize call), error messages, and PEFT's preparation rules (compared
with peft itself when it is installed, and always with the rules written out here), then
a few training steps with gradient checkpointing.
"""

import importlib.util
import weakref

import pytest
import torch
from torch import nn

import fourbit
import fourbit.functional as F
from fourbit.nn import Linear4bit, Params4bit, replace_linear

transformers = pytest.importorskip("transformers")

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
HAS_PEFT = importlib.util.find_spec("peft") is not None


def tiny_llama(dtype=torch.float32, bias=False):
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      attention_bias=bias, mlp_bias=bias, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def linear_names(model, cls=nn.Linear):
    return sorted(n for n, m in model.named_modules() if isinstance(m, cls))


def checkpointing(model):
    # transformers 5 renamed is_gradient_checkpointing (deprecated, warns) to is_activation_checkpointing.
    if hasattr(type(model), "is_activation_checkpointing"):
        return model.is_activation_checkpointing
    return model.is_gradient_checkpointing


def converted(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, Linear4bit))


IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- replace_linear

def test_default_converts_every_projection_but_not_lm_head():
    model = tiny_llama()
    with torch.no_grad():
        ref = model(IDS).logits
    assert replace_linear(model) is model
    expected = sorted(f"model.layers.{i}.{part}.{p}" for i in range(2) for p in PROJ
                      for part in ("self_attn", "mlp") if (p in PROJ[:4]) == (part == "self_attn"))
    assert converted(model) == expected
    assert type(model.lm_head) is nn.Linear
    for name in expected:
        layer = model.get_submodule(name)
        assert isinstance(layer.weight, Params4bit) and layer.weight.bnb_quantized
        assert layer.weight.requires_grad is False
        assert layer.weight.quant_type == "nf4" and layer.quant_state.blocksize == 64 and layer.quant_state.nested
        assert layer.weight.dtype == torch.uint8 and layer.quant_state.dtype == torch.float32
    with torch.no_grad():
        out = model(IDS).logits
    # NF4 with blocksize 64 on a random (N(0, 0.02)) model: measured 0.994; 0.99 leaves margin.
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    assert cos > 0.99, cos


def test_converted_layer_equals_quantize_4bit_of_its_weight():
    model = tiny_llama(bias=True)
    q = model.model.layers[0].self_attn.q_proj
    w, b = q.weight.detach().clone(), q.bias
    replace_linear(model, quant_type="fp4", blocksize=128, compress_statistics=False)
    new = model.model.layers[0].self_attn.q_proj
    packed, qs = F.quantize_4bit(w, blocksize=128, compress_statistics=False, quant_type="fp4")
    assert torch.equal(new.weight.data, packed) and torch.equal(new.quant_state.absmax, qs.absmax)
    assert new.bias is b and new.bias.requires_grad  # the same bias Parameter, dtype and flag kept
    x = torch.randn(3, 64)
    torch.testing.assert_close(new(x), x @ F.dequantize_4bit(packed, qs).T + b)


def test_state_dict_has_bitsandbytes_keys_and_reloads():
    model = replace_linear(tiny_llama())
    sd = model.state_dict()
    prefix = "model.layers.1.mlp.down_proj.weight"
    for key in ("", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
                ".quant_state.bitsandbytes__nf4"):
        assert prefix + key in sd
    assert not any(k.startswith("lm_head.weight.") for k in sd)
    fresh = replace_linear(tiny_llama())
    fresh.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS).logits, model(IDS).logits, rtol=0, atol=0)


@pytest.mark.parametrize("include, exclude, expected", [
    (["q_proj", "v_proj"], ("lm_head",), ["self_attn.q_proj", "self_attn.v_proj"]),
    ("mlp", ("lm_head",), ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"]),       # a parent selects
    (["*.mlp.*_proj"], ["up_proj"], ["mlp.down_proj", "mlp.gate_proj"]),             # exclude wins
    (["layers.1.*"], ("lm_head",), None),                                            # a suffix glob
], ids=("names", "parent", "glob-exclude", "layer"))
def test_include_exclude(include, exclude, expected):
    model = replace_linear(tiny_llama(), include=include, exclude=exclude)
    if expected is None:
        want = sorted(n for n in linear_names(tiny_llama()) if n.startswith("model.layers.1."))
    else:
        want = sorted(f"model.layers.{i}.{e}" for i in range(2) for e in expected)
    assert converted(model) == want


def test_lm_head_converted_when_not_excluded_and_second_call_converts_the_rest():
    model = replace_linear(tiny_llama(), include="self_attn")
    assert len(converted(model)) == 8
    replace_linear(model, exclude=None)  # the attention layers are Linear4bit already: left as they are
    assert converted(model) == linear_names(tiny_llama())
    assert "lm_head" in converted(model)


def test_match_rule_is_dotted_suffix_not_substring():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"include pattern 'proj' matches no module"):
        replace_linear(model, include="proj")  # not a suffix after a dot: no q_proj
    assert converted(model) == []


def test_layer_shared_under_two_names_is_replaced_under_both():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU())
    model.add_module("again", model[0])
    replace_linear(model)
    assert isinstance(model[0], Linear4bit) and model.again is model[0]


def test_plain_module_half_dtypes_and_device_argument():
    model = nn.Sequential(nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 32)).to(torch.bfloat16)
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    ref = model(x)
    replace_linear(model, quant_type="fp4", compute_dtype=torch.float32, device="cpu",
                   quant_storage=torch.bfloat16)
    assert converted(model) == ["0", "2"]
    assert model[0].weight.dtype == torch.bfloat16 and model[0].quant_state.dtype == torch.bfloat16
    assert model[0].bias.dtype == torch.bfloat16 and model[0].compute_dtype == torch.float32
    out = model(x)
    assert out.dtype == torch.bfloat16
    assert torch.nn.functional.cosine_similarity(out.float().flatten(), ref.float().flatten(), dim=0) > 0.98


# ----------------------------------------------------------------------------- streaming

def test_streaming_frees_each_float_weight_before_the_next_layer(monkeypatch):
    """At the k-th quantization exactly the layers not yet replaced (k..n-1) still hold their
    float weights: a conversion that kept the old layers (or their weights) until it
    returned would show all n alive, i.e. the whole float model plus the 4-bit one."""
    model = tiny_llama()
    names = [n for n in linear_names(model) if n != "lm_head"]
    refs = [weakref.ref(model.get_submodule(n).weight) for n in names]
    nbytes = {n: model.get_submodule(n).weight.nbytes for n in names}
    alive_at_call = []
    real_quantize = F.quantize_4bit

    def counting_quantize(*args, **kwargs):
        alive_at_call.append(sorted(n for n, r in zip(names, refs) if r() is not None))
        return real_quantize(*args, **kwargs)

    monkeypatch.setattr(F, "quantize_4bit", counting_quantize)
    replace_linear(model)
    assert len(alive_at_call) == len(names)
    for k, alive in enumerate(alive_at_call):
        # k layers replaced so far: their float weights must be gone, the rest (the one being
        # quantized included) still there.
        assert len(alive) == len(names) - k, f"call {k}: {len(alive)} float weights alive, expected {len(names) - k}"
        if k:
            assert set(alive) < set(alive_at_call[k - 1])
    assert all(r() is None for r in refs)
    assert max(nbytes.values()) < sum(nbytes.values()) / 4  # the check above means something


@pytest.mark.cuda
def test_streaming_peak_cuda_memory_is_one_float_layer_beyond_the_4bit_model():
    model = tiny_llama()
    # A deeper model makes "all float layers at once" far above one layer.
    model.model.layers.extend(tiny_llama().model.layers for _ in range(3))
    layer_bytes = [m.weight.nbytes for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    replace_linear(model, device="cuda")
    torch.cuda.synchronize()
    final = torch.cuda.memory_allocated() - base
    peak = torch.cuda.max_memory_allocated() - base
    # One float layer on the GPU, plus the quantizer's temporaries (absmax and the nested
    # statistics: well under a quarter of the layer) and allocator rounding (512 B blocks).
    bound = final + 1.25 * max(layer_bytes) + 512 * 8
    assert peak <= bound, (peak, final, max(layer_bytes), sum(layer_bytes))
    assert sum(layer_bytes) > 2 * bound - 2 * final


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs, message", [
    (dict(quant_type="int4"), r"quant_type must be 'nf4' or 'fp4', got 'int4'"),
    (dict(blocksize=48), r"blocksize must be one of .*, got 48"),
    (dict(compute_dtype=torch.int8), r"compute_dtype must be .*got torch.int8"),
    (dict(quant_storage="uint8"), r"quant_storage must be .*got 'uint8'"),
    (dict(compress_statistics=1), r"compress_statistics must be True or False, got 1"),
    (dict(include=["q_proj", 3]), r"include must hold non-empty module-name patterns \(str\), got 3"),
    (dict(exclude=[""]), r"exclude must hold non-empty module-name patterns \(str\), got ''"),
    (dict(include=5), r"include must be None, a module-name pattern or a list of them, got 5"),
    (dict(device="meta"), r"device must be a real device to quantize on, got device='meta'"),
    (dict(device="warp-drive"), r"device must be None or a torch device .*got 'warp-drive'"),
    (dict(include="nope"), r"include pattern 'nope' matches no module of the model \(names are dotted paths such as "
                           r"'model.layers.0.self_attn.q_proj'\)"),
    (dict(include="input_layernorm"), r"include pattern 'input_layernorm' matches "
                                      r"'model.layers.0.input_layernorm' \(LlamaRMSNorm\), which is not an nn.Linear"),
])
def test_argument_errors_name_the_argument_and_change_nothing(kwargs, message):
    model = tiny_llama()
    with pytest.raises(ValueError, match=message):
        replace_linear(model, **kwargs)
    assert converted(model) == []


def test_model_errors():
    with pytest.raises(ValueError, match=r"model must be a torch.nn.Module, got dict"):
        replace_linear({})
    with pytest.raises(ValueError, match=r"model is itself a Linear; .*Linear4bit directly"):
        replace_linear(nn.Linear(64, 64))
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(ValueError, match=r"0.weight is on the meta device"):
        replace_linear(meta)
    ints = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    ints[1].weight = nn.Parameter(torch.zeros(64, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"1.weight is torch.float64; only float32"):
        replace_linear(ints)
    assert converted(ints) == []  # checked before the first layer changed


# ----------------------------------------------------------------------------- prepare_model_for_kbit_training

def expected_prepared(model):
    """PEFT's rules, written out: every parameter frozen; float16/bfloat16 ones that are
    not 4-bit weights become float32; 4-bit weights keep their dtype."""
    return {n: (False, p.dtype if isinstance(p, Params4bit) or p.dtype not in (torch.float16, torch.bfloat16)
                else torch.float32)
            for n, p in model.named_parameters()}


def flags(model):
    return {n: (p.requires_grad, p.dtype) for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_prepare_freezes_and_upcasts_like_peft(dtype):
    model = replace_linear(tiny_llama(dtype, bias=True), quant_storage=torch.bfloat16)
    expected = expected_prepared(model)
    assert fourbit.prepare_model_for_kbit_training(model) is model
    got = flags(model)
    assert got == expected
    assert got["model.norm.weight"] == (False, torch.float32)
    assert got["lm_head.weight"] == (False, torch.float32)
    assert got["model.layers.0.self_attn.q_proj.weight"] == (False, torch.bfloat16)  # packed codes, not cast
    assert got["model.layers.0.self_attn.q_proj.bias"] == (False, torch.float32)
    assert checkpointing(model)
    if HAS_PEFT:
        import peft

        theirs = replace_linear(tiny_llama(dtype, bias=True), quant_storage=torch.bfloat16)
        theirs.is_loaded_in_4bit = True  # what transformers' quantizer sets; PEFT checks it
        peft.prepare_model_for_kbit_training(theirs)
        assert flags(theirs) == got
        assert checkpointing(theirs)


def test_prepare_keeps_the_packed_weight_and_the_forward():
    model = replace_linear(tiny_llama(torch.bfloat16))
    q = model.model.layers[0].self_attn.q_proj
    packed = q.weight.data.clone()
    with torch.no_grad():
        ref = model(IDS).logits.float()
    fourbit.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    assert torch.equal(q.weight.data, packed) and isinstance(q.weight, Params4bit)
    assert not checkpointing(model)
    with torch.no_grad():
        out = model(IDS).logits.float()
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.99


@pytest.mark.parametrize("gc_kwargs", (None, {"use_reentrant": True}, {"use_reentrant": False}),
                         ids=("default", "reentrant", "non-reentrant"))
def test_training_steps_after_prepare(gc_kwargs):
    """Biases inside the checkpointed decoder layers are the only trainable parameters: with
    reentrant checkpointing they get gradients only through the input-grad hook."""
    model = replace_linear(tiny_llama(torch.bfloat16, bias=True), compute_dtype=torch.float32)
    fourbit.prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs=gc_kwargs)
    assert checkpointing(model)
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    model.train()
    biases = [m.bias for m in model.modules() if isinstance(m, Linear4bit)]
    for b in biases:
        b.requires_grad_(True)
    assert all(b.dtype == torch.float32 for b in biases)
    opt = torch.optim.AdamW(biases, lr=1e-2)
    labels = IDS.clone()
    losses = []
    for _ in range(6):
        loss = model(IDS, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        assert all(b.grad is not None and torch.isfinite(b.grad).all() for b in biases)
        assert any(b.grad.abs().sum() > 0 for b in biases)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert all(not p.requires_grad for n, p in model.named_parameters() if not n.endswith(".bias"))


def test_input_grad_hook_on_a_model_without_enable_input_require_grads():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(16, 64)
            self.proj = nn.Linear(64, 64)

        def get_input_embeddings(self):
            return self.embed

        def forward(self, ids):
            return self.proj(self.embed(ids))

    model = fourbit.prepare_model_for_kbit_training(replace_linear(Tiny()))
    assert model(torch.arange(4)).requires_grad  # everything frozen, yet the output carries grad
    plain = fourbit.prepare_model_for_kbit_training(replace_linear(nn.Sequential(nn.Linear(64, 64))))
    assert not any(p.requires_grad for p in plain.parameters())  # nothing to hook or checkpoint: skipped


def test_prepare_errors():
    with pytest.raises(ValueError, match=r"model must be a torch.nn.Module, got str"):
        fourbit.prepare_model_for_kbit_training("llama")
    with pytest.raises(ValueError, match=r"gradient_checkpointing_kwargs must be None or a dict, got \['x'\]"):
        fourbit.prepare_model_for_kbit_training(tiny_llama(), gradient_checkpointing_kwargs=["x"])
    with pytest.raises(ValueError, match=r"use_gradient_checkpointing must be True or False, got 'yes'"):
        fourbit.prepare_model_for_kbit_training(tiny_llama(), use_gradient_checkpointing="yes")
