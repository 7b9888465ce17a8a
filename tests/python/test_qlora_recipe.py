"""The standard QLoRA recipe, written for transformers + PEFT + TRL + bitsandbytes, run on
fourbit with the two changed lines docs/transformers.md lists (``from fourbit import
FourbitConfig as BitsAndBytesConfig, optimizer_cls_and_kwargs``, and the Trainer's
``optimizer_cls_and_kwargs``), on a tiny Llama built from a config (CPU):

transformers' ``from_pretrained`` (device_map, attn_implementation, low_cpu_mem_usage), PEFT's
``prepare_model_for_kbit_training`` + LoRA on all seven projections, TRL's ``SFTTrainer`` with
``optim="paged_adamw_8bit"``, the adapter saved and reloaded onto a fresh 4-bit base,
``generate``, and ``merge_and_unload``.

``test_recipe_without_bitsandbytes`` runs it in a subprocess where bitsandbytes cannot be
imported (``sys.modules["bitsandbytes"] = None``: transformers' and PEFT's availability checks
and any import then fail, as if it were not installed); ``test_recipe_with_bitsandbytes``
runs it here, with bitsandbytes importable, and checks the optimizer is still fourbit's.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("trl")
pytest.importorskip("datasets")

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
from _helpers import char_tokenizer  # noqa: E402

SENTENCES = ["the cat sat on the mat.", "a dog ran in the park.", "we like green tea, not coffee.",
             "birds sing at dawn."]


def save_base(path, tokenizer):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                                      tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=1,
                                      max_position_embeddings=64)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def run_recipe(workdir, steps=30):
    """The recipe; returns what the tests check. The two lines that differ from the
    bitsandbytes recipe are marked ``# fourbit``."""
    import datasets
    import trl
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fourbit import FourbitConfig as BitsAndBytesConfig, optimizer_cls_and_kwargs  # fourbit

    base = os.path.join(workdir, "base")
    save_base(base, char_tokenizer())
    tokenizer = AutoTokenizer.from_pretrained(base)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",  # as written for bitsandbytes
                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)

    def load_base():
        return AutoModelForCausalLM.from_pretrained(base, quantization_config=quant, device_map="cpu",
                                                    attn_implementation="eager", low_cpu_mem_usage=True)

    model = load_base()
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=LLAMA_TARGETS,
                                             task_type="CAUSAL_LM"))
    args = trl.SFTConfig(output_dir=os.path.join(workdir, "out"), max_steps=steps, per_device_train_batch_size=8,
                         learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                         report_to=[], optim="paged_adamw_8bit", weight_decay=0.01, max_length=32, use_cpu=True,
                         seed=0, dataloader_num_workers=0, disable_tqdm=True)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict({"text": SENTENCES * 16}),
                             processing_class=tokenizer,
                             optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(args))  # fourbit
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    eight_bit = [st["state1"].dtype == torch.uint8 for st in optimizer.state.values()]
    lora_names = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "lora_A")})
    model.save_pretrained(os.path.join(workdir, "adapter"))

    ids = tokenizer("the cat", return_tensors="pt").input_ids
    model.eval()
    # Compared through the model with its LoRA layers in place: after SFTTrainer.train the
    # PEFT wrapper's own forward differs from its inner model's by ~2e-3 on these logits
    # (measured; not from fourbit's layers, whose outputs match exactly).
    with torch.no_grad():
        trained = model.get_base_model()(ids).logits
    reloaded = PeftModel.from_pretrained(load_base(), os.path.join(workdir, "adapter")).eval()
    with torch.no_grad():
        again = reloaded.get_base_model()(ids).logits
        generated = reloaded.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    merged = reloaded.merge_and_unload()
    with torch.no_grad():
        merged_logits = merged(ids).logits
    return {
        "losses": losses,
        "optimizer": f"{type(optimizer).__module__}.{type(optimizer).__name__}",
        "paged": bool(optimizer.is_paged), "optim_bits": optimizer.optim_bits,
        "eight_bit_states": sum(eight_bit), "states": len(eight_bit),
        "group_decay": sorted(g["weight_decay"] for g in optimizer.param_groups),
        "lora_layers": lora_names,
        "reload_max_diff": float((trained - again).abs().max()),
        "generated": generated[0].tolist(), "prompt_len": ids.shape[1],
        "merged_cos": float(torch.nn.functional.cosine_similarity(merged_logits.flatten(), again.flatten(), dim=0)),
        "merged_has_lora": any(hasattr(m, "lora_A") for m in merged.modules()),
        "bnb_imported": "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is not None,
    }


def check(result, steps):
    losses = result["losses"]
    assert len(losses) == steps
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.85 * first, (first, last)  # from ~ln(32) towards the corpus entropy
    assert result["optimizer"] == "fourbit.optim.adamw.AdamW"
    assert result["paged"] and result["optim_bits"] == 8
    # LoRA A/B of the 14 layers; those with >= 4096 elements (none at r=8 here) would be 8-bit,
    # the rest keep 32-bit states as in bitsandbytes.
    assert result["states"] == 28
    assert result["group_decay"] == [0.0, 0.01] or result["group_decay"] == [0.01]
    assert result["lora_layers"] == ["LoraLinear4bitPeft"]
    assert result["reload_max_diff"] < 1e-5
    assert len(result["generated"]) == result["prompt_len"] + 6
    # Merging rounds the weights to 4 bits again (measured cos 0.9999+ here).
    assert result["merged_cos"] > 0.99 and not result["merged_has_lora"]


def test_recipe_without_bitsandbytes(tmp_path):
    here = os.path.dirname(os.path.abspath(__file__))
    code = ("import sys, json; sys.modules['bitsandbytes'] = None; sys.path.insert(0, sys.argv[1]); "
            "import test_qlora_recipe as r; json.dump(r.run_recipe(sys.argv[2], int(sys.argv[3])), "
            "open(sys.argv[4], 'w'))")
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "-c", code, here, str(tmp_path), "30", str(out)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.load(open(out))
    assert not result["bnb_imported"]
    check(result, 30)


def test_recipe_with_bitsandbytes(tmp_path):
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed: test_recipe_without_bitsandbytes covers this case")
    result = run_recipe(str(tmp_path), steps=30)
    check(result, 30)
