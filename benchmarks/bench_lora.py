"""A LoRA layer's forward + backward: fourbit vs bitsandbytes + PEFT vs bf16 + PEFT, side by
side in one run.

What is measured, on the Llama-3.1-8B projection weights (N x K = out x in features)

    q_proj 4096x4096, kv_proj 1024x4096, up_proj 14336x4096, down_proj 4096x14336

with a rank-16 adapter (lora_alpha 32, no dropout), bf16 activations and bf16 adapter
weights in every contender (PEFT with ``autocast_adapter_dtype=False``, fourbit's adapter
cast to bf16), the base weight frozen, one training step of one layer: Y = layer(X), then
Y.backward(dY) giving dX, dA and dB (X requires grad, as inside a network).

- ``fourbit``: ``fourbit.nn.LoraLinear4bit`` on a ``fourbit.nn.Linear4bit`` (nested NF4,
  blocksize 64), i.e. the fused op torch.ops.fourbit.lora_4bit and its backward.
- ``fourbit-unfused``: the same layer's math composed of ``torch.ops.fourbit.gemm_4bit``
  and torch matmuls (``linear`` for X A^T, ``addmm`` for the B product, scale and add),
  autograd through each: what the fusion saves.
- ``bnb+peft``: ``peft.get_peft_model`` on a ``bitsandbytes.nn.Linear4bit`` (same format).
- ``bf16+peft``: ``peft.get_peft_model`` on a bf16 ``torch.nn.Linear`` (the target: the
  issue asks fourbit <= 1.05x this time on an H100 at M = 4096).

Timing (benchmarks/bench_quant.py's Timer): CUDA: median of triton.testing.do_bench (L2
flushed before each call) or of a CUDA-event loop; CPU: median of time.perf_counter over
--reps calls after warm-up. Ratios are time / bf16+peft time (< 1: faster).
On the CPU the table's last column is the path fourbit's fused op took, forward /
backward (``fused`` or ``blas``: the 4-bit matmul dispatch, FOURBIT_CPU_MATMUL,
docs/kernels.md "CPU dispatch"); the warm-up call makes any first-use measurement.

Correctness guard (outside the timing): the fourbit forward is compared with the float32
product of the dequantized weight plus the adapter; a relative error (max-norm) above
2^-6 is printed as a warning and recorded in the JSON.

Defaults: CUDA M = 4096 (and --ms for others); CPU M = 16 and 256, because a 2-core CPU
needs minutes per contender for M = 4096 on the 14336-wide shapes (pass --ms 4096 to
measure it anyway).

Output: a markdown table on stdout and a JSON file (default
benchmarks/results/lora_<device>.json).

Run:
    python benchmarks/bench_lora.py                          # cuda if available, else cpu
    python benchmarks/bench_lora.py --device cpu --threads 2 --ms 16 256
    python benchmarks/bench_lora.py --device cuda --ms 512 4096
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quant import LLAMA_8B_SHAPES, finish_run, start_run  # noqa: E402

import fourbit  # noqa: E402
import fourbit.functional as F  # noqa: E402

DTYPE = torch.bfloat16
RANK = 16
ALPHA = 32
DEFAULT_MS = {"cuda": (4096,), "cpu": (16, 256)}
# A fourbit forward differing from the fp32 reference by more than this (relative, max-norm) is flagged.
MAX_REL_ERROR = 2.0 ** -6


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ms", type=int, nargs="+", default=None, help="activation rows M (default: CUDA 4096, CPU 16 256)")
    p.add_argument("--shapes", nargs="+", default=[s[0] for s in LLAMA_8B_SHAPES],
                   choices=[s[0] for s in LLAMA_8B_SHAPES])
    p.add_argument("--reps", type=int, default=None, help="timed calls (default: CPU 3, CUDA 100)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default: CPU 1, CUDA 10)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--no-bnb", action="store_true", help="skip bitsandbytes + PEFT")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    kind = torch.device(args.device).type
    args.ms = args.ms or list(DEFAULT_MS["cuda" if kind == "cuda" else "cpu"])
    args.reps = args.reps or (100 if kind == "cuda" else 3)
    args.warmup = args.warmup if args.warmup is not None else (10 if kind == "cuda" else 1)
    if args.json is None:
        args.json = Path(__file__).resolve().parent / "results" / f"lora_{kind}.json"
    return args


def load_bnb():
    try:
        import bitsandbytes

        return bitsandbytes, bitsandbytes.__version__
    except Exception as e:  # ImportError, no native library
        print(f"bitsandbytes unavailable ({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]})",
              file=sys.stderr)
        return None, None


class UnfusedLora(torch.nn.Module):
    """fourbit's LoRA layer computed without the fused op: gemm_4bit for the base, then
    PEFT-style separate products for the adapter."""

    def __init__(self, fused: torch.nn.Module):
        super().__init__()
        self.fused = fused

    def forward(self, x):
        f = self.fused
        x, _, weight, args, bias = f.base_layer._gemm_inputs(x)  # x: [M, K] in the bench
        absmax, nested_absmax, nested_code, offset, *config = args
        y = torch.ops.fourbit.gemm_4bit(x, weight, absmax, nested_absmax, nested_code, offset, bias, *config)
        xa = torch.nn.functional.linear(x, f.lora_A.weight)
        return torch.addmm(y, xa, f.lora_B.weight.t(), alpha=f.scaling)


class OneLayer(torch.nn.Module):
    """A model of one projection, the unit PEFT's target_modules picks."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def peft_layer(base: torch.nn.Module, A: torch.Tensor, B: torch.Tensor) -> torch.nn.Module:
    import peft

    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["proj"])
    model = peft.get_peft_model(OneLayer(base), config, autocast_adapter_dtype=False)
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
    return model


def contenders(W, A, B, device, bnb) -> dict[str, torch.nn.Module]:
    N, K = W.shape
    base4 = fourbit.nn.Linear4bit(K, N, bias=False, compute_dtype=DTYPE, compress_statistics=True, quant_type="nf4")
    base4.weight = fourbit.nn.Params4bit(W, requires_grad=False, compress_statistics=True, quant_type="nf4")
    base4 = base4.to(device)  # quantizes, on the CPU as on CUDA
    ours = fourbit.nn.LoraLinear4bit(base4, r=RANK, lora_alpha=ALPHA).to(device=device, dtype=DTYPE)
    with torch.no_grad():
        ours.lora_A.weight.copy_(A)
        ours.lora_B.weight.copy_(B)
    layers = {"fourbit": ours, "fourbit-unfused": UnfusedLora(ours)}
    if bnb is not None:
        base_bnb = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=DTYPE, compress_statistics=True,
                                     quant_type="nf4")
        base_bnb.weight = bnb.nn.Params4bit(W, requires_grad=False, compress_statistics=True, quant_type="nf4")
        layers["bnb+peft"] = peft_layer(base_bnb.to(device), A, B)
    linear = torch.nn.Linear(K, N, bias=False, device=device, dtype=DTYPE)
    with torch.no_grad():
        linear.weight.copy_(W)
    linear.weight.requires_grad_(False)
    layers["bf16+peft"] = peft_layer(linear, A, B)
    return layers


def training_step(layer: torch.nn.Module, X: torch.Tensor, dY: torch.Tensor) -> Callable[[], None]:
    def run():
        x = X.detach().requires_grad_()
        layer(x).backward(dY)
    return run


def bench_row(name, N, K, M, args, device, timer, bnb) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    W = torch.randn(N, K, dtype=DTYPE, device=device, generator=gen) * 0.02
    A = torch.randn(RANK, K, dtype=DTYPE, device=device, generator=gen) * K ** -0.5
    B = torch.randn(N, RANK, dtype=DTYPE, device=device, generator=gen) * 0.02
    X = torch.randn(M, K, dtype=DTYPE, device=device, generator=gen)
    dY = torch.randn(M, N, dtype=DTYPE, device=device, generator=gen)
    layers = contenders(W, A, B, device, bnb)

    row = {"shape": name, "N": N, "K": K, "M": M, "r": RANK, "ms": {}, "ratio_vs_bf16_peft": {}}
    with torch.no_grad():
        ours = layers["fourbit"]
        qs = ours.base_layer.weight.quant_state
        Wd = F.dequantize_4bit(ours.base_layer.weight.data, qs).float()
        ref = X.float() @ Wd.t() + ours.scaling * (X.float() @ A.float().t()) @ B.float().t()
        got = ours(X).float()
    rel = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item() if ref.numel() else 0.0
    row["fourbit_rel_error_vs_fp32"] = rel
    if rel > MAX_REL_ERROR:
        print(f"WARNING {name} M={M}: fourbit differs from the fp32 reference by {rel:.3g} (relative)",
              file=sys.stderr)
    for label, layer in layers.items():
        try:
            median, _ = timer([training_step(layer, X, dY)])
            row["ms"][label] = median * 1e3
            if label == "fourbit" and device.type == "cpu":
                # The path the fused op's base product took (src/torch/cpu_dispatch.h);
                # "-" from a build that does not report it.
                last = json.loads(torch.ops.fourbit.cpu_matmul_info())["last"]
                row["fourbit_path"] = f"{last.get('lora_forward', '-')}/{last.get('lora_backward', '-')}"
        except Exception as e:  # a library without a kernel for this case: record, go on
            print(f"{label} failed on {name} M={M}: {type(e).__name__}: {e}", file=sys.stderr)
            row["ms"][label] = None
    base = row["ms"].get("bf16+peft")
    for label, t in row["ms"].items():
        row["ratio_vs_bf16_peft"][label] = (t / base) if (t and base) else None
    return row


def markdown(rows: list[dict]) -> str:
    labels = ["fourbit", "fourbit-unfused", "bnb+peft", "bf16+peft"]
    paths = any("fourbit_path" in r for r in rows)
    head = ("| weight | M | " + " | ".join(f"{k} ms" for k in labels)
            + " | fourbit / bf16+peft | bnb+peft / bf16+peft |" + (" fourbit path (fwd/bwd) |" if paths else ""))
    lines = [head, "|" + "---|" * (2 + len(labels) + 2 + paths)]

    def f(x: Optional[float], spec=".3f") -> str:
        return "-" if x is None else format(x, spec)

    for r in rows:
        cells = [f(r["ms"].get(k)) for k in labels]
        lines.append(f"| {r['shape']} {r['N']}x{r['K']} | {r['M']} | " + " | ".join(cells)
                     + f" | {f(r['ratio_vs_bf16_peft'].get('fourbit'), '.2f')} | "
                     f"{f(r['ratio_vs_bf16_peft'].get('bnb+peft'), '.2f')} |"
                     + (f" {r.get('fourbit_path', '-')} |" if paths else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    import peft

    args = parse_args(argv)
    device = torch.device(args.device)
    timer, load = start_run(args, device)
    bnb, bnb_version = (None, None) if args.no_bnb else load_bnb()
    rows = []
    for name, N, K in [s for s in LLAMA_8B_SHAPES if s[0] in args.shapes]:
        for M in args.ms:
            row = bench_row(name, N, K, M, args, device, timer, bnb)
            rows.append(row)
            print(f"{name} M={M}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in row["ms"].items() if v is not None),
                  file=sys.stderr, flush=True)
    return finish_run(args, argv, device, timer, load, markdown(rows), rows, benchmark="lora_fwd_bwd",
                      bitsandbytes=bnb_version, peft=peft.__version__, dtype=str(DTYPE),
                      format="nf4, nested, blocksize 64",
                      lora={"r": RANK, "lora_alpha": ALPHA, "dropout": 0.0, "adapter_dtype": str(DTYPE)})


if __name__ == "__main__":
    sys.exit(main())
