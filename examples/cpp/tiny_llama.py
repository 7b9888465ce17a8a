"""The Python ends of examples/cpp/train_llama_lora.cpp: a tiny transformers Llama, 4-bit.

    python examples/cpp/tiny_llama.py save OUT_DIR
        builds a tiny random LlamaForCausalLM (hidden 64, 2 layers, 4 heads, 2 key/value heads,
        vocab 128, tied embeddings, seed 0), quantizes it to 4 bits with transformers +
        bitsandbytes on the CPU (NF4, double quantization, float32 compute) and saves it with
        save_pretrained: OUT_DIR/config.json + model.safetensors, the checkpoint users make.
    python examples/cpp/tiny_llama.py check OUT_DIR ADAPTER_DIR [--atol 1e-4]
        loads OUT_DIR twice: with fourbit.integrations.transformers (the 4-bit kernels the C++
        trainer calls), and with transformers + bitsandbytes, its 4-bit layers replaced by
        bitsandbytes' dequantized weights (no fourbit code); compares both models' logits on the
        trainer's probe ids with the trainer's base logits, loads the trainer's PEFT adapter into
        each with peft.PeftModel.from_pretrained and compares the tuned logits too. Exits 1 if either largest difference exceeds --atol (float32 on
        both sides: only summation order differs, measured ~1e-6), if the adapter changed nothing,
        or if the trainer's loss did not fall to under half its first value.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

import torch
from safetensors.torch import load_file


def save(out_dir):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      tie_word_embeddings=True, max_position_embeddings=64,
                                      initializer_range=0.2)
    model = transformers.LlamaForCausalLM(config).float()
    bnb_config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_use_double_quant=True,
                                                 bnb_4bit_compute_dtype=torch.float32)
    with tempfile.TemporaryDirectory() as float_dir:
        model.save_pretrained(float_dir)
        quantized = transformers.AutoModelForCausalLM.from_pretrained(
            float_dir, quantization_config=bnb_config, device_map="cpu", dtype=torch.float32)
    shutil.rmtree(out_dir, ignore_errors=True)
    quantized.save_pretrained(out_dir)
    print(f"saved {out_dir}: {sorted(os.listdir(out_dir))}")


def bnb_dequantized_model(out_dir):
    """transformers + bitsandbytes' load of OUT_DIR with every 4-bit layer replaced by a float
    nn.Linear holding bitsandbytes' dequantized weight: a reference that shares no code with
    fourbit (bitsandbytes' CPU 4-bit matmul itself is not float32-exact, ~1e-3)."""
    import bitsandbytes
    import bitsandbytes.functional as BF
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(out_dir, device_map="cpu", dtype=torch.float32)
    for name, module in list(model.named_modules()):
        if isinstance(module, bitsandbytes.nn.Linear4bit):
            w = BF.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
            linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            linear.weight.data.copy_(w)
            model.set_submodule(name, linear)
    return model.eval()


def logits_with_adapter(model, adapter_dir, ids):
    from peft import PeftModel

    with torch.no_grad():
        base = model(ids).logits.float()
    model = PeftModel.from_pretrained(model, adapter_dir).eval()
    with torch.no_grad():
        return base, model(ids).logits.float()


def check(out_dir, adapter_dir, atol):
    import fourbit.integrations.peft  # noqa: F401  (PEFT's LoRA on fourbit layers)
    import fourbit.integrations.transformers as fb_tf

    probe = load_file(os.path.join(adapter_dir, "probe.safetensors"))
    ids = probe["input_ids"]
    base, tuned = logits_with_adapter(fb_tf.from_pretrained(out_dir, dtype=torch.float32).eval(), adapter_dir, ids)
    bnb_base, bnb_tuned = logits_with_adapter(bnb_dequantized_model(out_dir), adapter_dir, ids)
    base_diff = max((base - probe["base_logits"]).abs().max().item(),
                    (bnb_base - probe["base_logits"]).abs().max().item())
    tuned_diff = max((tuned - probe["logits"]).abs().max().item(), (bnb_tuned - probe["logits"]).abs().max().item())
    moved = (tuned - base).abs().max().item()
    losses = probe["losses"].tolist()
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        config = json.load(f)
    print(f"adapter: r={config['r']} lora_alpha={config['lora_alpha']} "
          f"{len(config['target_modules'])} targets ({config['target_modules'][0]}, ...)")
    print(f"C++ training loss: first {losses[0]:.4f}, last {losses[-1]:.4f} ({len(losses)} steps)")
    print(f"base logits vs C++ on {tuple(ids.shape)} ids, the worse of transformers on fourbit's layers and on "
          f"bitsandbytes' dequantized weights: max |diff| = {base_diff:.3g}")
    print(f"tuned logits, the same two + the PEFT adapter vs C++: max |diff| = {tuned_diff:.3g} (atol {atol:g}; "
          f"the adapter moved the logits by up to {moved:.3g})")
    ok = base_diff <= atol and tuned_diff <= atol and losses[-1] < 0.5 * losses[0]
    if moved <= 100 * atol:
        print("the loaded adapter barely changes the logits: training did not reach it")
        ok = False
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("save")
    p.add_argument("out_dir")
    p = sub.add_parser("check")
    p.add_argument("out_dir")
    p.add_argument("adapter_dir")
    p.add_argument("--atol", type=float, default=1e-4)
    args = parser.parse_args()
    if args.cmd == "save":
        save(args.out_dir)
        return 0
    return check(args.out_dir, args.adapter_dir, args.atol)


if __name__ == "__main__":
    sys.exit(main())
