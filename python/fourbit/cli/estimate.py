"""``fourbit estimate MODEL``: the peak GPU memory of one QLoRA training step, itemised, from
a model config alone. The model (derived in docs/BENCHMARKS.md, "Memory estimate") is the
transformers + PEFT + bitsandbytes step the anchors measure: a Llama-style decoder with 4-bit
linear layers, float embeddings / norms / output head, LoRA adapters in ``--lora-dtype``,
activations in ``--dtype``, non-reentrant gradient checkpointing, gradients set to None after
each step. Every term is a count of bytes of the tensors alive at the step's peak; no
constant is fitted to the measurements."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import click
from rich.table import Table

from ._common import EXIT_DOES_NOT_FIT, EXIT_INPUT, EXIT_USAGE, CliError, console

GiB = 2**30
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Shapes of known families (their public config.json values).
KNOWN = {
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "llama-3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "mistral-7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=32768, tie_word_embeddings=False),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}
KNOWN["llama-3.1-70b"] = KNOWN["llama-3-70b"]
KNOWN["llama-3-8b"] = KNOWN["llama-3.1-8b"]
DECODER_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "olmo2", "granite")
OPTIMIZERS = ("paged_adamw_8bit", "adamw_8bit", "paged_adamw", "adamw")
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Hopper cuBLASLt workspace that torch allocates through its caching allocator (32 MiB since
# pytorch#120925; 4 MiB on big Ampere, 1 MiB before) plus the cuBLAS workspace of
# CUBLAS_WORKSPACE_CONFIG ":4096:2:16:8" (4096 KiB x 2 + 16 KiB x 8). One per thread that
# runs matmuls: the forward (main thread) and autograd's backward thread.
WORKSPACE_PER_THREAD = 32 * 2**20 + (2 * 4096 + 8 * 16) * 1024
MATMUL_THREADS = 2
# Logits and loss, per token and vocabulary entry, at the start of the backward pass
# (transformers' ForCausalLMLoss upcasts to float32 then F.cross_entropy): the bf16 logits
# (kept by the model output), the float32 log-softmax output (saved for backward), the float32
# gradient into it and the float32 gradient out of log_softmax's backward: 2 + 4 + 4 + 4.
LOGITS_BYTES_PER_ENTRY = 14
# bitsandbytes' 8-bit optimizers quantize states in blocks of 256 with one float32 absmax each.
OPTIM_8BIT_BLOCK = 256


@dataclass(frozen=True)
class Shape:
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    head_dim: int

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each projection of one layer."""
        h, q = self.hidden, self.heads * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim), "o_proj": (q, h),
                "gate_proj": (h, self.inter), "up_proj": (h, self.inter), "down_proj": (self.inter, h)}


def shape_from_config(cfg: dict, source: str) -> Shape:
    model_type = cfg.get("model_type", "llama")
    if model_type not in DECODER_TYPES:
        raise CliError(f"{source}: model_type {model_type!r} is not a Llama-style decoder the estimator models "
                       f"({', '.join(DECODER_TYPES)})", EXIT_INPUT)
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "vocab_size") if not isinstance(cfg.get(k), int) or cfg[k] <= 0]
    if missing:
        raise CliError(f"{source}: config needs positive integers for {missing}", EXIT_INPUT)
    heads = cfg["num_attention_heads"]
    return Shape(cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], heads,
                 cfg.get("num_key_value_heads") or heads, cfg["vocab_size"], bool(cfg.get("tie_word_embeddings")),
                 cfg.get("head_dim") or cfg["hidden_size"] // heads)


def load_shape(model: str) -> Shape:
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            return shape_from_config(json.loads(path.read_text()), str(path))
        except json.JSONDecodeError as e:
            raise CliError(f"{path}: malformed JSON ({e})", EXIT_INPUT) from None
    if model.lower() in KNOWN:
        cfg = dict(KNOWN[model.lower()], model_type="llama")
        return shape_from_config(cfg, model)
    raise CliError(f"MODEL {model!r} is neither a config.json / model directory nor a known family "
                   f"({', '.join(sorted(KNOWN))})", EXIT_INPUT)


def estimate(shape: Shape, *, batch: int, seq: int, r: int, targets=PROJ, optim: str = "paged_adamw_8bit",
             grad_ckpt: bool = True, dtype: str = "bfloat16", lora_dtype: str = "float32",
             blocksize: int = 64, double_quant: bool = True, device: str = "cuda") -> dict:
    """Bytes of each item alive at the peak of a training step, and the peak itself.
    ``device="cpu"``: the same step on the CPU (no cuBLAS workspaces)."""
    unknown = sorted(set(targets) - set(PROJ))
    if unknown:
        raise CliError(f"--targets {unknown} are not projections of a Llama-style layer ({', '.join(PROJ)})",
                       EXIT_USAGE)
    a, lb = BYTES[dtype], BYTES[lora_dtype]
    h, i, L, V, T = shape.hidden, shape.inter, shape.layers, shape.vocab, batch * seq
    lin = shape.linear_shapes()
    n4 = L * sum(k * n for k, n in lin.values())
    n_weights = 7 * L
    blocks = n4 / blocksize
    # quant state: absmax (uint8 if double quantized, else fp32), nested absmax per 256 blocks,
    # per weight the 16-entry code, the 256-entry nested code and the offset (fp32)
    quant = blocks * (1 if double_quant else 4) + (
        (blocks / 256 * 4 + n_weights * (16 + 256 + 1) * 4) if double_quant else n_weights * 16 * 4)
    lora_per_layer = sum(r * (lin[t][0] + lin[t][1]) for t in targets)
    n_lora = L * lora_per_layer
    float_params = V * h * a * (1 if shape.tied else 2) + (2 * L + 1) * h * a
    if optim.endswith("8bit"):
        states = n_lora * 2 + 2 * math.ceil(n_lora / OPTIM_8BIT_BLOCK) * 4
    else:
        states = n_lora * 8
    paged = optim.startswith("paged")

    # Activations saved by one layer for its backward, per token (bf16 unless noted):
    # RMSNorm keeps its float32 input (x2 norms), each normed output feeds the projections;
    # attention keeps q, k, v after RoPE and its output, plus the copy that feeds o_proj; the
    # MLP keeps gate, up, act(gate) and their product (down_proj's input); PEFT casts each
    # adapted layer's input to the adapter dtype (a copy when it differs) for lora_A.
    per_layer = (2 * 4 * h + 2 * a * h + a * (2 * shape.heads * shape.head_dim + 2 * shape.kv_dim)
                 + a * shape.heads * shape.head_dim + 4 * a * i)
    if lb != a:
        per_layer += sum(lb * lin[t][0] for t in targets)
    per_layer += sum(lb * r for _ in targets)
    final_norm = 4 * h + a * h  # final RMSNorm's float32 input and the last layer's output
    logits = LOGITS_BYTES_PER_ENTRY * V
    lora_grads_layer = lora_per_layer * lb
    if grad_ckpt:
        saved_layers = L * a * h * T  # each layer's input, kept by the checkpoint
        # backward of the last layer: all checkpoints + one recomputed layer + its grads;
        # of the first layer: one checkpoint + one recomputed layer + every adapter's grads
        recompute = max(saved_layers + per_layer * T + lora_grads_layer,
                        a * h * T + per_layer * T + L * lora_grads_layer)
    else:
        saved_layers = L * per_layer * T
        recompute = saved_layers + L * lora_grads_layer
    loss_phase = saved_layers + final_norm * T + logits * T
    static = {
        "4-bit weights": n4 / 2,
        "quantization state": quant,
        "float params (embeddings, norms, lm_head)": float_params,
        "LoRA parameters": n_lora * lb,
        "optimizer states" + (" (paged: outside torch's allocator)" if paged else ""): states,
    }
    if device == "cuda":
        static["cuBLAS/cuBLASLt workspaces"] = WORKSPACE_PER_THREAD * MATMUL_THREADS
    if loss_phase >= recompute:
        peak_phase = "loss"
        dynamic = {("saved activations (checkpoints)" if grad_ckpt else "saved activations (all layers)"):
                   saved_layers, "final norm + last hidden": final_norm * T, "logits + loss (fp32)": logits * T}
    else:
        peak_phase = "backward recompute" if grad_ckpt else "backward"
        dynamic = {"activations + adapter grads (backward)": recompute}
    items = dict(static, **dynamic)
    allocated = sum(v for k, v in items.items() if not k.startswith("optimizer states (paged"))
    return {"items": items, "peak_phase": peak_phase, "peak_allocated_bytes": allocated,
            "lora_gradient_bytes": n_lora * lb,
            "gpu_total_bytes": sum(items.values()), "lora_parameters": n_lora, "tokens": T,
            "phases": {"loss": loss_phase, "recompute": recompute},
            "activations_no_ckpt_bytes": L * per_layer * T, "activations_ckpt_bytes": L * a * h * T}


# Nominal memory of common cards (as marketed); the usable part is a little smaller.
GPU_SIZES = (("16 GB (T4, V100)", 16), ("24 GB (RTX 4090, A10, L4)", 24), ("40 GB (A100 40GB)", 40),
             ("48 GB (L40S, A6000)", 48), ("80 GB (A100/H100 80GB)", 80), ("141 GB (H200)", 141))


@click.command("estimate")
@click.argument("model")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--seq", type=click.IntRange(min=1), default=512, show_default=True, help="sequence length")
@click.option("--r", type=click.IntRange(min=1), default=16, show_default=True, help="LoRA rank")
@click.option("--targets", default=",".join(PROJ), show_default=True, help="comma-separated projections with LoRA")
@click.option("--optim", type=click.Choice(OPTIMIZERS), default="paged_adamw_8bit", show_default=True)
@click.option("--grad-ckpt/--no-grad-ckpt", default=True, show_default=True)
@click.option("--dtype", type=click.Choice(["bfloat16", "float16"]), default="bfloat16", show_default=True,
              help="compute/activation dtype")
@click.option("--lora-dtype", type=click.Choice(sorted(BYTES)), default="float32", show_default=True)
@click.option("--context-gib", type=click.FloatRange(min=0), default=0.5, show_default=True,
              help="CUDA context + kernels outside torch's allocator (an assumption; measure yours with doctor)")
@click.option("--gpu-mem", type=click.FloatRange(min=0), default=None,
              help="GiB available; exit 4 if the step does not fit")
@click.option("--json", "as_json", is_flag=True)
def estimate_cmd(model, batch, seq, r, targets, optim, grad_ckpt, dtype, lora_dtype, context_gib, gpu_mem, as_json):
    """Peak GPU memory of one QLoRA training step of MODEL (a config.json, a model directory, or
    a known family: llama-3.1-8b, llama-3-70b, ...), itemised, and which GPUs it fits."""
    shape = load_shape(model)
    target_list = tuple(t.strip() for t in targets.split(",") if t.strip())
    est = estimate(shape, batch=batch, seq=seq, r=r, targets=target_list, optim=optim, grad_ckpt=grad_ckpt,
                   dtype=dtype, lora_dtype=lora_dtype)
    need = (est["gpu_total_bytes"]) / GiB + context_gib
    est.update(context_gib=context_gib, need_gib=need, model=model)
    fits = None if gpu_mem is None else need <= gpu_mem
    if as_json:
        click.echo(json.dumps(dict(est, fits=fits), indent=2))
    else:
        table = Table(title=f"QLoRA step, {model}: {batch}x{seq} tokens, r={r} on {len(target_list)} projections, "
                            f"{optim}, {'' if grad_ckpt else 'no '}gradient checkpointing")
        table.add_column("item")
        table.add_column("GiB", justify="right")
        for k, v in est["items"].items():
            table.add_row(k, f"{v / GiB:.3f}")
        table.add_section()
        table.add_row(f"[bold]peak allocated by torch[/] (at the {est['peak_phase']})",
                      f"[bold]{est['peak_allocated_bytes'] / GiB:.2f}[/]")
        table.add_row(f"+ paged states and CUDA context ({context_gib:g} GiB, assumed)", f"{need:.2f}")
        table.add_section()
        table.add_row("[dim]LoRA gradients (alive during backward, freed before this peak)[/]",
                      f"[dim]{est['lora_gradient_bytes'] / GiB:.3f}[/]")
        table.add_row("[dim]saved activations with / without gradient checkpointing[/]",
                      f"[dim]{est['activations_ckpt_bytes'] / GiB:.2f} / {est['activations_no_ckpt_bytes'] / GiB:.2f}[/]")
        console.print(table)
        console.print("fits (nominal memory): " + ", ".join(
            f"{name} {'[green]yes[/]' if need <= cap else '[red]no[/]'}" for name, cap in GPU_SIZES))
    if fits is False:
        raise CliError(f"does not fit: needs {need:.2f} GiB, --gpu-mem is {gpu_mem:g} GiB", EXIT_DOES_NOT_FIT)
