"""Measures the memory of one QLoRA training step of a tiny Llama on the CPU, as
``torch.cuda.max_memory_allocated`` would count it on a GPU: the bytes of every live tensor
of the model and optimizer (counted exactly), plus the step's peak resident memory above the
steady state between steps (the kernel's high-water mark, reset before the step). Run in a
subprocess with MALLOC_MMAP_THRESHOLD_ set, so freed large buffers go back to the kernel at
once. Prints one JSON line. Usage: python _cpu_step_memory.py MODEL_DIR BATCH SEQ"""

import json
import os
import sys

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import fourbit  # noqa: E402
from fourbit.cli._common import _status_kib  # noqa: E402
from fourbit.integrations import transformers as fbt  # noqa: E402

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main(path, batch, seq):
    torch.set_num_threads(1)
    model = fbt.from_pretrained(path, load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16, dtype=torch.bfloat16)
    model.requires_grad_(False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    fourbit.nn.add_lora(model, target_modules=PROJ, r=16, lora_alpha=32)
    model.train()
    opt = fourbit.optim.AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))

    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    live = sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())
    steady = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    step()
    peak = (_status_kib("VmHWM") - steady) * 1024
    print(json.dumps({"live_tensor_bytes": live, "step_peak_bytes": peak, "measured_bytes": live + peak}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
