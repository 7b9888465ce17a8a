"""QLoRA with FSDP2 under torchrun: a 4-bit Llama-shaped model sharded over every rank.

A randomly initialised Llama (transformers' LlamaForCausalLM built from a config, so no
download; pass --model to load a real checkpoint instead) is quantized to NF4 with
``fourbit.replace_linear``, given PEFT LoRA adapters, prepared with
``fourbit.integrations.distributed.prepare_fsdp`` and sharded with FSDP2's ``fully_shard``
(one unit per decoder layer, then the root). It trains on random tokens with fourbit's
PagedAdamW8bit, saves model + optimizer with ``torch.distributed.checkpoint`` and loads them
back, then saves the PEFT adapter as PEFT's ``save_pretrained`` writes it (under
--out/adapter, with ``fourbit.integrations.rank0_save.save_adapter``: each LoRA tensor
gathered on its own, rank 0 writes). With --export-4bit it also writes the 4-bit base model as
a transformers + bitsandbytes checkpoint (under --out/nf4, with ``save_quantized``: one
layer gathered at a time, shards of --max-shard-size). Rank 0 prints the loss per step and
each rank's bytes of 4-bit weights before and after sharding.

With --low-memory, no rank holds the model: every rank builds it on the meta device (its
linears as empty 4-bit layers), prepares and shards it, and
``fourbit.integrations.rank0_load.load_from_rank0`` fills each rank's shards from a
safetensors checkpoint that rank 0 reads and quantizes one tensor at a time (--model must
then be a local checkpoint directory; without it, rank 0 first saves the random model's
float weights under --out and loads them back this way). LoRA weights, not in a base
checkpoint, are initialised on each rank's shards.

Run (CPU, gloo):  torchrun --nproc-per-node 2 examples/fsdp_qlora.py [--low-memory]
     (GPUs, nccl): torchrun --nproc-per-node 8 examples/fsdp_qlora.py --model meta-llama/Llama-3.1-8B
Options: --steps 5 --seq 64 --batch 2 --hidden 256 --layers 4 --out out/fsdp_qlora --low-memory
         --export-4bit --max-shard-size 5GB
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import fourbit
import fourbit.integrations.peft  # noqa: F401  (PEFT's LoRA on fourbit layers)
from fourbit.integrations.distributed import flat_layout, prepare_fsdp
from fourbit.integrations.rank0_load import load_from_rank0
from fourbit.integrations.rank0_save import save_adapter, save_quantized
from fourbit.nn import Linear4bit


def build(args, device):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaForCausalLM
    torch.manual_seed(0)  # every rank builds the same model
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.bfloat16)
    else:
        model = LlamaForCausalLM(random_config(args))
    model = fourbit.replace_linear(model.to(device), quant_type="nf4", compute_dtype=torch.bfloat16,
                                   quant_storage=torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    return model


def random_config(args):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=512, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                       num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2)


def build_on_meta(config):
    """The model without memory: parameters on meta (buffers such as the rotary frequencies
    stay real), each linear but the head an empty NF4 Linear4bit, PEFT LoRA on top."""
    from accelerate import init_empty_weights
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    for name, m in list(model.named_modules()):
        if type(m) is torch.nn.Linear and not name.endswith("lm_head"):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child,
                    Linear4bit(m.in_features, m.out_features, bias=m.bias is not None, compute_dtype=torch.bfloat16,
                               quant_type="nf4", quant_storage=torch.bfloat16, device="meta"))
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))


@torch.no_grad()
def init_lora_shards(model, rank):
    """PEFT's initialisation on each rank's shards: A ~ kaiming-uniform(a=sqrt(5)), that is
    U(-1/sqrt(in), 1/sqrt(in)); B = 0 (each rank draws its own rows of A)."""
    g = torch.Generator().manual_seed(4321 + rank)
    for name, p in model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        if "lora_A" in name:
            bound = 1 / p.shape[1] ** 0.5
            local.copy_(torch.rand(local.shape, generator=g) * 2 * bound - bound)
        elif "lora_B" in name:
            local.zero_()


def fourbit_bytes(model) -> int:
    """Bytes of 4-bit weights (codes + quantization state) this rank holds."""
    total = 0
    for m in model.modules():
        if isinstance(m, Linear4bit):
            w = m.weight
            total += (w.to_local() if hasattr(w, "to_local") else w).numel()
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--out", default="out/fsdp_qlora")
    ap.add_argument("--low-memory", action="store_true", help="build on meta; rank 0 streams the checkpoint")
    ap.add_argument("--export-4bit", action="store_true",
                    help="also write the 4-bit base model (bitsandbytes format) under --out/nf4")
    ap.add_argument("--max-shard-size", default="5GB", help="largest output file of --export-4bit")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (world,))

    if args.low_memory:
        path = args.model
        if path is None:  # a checkpoint to load: the random model's float weights, saved by rank 0
            path = os.path.join(args.out, "float_checkpoint")
            if rank == 0:
                torch.manual_seed(0)
                from transformers import AutoModelForCausalLM
                AutoModelForCausalLM.from_config(random_config(args), dtype=torch.bfloat16).save_pretrained(
                    path, max_shard_size="1MB")
            dist.barrier()
        if not os.path.isdir(path):
            raise SystemExit(f"--low-memory loads a local checkpoint directory; --model {path!r} is not one")
        from transformers import AutoConfig
        model = build_on_meta(AutoConfig.from_pretrained(path))
    else:
        model = build(args, device)
    prepare_fsdp(model)  # each 4-bit weight (codes + quant state) becomes one shardable byte tensor
    whole = sum(flat_layout(m).nbytes for m in model.modules() if isinstance(m, Linear4bit))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    if args.low_memory:
        t0 = time.perf_counter()
        report = load_from_rank0(model, path, device=device, missing_ok=lambda key: "lora_" in key)
        init_lora_shards(model, rank)
        if rank == 0:
            print(f"loaded {report['loaded']} tensors ({report['quantized']} quantized) from {path} in "
                  f"{time.perf_counter() - t0:.2f} s; {len(report['skipped'])} LoRA tensors initialised", flush=True)
    print(f"rank {rank}: 4-bit weights {whole} bytes whole, {fourbit_bytes(model)} bytes on this rank", flush=True)

    opt = fourbit.optim.PagedAdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    g = torch.Generator().manual_seed(1234 + rank)  # each rank its own batch
    vocab = model.config.vocab_size
    for step in range(args.steps):
        t0 = time.perf_counter()
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        mean = loss.detach().float().clone()
        dist.all_reduce(mean)
        if rank == 0:
            print(f"step {step}: loss {mean.item() / world:.4f} ({time.perf_counter() - t0:.2f} s)", flush=True)

    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.save(state, checkpoint_id=args.out)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=args.out)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    if rank == 0:
        print(f"saved and reloaded {args.out} (torch.distributed.checkpoint, {world} ranks)", flush=True)

    # what PEFT's save_pretrained writes for the unsharded model; load it with PeftModel.from_pretrained
    t0 = time.perf_counter()
    report = save_adapter(model, os.path.join(args.out, "adapter"))
    if rank == 0:
        print(f"saved the adapter ({report['tensors']} tensors: {', '.join(report['files'])}) to "
              f"{args.out}/adapter in {time.perf_counter() - t0:.2f} s", flush=True)
    if args.export_4bit:  # the base model as transformers + bitsandbytes save it (LoRA not merged)
        t0 = time.perf_counter()
        report = save_quantized(model, os.path.join(args.out, "nf4"), max_shard_size=args.max_shard_size)
        if rank == 0:
            print(f"exported the 4-bit model ({report['tensors']} tensors, {report['quantized']} 4-bit, "
                  f"{len(report['files'])} files) to {args.out}/nf4 in {time.perf_counter() - t0:.2f} s", flush=True)
    dist.barrier()  # every rank past its last collective before any tears its group down
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
