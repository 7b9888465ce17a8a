"""fourbit as a registered transformers quantizer (fourbit.integrations.hf_quantizer) and the
Trainer's optimizer helper (fourbit.integrations.trainer), on tiny random models (CPU).

transformers' own from_pretrained with FourbitConfig and its loading arguments gives the bytes
of fourbit's front door; BitsAndBytesConfig's options are taken as they are; the model counts
its real parameters and memory; dequantize() works; checkpoints saved by transformers load in
transformers + bitsandbytes, and bitsandbytes' load through the quantizer byte for byte; the
Trainer gets fourbit's optimizer from TrainingArguments and resumes it from a checkpoint.
"""

import json
import os
import shutil

import pytest
import torch
from torch import nn

import fourbit
from fourbit.nn import Linear4bit

transformers = pytest.importorskip("transformers")
fbt = pytest.importorskip("fourbit.integrations.transformers")
from fourbit.integrations.hf_quantizer import FourbitConfig, FourbitHfQuantizer  # noqa: E402
from fourbit.integrations.trainer import optimizer_cls_and_kwargs  # noqa: E402

from _helpers import import_bnb  # noqa: E402
from test_transformers import cos, logits  # noqa: E402  (the same tiny-Llama probes)

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "bnb_llama_nf4")
QLORA = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("float_llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      tie_word_embeddings=False, max_position_embeddings=64)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(path)
    return str(path)


def load(path, **kwargs):
    return transformers.AutoModelForCausalLM.from_pretrained(path, device_map="cpu", **kwargs)


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


# ----------------------------------------------------------------------------- loading

def test_transformers_loader_builds_fourbit_layers_like_the_front_door(float_dir):
    model = load(float_dir, quantization_config=FourbitConfig(**QLORA), attn_implementation="eager",
                 low_cpu_mem_usage=True)
    assert model.hf_quantizer.__class__ is FourbitHfQuantizer and model.is_loaded_in_4bit and model.is_quantized
    assert model.config._attn_implementation == "eager"
    q = model.model.layers[0].self_attn.q_proj
    assert type(q) is Linear4bit and q.weight.quant_type == "nf4" and q.quant_state.nested
    assert type(model.lm_head) is nn.Linear
    same_state(model, fbt.from_pretrained(float_dir, **QLORA))
    ref = transformers.AutoModelForCausalLM.from_pretrained(float_dir).eval()
    assert cos(logits(model), logits(ref)) > 0.98  # NF4 on N(0, 0.02) weights: measured 0.993


def test_bitsandbytes_config_is_accepted_as_it_is(float_dir):
    bnb_cfg = transformers.BitsAndBytesConfig(bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=["up_proj", "lm_head"],
                                              **QLORA)
    cfg = FourbitConfig.from_bnb(bnb_cfg)
    assert cfg.to_dict() == bnb_cfg.to_dict()  # what config.json gets is bitsandbytes' own entry
    assert FourbitConfig(**bnb_cfg.to_dict()).to_dict() == bnb_cfg.to_dict()
    model = load(float_dir, quantization_config=cfg)
    assert type(model.model.layers[0].mlp.up_proj) is nn.Linear
    assert model.model.layers[0].self_attn.v_proj.compute_dtype == torch.bfloat16
    # The front door takes the BitsAndBytesConfig itself, and routes loading arguments to transformers.
    front = fbt.from_pretrained(float_dir, quantization_config=bnb_cfg, device_map="cpu")
    assert front.hf_quantizer.__class__ is FourbitHfQuantizer
    same_state(model, front)


def test_real_size_and_footprint_without_bitsandbytes(float_dir):
    ref = transformers.AutoModelForCausalLM.from_pretrained(float_dir)
    for model in (load(float_dir, quantization_config=FourbitConfig(**QLORA)), fbt.from_pretrained(float_dir, **QLORA)):
        assert model.num_parameters() == ref.num_parameters()
        assert model.num_parameters(exclude_embeddings=True) == ref.num_parameters(exclude_embeddings=True)
        assert model.num_parameters(only_trainable=True) == sum(p.numel() for p in model.parameters()
                                                                if p.requires_grad)
        linear = sum(m.weight.numel() for m in ref.modules() if type(m) is nn.Linear and m is not ref.lm_head)
        # Each 4-bit weight: half a byte per element, one uint8 absmax per 64, the nested
        # statistics and the two codebooks (measured, not estimated: computed from the tensors).
        stats = sum(sum(t.numel() * t.element_size() for t in (m.quant_state.absmax, m.quant_state.code,
                                                                m.quant_state.offset, m.quant_state.state2.absmax,
                                                                m.quant_state.state2.code))
                    for m in model.modules() if isinstance(m, Linear4bit))
        assert model.get_memory_footprint() == ref.get_memory_footprint() - linear * 4 + linear // 2 + stats


def test_dequantize_gives_float_linears(float_dir):
    for model in (load(float_dir, quantization_config=FourbitConfig(**QLORA)), fbt.from_pretrained(float_dir, **QLORA)):
        before = logits(model)
        q = model.model.layers[1].mlp.down_proj
        expected = fourbit.functional.dequantize_4bit(q.weight.data, q.quant_state)
        model = model.dequantize()
        assert not any(isinstance(m, Linear4bit) for m in model.modules())
        assert not getattr(model, "is_loaded_in_4bit", False) and not hasattr(model, "hf_quantizer")
        assert torch.equal(model.model.layers[1].mlp.down_proj.weight, expected)
        torch.testing.assert_close(logits(model), before, atol=1e-4, rtol=0)


def test_saved_checkpoint_loads_in_transformers_bitsandbytes(tmp_path, float_dir):
    import_bnb()
    import bitsandbytes as bnb

    model = load(float_dir, quantization_config=FourbitConfig(**QLORA))
    model.save_pretrained(tmp_path)
    written = json.load(open(tmp_path / "config.json"))["quantization_config"]
    assert written["quant_method"] == "bitsandbytes" and written["bnb_4bit_quant_type"] == "nf4"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu")
    assert isinstance(theirs.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    torch.testing.assert_close(logits(theirs), logits(model), atol=1e-2, rtol=0)  # bnb's CPU rounding
    # and back into fourbit, through the quantizer (transformers' loader) and the front door
    for back in (fbt.from_pretrained(tmp_path, device_map="cpu"), fbt.from_pretrained(tmp_path)):
        same_state(back, model)


def test_bitsandbytes_checkpoint_through_the_quantizer_is_byte_equal(tmp_path):
    from safetensors.torch import load_file

    model = fbt.from_pretrained(FIXTURE, device_map="cpu", attn_implementation="sdpa")
    assert model.hf_quantizer.pre_quantized and model.model.layers[0].self_attn.q_proj.compute_dtype == torch.bfloat16
    state = model.state_dict()
    raw = load_file(os.path.join(FIXTURE, "model.safetensors"))
    for key, value in raw.items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key
    same_state(model, fbt.from_pretrained(FIXTURE))
    # transformers' own save_pretrained writes the same bytes again (and bitsandbytes' config)
    model.save_pretrained(tmp_path)
    again = load_file(tmp_path / "model.safetensors")
    assert sorted(again) == sorted(raw) and all(torch.equal(again[k], raw[k]) for k in raw)
    assert json.load(open(tmp_path / "config.json"))["quantization_config"]["quant_method"] == "bitsandbytes"


def test_a_missing_4bit_weight_is_initialized_and_quantized_like_transformers_does(tmp_path, float_dir, caplog):
    """transformers initializes a weight the checkpoint lacks (and reports it MISSING); the
    quantizer then quantizes it like the others, so the model is whole and 4-bit."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(float_dir, tmp_path / "ckpt")
    tensors = load_file(tmp_path / "ckpt" / "model.safetensors")
    del tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "ckpt" / "model.safetensors", metadata={"format": "pt"})
    model = load(tmp_path / "ckpt", quantization_config=FourbitConfig(**QLORA))
    up = model.model.layers[0].mlp.up_proj
    assert type(up.weight) is fourbit.nn.Params4bit and up.weight.bnb_quantized and up.quant_state.nested
    assert up.weight.quant_type == "nf4" and logits(model).isfinite().all()


def test_layers_without_weights_after_loading_are_named(float_dir):
    model = load(float_dir, quantization_config=FourbitConfig(**QLORA))
    model.model.layers[1].self_attn.o_proj = Linear4bit(64, 64, bias=False, quant_type="nf4", device="meta")
    with pytest.raises(ValueError, match=r"the checkpoint did not provide the weights of 1 4-bit layer\(s\), e.g. "
                                         r"\['model.layers.1.self_attn.o_proj'\]"):
        model.hf_quantizer._process_model_after_weight_loading(model)
    model.model.layers[1].self_attn.o_proj = Linear4bit(64, 64, bias=False, quant_type="nf4")
    with pytest.raises(ValueError, match=r"model.layers.1.self_attn.o_proj is a Linear4bit whose weight was never "
                                         r"quantized; nothing to dequantize"):
        model.dequantize()
    # In an already-4-bit checkpoint a float weight is never quantized in its place.
    pre = fbt.from_pretrained(FIXTURE, device_map="cpu")
    pre.model.layers[0].mlp.up_proj = Linear4bit(64, 128, bias=False, quant_type="nf4")
    with pytest.raises(ValueError, match=r"did not provide the weights of 1 4-bit layer\(s\), e.g. "
                                         r"\['model.layers.0.mlp.up_proj'\]"):
        pre.hf_quantizer._process_model_after_weight_loading(pre)


def test_bad_config_values_name_the_option():
    with pytest.raises(ValueError, match=r"bnb_4bit_quant_type must be 'fp4' or 'nf4', got 'int3'"):
        FourbitConfig(bnb_4bit_quant_type="int3")
    with pytest.raises(ValueError, match=r"load_in_8bit=True is not supported"):
        FourbitConfig(load_in_8bit=True)
    with pytest.raises(ValueError, match=r"unknown quantization option\(s\) \['bnb_4bit_blocksize'\]"):
        FourbitConfig(bnb_4bit_blocksize=128)
    with pytest.raises(ValueError, match=r"quant_method must be 'fourbit' or 'bitsandbytes', got quant_method='gptq'"):
        FourbitConfig(quant_method="gptq")
    with pytest.raises(ValueError, match=r"quantization_config must be a FourbitConfig, a transformers."
                                         r"BitsAndBytesConfig or a dict of its options, got int"):
        FourbitConfig.from_bnb(3)


def test_front_door_loading_argument_conflicts_are_named(float_dir):
    with pytest.raises(ValueError, match=r"pass device or device_map, not both \(got device='cpu' and "
                                         r"device_map='cpu'\)"):
        fbt.from_pretrained(float_dir, device="cpu", device_map="cpu", **QLORA)
    with pytest.raises(ValueError, match=r"device_map places modules on \['disk'\]"):
        fbt.from_pretrained(float_dir, device_map={"": "disk"}, **QLORA)


# ----------------------------------------------------------------------------- issue 17: the front door's files

def sharded(tmp_path, float_dir):
    ckpt = tmp_path / "ckpt"
    transformers.AutoModelForCausalLM.from_pretrained(float_dir).save_pretrained(ckpt, max_shard_size="40KB")
    return ckpt, json.load(open(ckpt / "model.safetensors.index.json"))


@pytest.mark.parametrize("where", ["parent", "absolute", "symlink"])
def test_index_shards_must_be_inside_the_directory(tmp_path, float_dir, where):
    ckpt, index = sharded(tmp_path, float_dir)
    key, shard = sorted(index["weight_map"].items())[0]
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(ckpt / shard, tmp_path / "elsewhere" / shard)
    if where == "parent":
        name = f"../elsewhere/{shard}"
    elif where == "absolute":
        name = str(tmp_path / "elsewhere" / shard)
    else:
        os.symlink(tmp_path / "elsewhere" / shard, ckpt / "link.safetensors")
        name = "link.safetensors"
    for k, v in index["weight_map"].items():
        if v == shard:
            index["weight_map"][k] = name
    json.dump(index, open(ckpt / "model.safetensors.index.json", "w"))
    with pytest.raises(ValueError, match=rf"weight_map entry '{key}' names shard '{name}', which is outside the "
                                         r"checkpoint directory"):
        fbt.from_pretrained(ckpt, **QLORA)


def test_errors_while_filling_a_layer_name_it(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "q"
    shutil.copytree(FIXTURE, path)
    tensors = load_file(path / "model.safetensors")
    key = "model.layers.1.self_attn.k_proj.weight.quant_state.bitsandbytes__nf4"
    stats = json.loads(bytes(tensors[key].tolist()))
    stats["blocksize"] = 100
    tensors[key] = torch.tensor(list(json.dumps(stats).encode()), dtype=torch.uint8)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    # Linear4bit's loader reports it as torch's RuntimeError("Error(s) in loading state_dict"):
    # the front door makes it the ValueError its docstring promises, naming the layer.
    with pytest.raises(ValueError, match=r"while loading layer 'model.layers.1.self_attn.k_proj': RuntimeError: "
                                         r"Error\(s\) in loading state_dict for Linear4bit:\n\tweight.\*: "
                                         r"quant_state key 'blocksize' must be one of .* got 100"):
        fbt.from_pretrained(path)

    def fail(self, device=None):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(fourbit.nn.Params4bit, "quantize", fail)
    float_path = tmp_path / "f"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128)).save_pretrained(float_path)
    with pytest.raises(ValueError, match=r"while loading layer 'model.layers.0.self_attn.q_proj': RuntimeError: "
                                         r"out of memory \(simulated\)"):
        fbt.from_pretrained(float_path, **QLORA)


# ----------------------------------------------------------------------------- Trainer optimizers

def training_args(tmp_path, **kwargs):
    return transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, **kwargs)


@pytest.mark.parametrize("optim,bits,paged", [("paged_adamw_8bit", 8, True), ("adamw_8bit", 8, False),
                                              ("adamw_bnb_8bit", 8, False), ("paged_adamw_32bit", 32, True),
                                              ("adamw_torch", 32, False)])
def test_optimizer_kwargs_follow_training_arguments(tmp_path, optim, bits, paged):
    args = training_args(tmp_path, optim=optim, learning_rate=3e-4, weight_decay=0.05, adam_beta1=0.8,
                         adam_beta2=0.95, adam_epsilon=1e-6, optim_args="min_8bit_size=16")
    cls, kwargs = optimizer_cls_and_kwargs(args)
    assert cls is fourbit.optim.AdamW
    assert kwargs == dict(lr=3e-4, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05, optim_bits=bits, is_paged=paged,
                          min_8bit_size=16)
    opt = cls([nn.Parameter(torch.zeros(32))], **kwargs)
    assert opt.optim_bits == bits and opt.is_paged == paged and opt.min_8bit_size == 16
    _, overridden = optimizer_cls_and_kwargs(training_args(tmp_path, optim=optim, optim_args="beta1=0.5,eps=1e-5"))
    assert overridden["betas"][0] == 0.5 and overridden["eps"] == 1e-5


def test_optimizer_helper_keeps_embeddings_32bit_like_the_trainer_does_for_bitsandbytes(tmp_path):
    manager = fourbit.optim.GlobalOptimManager.get_instance()
    manager.initialize()
    try:
        model = nn.Sequential(nn.Embedding(128, 64), nn.Linear(64, 128))
        cls, kwargs = optimizer_cls_and_kwargs(training_args(tmp_path, optim="adamw_8bit"), model)
        opt = cls(model.parameters(), **kwargs)
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
        assert opt.state[model[0].weight]["state1"].dtype == torch.float32
        assert opt.state[model[1].weight]["state1"].dtype == torch.uint8
    finally:
        manager.initialize()


def test_optimizer_helper_errors_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match=r"optim='adafactor' has no fourbit optimizer"):
        optimizer_cls_and_kwargs(training_args(tmp_path, optim="adafactor"))
    with pytest.raises(ValueError, match=r"optim_args entry 'momentum=0.9' is not one of"):
        optimizer_cls_and_kwargs(training_args(tmp_path, optim="adamw_8bit", optim_args="momentum=0.9"))
    with pytest.raises(ValueError, match=r"optim_args entry 'min_8bit_size=lots': 'lots' is not a valid int"):
        optimizer_cls_and_kwargs(training_args(tmp_path, optim="adamw_8bit", optim_args="min_8bit_size=lots"))


class _Regression(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, 80)
        self.norm = nn.LayerNorm(80)

    def forward(self, x, labels=None):
        y = self.norm(self.proj(x)).sum(-1)
        return {"loss": ((y - labels) ** 2).mean(), "logits": y}


def test_trainer_uses_and_resumes_fourbit_states(tmp_path):
    """8-bit states (the 5120-element weight is above min_8bit_size), decay on the weight only,
    and a resumed run that continues exactly where the uninterrupted one is."""
    import datasets

    g = torch.Generator().manual_seed(0)
    data = datasets.Dataset.from_dict({"x": torch.randn(64, 64, generator=g).tolist(),
                                       "labels": torch.randn(64, generator=g).tolist()})

    def trainer(out, steps):
        torch.manual_seed(0)
        args = training_args(out, optim="paged_adamw_8bit", max_steps=steps, per_device_train_batch_size=8,
                             learning_rate=1e-2, weight_decay=0.1, save_steps=3, save_strategy="steps",
                             lr_scheduler_type="constant", seed=0, data_seed=0, dataloader_num_workers=0,
                             disable_tqdm=True, logging_steps=1)
        return transformers.Trainer(model=_Regression(), args=args, train_dataset=data,
                                    optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(args))

    full = trainer(tmp_path / "full", 6)
    full.train()
    opt = full.optimizer.optimizer
    assert type(opt) is fourbit.optim.AdamW and opt.is_paged
    states = {p.shape: st for p, st in opt.state.items()}
    assert states[torch.Size([80, 64])]["state1"].dtype == torch.uint8
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.1]
    saved = torch.load(tmp_path / "full" / "checkpoint-3" / "optimizer.pt", weights_only=False)
    assert any("__bnb_optimizer_quant_state__" in st for st in saved["state"].values())

    resumed = trainer(tmp_path / "full", 6)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, msg=name)
    rstates = {p.shape: st for p, st in resumed.optimizer.optimizer.state.items()}
    for shape, st in states.items():
        assert rstates[shape]["step"] == st["step"] == 6
        assert torch.equal(rstates[shape]["state1"], st["state1"])
