"""The standard recipes, run with fourbit in place of bitsandbytes (CPU, tiny random models).

- QLoRA with TRL's SFTTrainer: a tiny random Llama quantized to NF4 (double quantization) by
  ``fourbit.replace_linear``, ``fourbit.prepare_model_for_kbit_training`` (gradient
  checkpointing), LoRA on q, k, v, o, gate, up, down through PEFT (fourbit's fused layer),
  ``SFTTrainer`` with fourbit's ``PagedAdamW``, a few dozen steps on a synthetic text set.
- CLIP: a tiny random CLIPModel with its vision and text towers' linears in 4 bits, LoRA on
  q_proj, k_proj, v_proj, out_proj, the contrastive loss on synthetic images and captions.

Each asserts that the loss goes down and that only the LoRA parameters changed.
"""

import copy

import pytest
import torch

import fourbit
from fourbit.nn import Linear4bit

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

import fourbit.integrations.peft  # noqa: E402,F401  (PEFT dispatch to fourbit's LoRA layer)
from fourbit.integrations.peft import LoraLinear4bitPeft  # noqa: E402

from _helpers import char_tokenizer  # noqa: E402

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_only_lora_changed(before, model):
    after = model.state_dict()
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    lora = {k for k in before if ".lora_A." in k or ".lora_B." in k}
    # Every B moves (it starts at zero and gets gradients); nothing outside the adapters moves.
    assert changed <= lora, sorted(changed - lora)[:5]
    assert {k for k in lora if ".lora_B." in k} <= changed


def test_qlora_sfttrainer_recipe(tmp_path, monkeypatch):
    fused_calls = []
    original = fourbit.functional._lora_4bit
    monkeypatch.setattr(fourbit.functional, "_lora_4bit",
                        lambda *a, **k: fused_calls.append(1) or original(*a, **k))
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                                      tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    model = transformers.LlamaForCausalLM(config)
    fourbit.replace_linear(model, quant_type="nf4", compress_statistics=True, compute_dtype=torch.float32)
    model = fourbit.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                    gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=LLAMA_TARGETS,
                                             task_type="CAUSAL_LM"))
    layers = [m for m in model.modules() if isinstance(m, LoraLinear4bitPeft)]
    assert len(layers) == 2 * len(LLAMA_TARGETS)
    assert all(type(m.get_base_layer()) is Linear4bit for m in layers)

    # A learnable synthetic corpus: a few fixed sentences, repeated.
    sentences = ["the cat sat on the mat.", "a dog ran in the park.", "we like green tea, not coffee.",
                 "birds sing at dawn."]
    dataset = datasets.Dataset.from_dict({"text": sentences * 16})
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=40, per_device_train_batch_size=8,
                         learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                         report_to=[], **checkpointing_args({"use_reentrant": False}), max_length=32,
                         use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = fourbit.optim.PagedAdamW(trainable, lr=1e-2)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                             optimizers=(optimizer, None))
    before = snapshot(model)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.85 * first, (first, last)  # from ~ln(32) towards the corpus entropy
    assert_only_lora_changed(before, model)
    # 14 layers x 40 steps x (forward + checkpointed recompute), all through the fused op.
    assert len(fused_calls) >= 2 * 14 * 40
    assert checkpointing_on(model.get_base_model())


def checkpointing_args(kwargs):
    """TrainingArguments' checkpointing switch: transformers 5 renamed gradient_checkpointing
    (deprecated, warns) to activation_checkpointing."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    prefix = "activation" if "activation_checkpointing" in names else "gradient"
    return {f"{prefix}_checkpointing": True, f"{prefix}_checkpointing_kwargs": kwargs}


def checkpointing_on(model):
    # transformers 5 renamed is_gradient_checkpointing (deprecated) to is_activation_checkpointing.
    if hasattr(type(model), "is_activation_checkpointing"):
        return model.is_activation_checkpointing
    return model.is_gradient_checkpointing


def test_clip_recipe():
    torch.manual_seed(0)
    text = transformers.CLIPTextConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=16)
    vision = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=32, patch_size=8)
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                                           projection_dim=64))
    # Both towers' linears in 4 bits; the projections to the joint space stay in full precision.
    fourbit.replace_linear(model, include=("text_model", "vision_model"), quant_type="nf4",
                           compute_dtype=torch.float32)
    assert isinstance(model.vision_model.encoder.layers[0].self_attn.q_proj, Linear4bit)
    assert isinstance(model.text_model.encoder.layers[1].mlp.fc1, Linear4bit)
    fourbit.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                 "out_proj"]))
    assert len([m for m in model.modules() if isinstance(m, LoraLinear4bitPeft)]) == 2 * 2 * 4

    # Synthetic pairs: 8 "classes", each an image pattern and a caption of its own tokens.
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(8, 3, 32, 32, generator=g)
    input_ids = torch.randint(1, 64, (8, 6), generator=g)
    optimizer = fourbit.optim.PagedAdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    before = snapshot(model)
    model.train()
    losses = []
    for _ in range(25):
        noisy = pixels + 0.1 * torch.randn(pixels.shape, generator=g)
        out = model(input_ids=input_ids, pixel_values=noisy, return_loss=True)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(out.loss.detach()))
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    assert_only_lora_changed(before, model)
