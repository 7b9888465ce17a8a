"""The Python twin of examples/cpp/train_lora.cpp's model, and the two Python ends of its run.

    python examples/cpp/tiny_mlp.py save OUT_DIR
        writes OUT_DIR/model.safetensors: a tiny MLP (fc1: 32 -> 64, ReLU, fc2: 64 -> 4) with
        fourbit Linear4bit layers (NF4, double quantization), its state_dict in bitsandbytes'
        format (the tensors transformers saves for a 4-bit model).
    python examples/cpp/tiny_mlp.py check OUT_DIR ADAPTER_DIR
        loads that checkpoint into the same model, loads the C++ trainer's PEFT adapter with
        peft.PeftModel.from_pretrained, runs the probe inputs the trainer saved
        (ADAPTER_DIR/probe.safetensors) and compares with the trainer's logits; exits 1 if the
        largest difference exceeds --atol, or if the trainer's loss did not fall.
"""

import argparse
import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file

import fourbit
import fourbit.integrations.peft  # noqa: F401  (PEFT's LoRA on fourbit layers)

IN_FEATURES, HIDDEN, CLASSES = 32, 64, 4


class TinyMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = fourbit.nn.Linear4bit(IN_FEATURES, HIDDEN, quant_type="nf4", compress_statistics=True)
        self.fc2 = fourbit.nn.Linear4bit(HIDDEN, CLASSES, quant_type="nf4", compress_statistics=True)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def save(out_dir):
    torch.manual_seed(0)
    model = TinyMLP()
    for layer in (model.fc1, model.fc2):
        layer.quantize()
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "model.safetensors")
    save_file(model.state_dict(), path, metadata={"format": "pt"})
    print(f"saved {path}")


def check(out_dir, adapter_dir, atol):
    from peft import PeftModel

    model = TinyMLP()
    model.load_state_dict(load_file(os.path.join(out_dir, "model.safetensors")))
    model = PeftModel.from_pretrained(model, adapter_dir).eval()
    probe = load_file(os.path.join(adapter_dir, "probe.safetensors"))
    with torch.no_grad():
        logits = model(probe["x"])
    diff = (logits - probe["logits"]).abs().max().item()
    losses = probe["losses"].tolist()
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        config = json.load(f)
    print(f"adapter: r={config['r']} lora_alpha={config['lora_alpha']} targets={config['target_modules']}")
    print(f"C++ training loss: first {losses[0]:.4f}, last {losses[-1]:.4f}")
    print(f"PEFT logits vs the C++ trainer's on {tuple(probe['x'].shape)} probe inputs: max |diff| = {diff:.3g} "
          f"(atol {atol:g})")
    ok = diff <= atol and losses[-1] < losses[0]
    if not any(n.endswith("lora_B.default.weight") and p.abs().sum() > 0 for n, p in model.named_parameters()):
        print("the loaded adapter is all zeros (lora_B): training did not reach it")
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
    p.add_argument("--atol", type=float, default=1e-5)
    args = parser.parse_args()
    if args.cmd == "save":
        save(args.out_dir)
        return 0
    return check(args.out_dir, args.adapter_dir, args.atol)


if __name__ == "__main__":
    sys.exit(main())
