"""4-bit matmul: fourbit vs bitsandbytes vs torch bf16, side by side in one run.

What is measured, on the Llama-3.1-8B projection weights (N x K = out x in features)

    q_proj 4096x4096, kv_proj 1024x4096, up_proj 14336x4096, down_proj 4096x14336

with nested (double-quantized) NF4, blocksize 64, bf16 activations, for M in
{1, 8, 16, 32, 64, 128, 512, 4096} activation rows:

- ``fwd``: Y = X @ W^T. fourbit ``matmul_4bit``; bitsandbytes ``matmul_4bit`` (its own
  quantization of the same weight); torch ``linear`` with the bf16 weight; and
  "deq+linear": fourbit's dequantize into a fresh bf16 weight, then torch ``linear``
  (the unfused floor).
- ``fwd+bwd``: the same forward plus the input gradient dX = dY @ W (X requires grad,
  the weight is frozen), i.e. what a training step pays per linear layer.

On CUDA the fourbit kernels can also be timed one by one (``--algos``), forward and forward +
input gradient, which is how the dispatch thresholds in src/torch/gemm_ops_cuda.cpp and
cuda/gemm_4bit.cu are tuned: ``fourbit[ALGO]`` for ALGO in CUDA_ALGOS ("gemv" forward only:
it has no gradient kernel; "fused" is the fragment-layout kernel of cuda/gemm_4bit_fused.cu,
its weight repacked once, on the first call, outside the timing -- the warm-up -- and cached;
"fused_sm90" its Hopper forward (cuda/gemm_4bit_fused_sm90.cu; an error recorded off sm90 or
without sm_90a code; its input gradient is "fused"'s).
``--dry-run`` prints the grid of rows and labels without running anything (any machine).

Timing (benchmarks/bench_quant.py's Timer): CUDA: median of triton.testing.do_bench (L2
flushed before each call) or of a CUDA-event loop; CPU: median of time.perf_counter over
--reps calls after warm-up. Ratios are time / torch bf16 time (< 1: faster than bf16).

Correctness guard (outside the timing): each fourbit forward is compared with the
deq+linear result once per row; a relative error above 2^-6 is printed as a warning and
recorded in the JSON.

CPU: the run's header (stderr and JSON) names the CPU model and the ISA class fourbit's
kernels use (``torch.ops.fourbit.cpu_matmul_info``), and each row the path fourbit's op took
("fused" or "blas" = dequantize into a workspace + oneDNN; "fused/blas" for the forward and
input gradient of a fwd+bwd row), as chosen by FOURBIT_CPU_MATMUL (auto: measured per shape
class at first use, cached; docs/kernels.md). The first call of a shape class (the warm-up)
pays that measurement.

Output: a markdown table on stdout and a JSON file (default
benchmarks/results/matmul_<device>.json) that also has, per row and column, TFLOP/s and the
GB/s the 4-bit weight streams at (the roofline units of a compute- and a memory-bound product).

Run:
    python benchmarks/bench_matmul.py                         # cuda if available, else cpu
    python benchmarks/bench_matmul.py --device cpu --ms 1 8 32 128 512 --reps 3
    python benchmarks/bench_matmul.py --device cuda --algos    # also each fourbit kernel
    python benchmarks/bench_matmul.py --device cuda --algos --dry-run   # the plan only
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
DEFAULT_MS = (1, 8, 16, 32, 64, 128, 512, 4096)
# fourbit kernels that --algos times on CUDA (the `algo` argument of the ops).
CUDA_ALGOS = ("gemv", "tensor_core", "dequant_cublas", "fused", "fused_sm90")
# Kernels without an input-gradient form: timed in "fwd" only.
FORWARD_ONLY_ALGOS = ("gemv",)
# A forward differing from deq+linear by more than this (relative, max-norm) is flagged.
MAX_REL_ERROR = 2.0 ** -6


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ms", type=int, nargs="+", default=list(DEFAULT_MS), help="activation rows M")
    p.add_argument("--shapes", nargs="+", default=[s[0] for s in LLAMA_8B_SHAPES],
                   choices=[s[0] for s in LLAMA_8B_SHAPES])
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    p.add_argument("--reps", type=int, default=None, help="timed calls (default: CPU 3, CUDA 100)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default: CPU 1, CUDA 10)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--algos", action="store_true",
                   help="CUDA: also time each fourbit kernel (fwd and fwd+bwd)")
    p.add_argument("--dry-run", action="store_true", help="print the rows and labels that would run, then exit")
    p.add_argument("--no-bnb", action="store_true", help="skip bitsandbytes")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    is_cuda = torch.device(args.device).type == "cuda"
    args.reps = args.reps or (100 if is_cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (10 if is_cuda else 1)
    if args.json is None:
        args.json = Path(__file__).resolve().parent / "results" / f"matmul_{torch.device(args.device).type}.json"
    return args


def load_bnb(device):
    try:
        import bitsandbytes
        import bitsandbytes.functional as bnbF

        x = torch.randn(2, 64, dtype=DTYPE, device=device)
        q, s = bnbF.quantize_4bit(torch.randn(8, 64, dtype=DTYPE, device=device), compress_statistics=True,
                                  quant_type="nf4")
        bitsandbytes.matmul_4bit(x, q.t(), quant_state=s)
        return bitsandbytes, bitsandbytes.__version__
    except Exception as e:  # ImportError, no native library, no kernel for the device
        print(f"bitsandbytes unavailable ({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]})",
              file=sys.stderr)
        return None, None


def cpu_dispatch_info() -> dict:
    """fourbit's CPU matmul dispatch state: ISA class, mode, the last path of each op."""
    return json.loads(torch.ops.fourbit.cpu_matmul_info())


def gemm_algo(X, q, qs, algo):
    args = F._weight_args(q, qs)
    return torch.ops.fourbit.gemm_4bit(X, *args[:5], None, *args[5:], algo)


class _AlgoMatmul(torch.autograd.Function):
    """Y = X deq(W)^T by one fourbit kernel, and dX = dY deq(W) by the same algo."""

    @staticmethod
    def forward(ctx, X, q, qs, algo):
        ctx.q, ctx.qs, ctx.algo = q, qs, algo
        return gemm_algo(X, q, qs, algo)

    @staticmethod
    def backward(ctx, dY):
        dX = torch.ops.fourbit.gemm_4bit_grad_input(dY.contiguous(), *F._weight_args(ctx.q, ctx.qs), ctx.algo)
        return dX, None, None, None


def algo_labels(device_type: str, mode: str, algos: bool) -> list[str]:
    """The fourbit[ALGO] columns a row gets."""
    if not algos or device_type != "cuda":
        return []
    return [f"fourbit[{a}]" for a in CUDA_ALGOS if not (mode == "fwd+bwd" and a in FORWARD_ONLY_ALGOS)]


def plan_rows(args, device_type: str, bnb_available: bool) -> list[dict]:
    """Every (shape, M, mode) row and its column labels, in run order."""
    base = ["torch_bf16", "fourbit", "deq+linear"] + (["bitsandbytes"] if bnb_available else [])
    rows = []
    for name, N, K in (s for s in LLAMA_8B_SHAPES if s[0] in args.shapes):
        for M in args.ms:
            for mode in args.modes:
                rows.append({"shape": name, "N": N, "K": K, "M": M, "mode": mode,
                             "labels": base + algo_labels(device_type, mode, args.algos)})
    return rows


def with_backward(forward: Callable[[torch.Tensor], torch.Tensor], X: torch.Tensor, dY: torch.Tensor):
    """One training-step linear: forward, then the input gradient only."""
    def run():
        x = X.detach().requires_grad_()
        y = forward(x)
        (dx,) = torch.autograd.grad(y, x, dY)
        return dx
    return run


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref| (0 for empty outputs)."""
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item() if ref.numel() else 0.0


def bench_row(name, N, K, M, mode, args, device, timer, bnb) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    W = torch.randn(N, K, dtype=DTYPE, device=device, generator=gen) * 0.02
    X = torch.randn(M, K, dtype=DTYPE, device=device, generator=gen)
    dY = torch.randn(M, N, dtype=DTYPE, device=device, generator=gen)
    q, qs = F.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
    forwards: dict[str, Callable] = {
        "torch_bf16": lambda x: torch.nn.functional.linear(x, W),
        "fourbit": lambda x: fourbit.matmul_4bit(x, q.t(), qs),
        "deq+linear": lambda x: torch.nn.functional.linear(x, F.dequantize_4bit(q, qs)),
    }
    if bnb is not None:
        bq, bqs = bnb.functional.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
        forwards["bitsandbytes"] = lambda x: bnb.matmul_4bit(x, bq.t(), quant_state=bqs)
    for label in algo_labels(device.type, mode, args.algos):
        algo = label[len("fourbit["):-1]
        forwards[label] = lambda x, a=algo: _AlgoMatmul.apply(x, q, qs, a)

    row = {"shape": name, "N": N, "K": K, "M": M, "mode": mode, "ms": {}, "ratio_vs_bf16": {}}
    with torch.no_grad():
        ref = forwards["deq+linear"](X).float()
        got = forwards["fourbit"](X).float()
    rel = relative_error(got, ref)
    row["fourbit_rel_error_vs_deq_linear"] = rel
    if rel > MAX_REL_ERROR:
        print(f"WARNING {name} M={M}: fourbit differs from deq+linear by {rel:.3g} (relative)", file=sys.stderr)
    row["algo_rel_error_vs_deq_linear"] = {}
    for label in (k for k in forwards if k.startswith("fourbit[")):
        try:
            with torch.no_grad():
                r = relative_error(forwards[label](X).float(), ref)
        except Exception as e:  # recorded in the timing below as well
            print(f"{label} failed on {name} M={M}: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        row["algo_rel_error_vs_deq_linear"][label] = r
        if r > MAX_REL_ERROR:
            print(f"WARNING {name} M={M}: {label} differs from deq+linear by {r:.3g} (relative)", file=sys.stderr)
    for label, fwd in forwards.items():
        fn = with_backward(fwd, X, dY) if mode == "fwd+bwd" else (lambda f=fwd: f(X))
        try:
            with torch.inference_mode(mode == "fwd"):
                median, _ = timer([fn])
            row["ms"][label] = median * 1e3
            if label == "fourbit" and device.type == "cpu":
                last = cpu_dispatch_info()["last"]
                row["fourbit_path"] = last["forward"] if mode == "fwd" else f"{last['forward']}/{last['grad_input']}"
        except Exception as e:  # a library without a kernel for this case: record, go on
            print(f"{label} failed on {name} M={M} {mode}: {type(e).__name__}: {e}", file=sys.stderr)
            row["ms"][label] = None
    base = row["ms"].get("torch_bf16")
    for label, t in row["ms"].items():
        row["ratio_vs_bf16"][label] = (t / base) if (t and base) else None
    # Roofline units: TFLOP/s of the products (2MNK per product; fwd+bwd has two) and the
    # GB/s at which the 4-bit weight (codes + nested scales) would have to stream for that time.
    products = 2 if mode == "fwd+bwd" else 1
    row["tflop"] = 2.0 * M * N * K * products / 1e12
    row["weight_4bit_bytes"] = q.numel() * q.element_size() + qs.absmax.nbytes
    row["tflop_s"] = {k: (row["tflop"] / (t * 1e-3) if t else None) for k, t in row["ms"].items()}
    row["weight_4bit_gb_s"] = {k: (row["weight_4bit_bytes"] * products / (t * 1e-3) / 1e9 if t else None)
                               for k, t in row["ms"].items()}
    return row


def markdown(rows: list[dict]) -> str:
    labels = [k for k in rows[0]["ms"]] if rows else []
    for r in rows:
        labels += [k for k in r["ms"] if k not in labels]
    path = any("fourbit_path" in r for r in rows)
    head = ("| weight | M | mode | " + " | ".join(f"{k} ms" for k in labels) + " | fourbit / bf16 | bnb / bf16 |"
            + (" fourbit path |" if path else ""))
    lines = [head, "|" + "---|" * (3 + len(labels) + 2 + path)]

    def f(x: Optional[float], spec=".3f") -> str:
        return "-" if x is None else format(x, spec)

    for r in rows:
        cells = [f(r["ms"].get(k)) for k in labels]
        lines.append(f"| {r['shape']} {r['N']}x{r['K']} | {r['M']} | {r['mode']} | " + " | ".join(cells)
                     + f" | {f(r['ratio_vs_bf16'].get('fourbit'), '.2f')} | "
                     f"{f(r['ratio_vs_bf16'].get('bitsandbytes'), '.2f')} |"
                     + (f" {r.get('fourbit_path', '-')} |" if path else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.dry_run:
        for r in plan_rows(args, device.type, bnb_available=not args.no_bnb):
            print(f"{r['shape']} {r['N']}x{r['K']} M={r['M']} {r['mode']}: {', '.join(r['labels'])}")
        return 0
    timer, load = start_run(args, device)
    bnb, bnb_version = (None, None) if args.no_bnb else load_bnb(device)
    cpu_fields = {}
    if device.type == "cpu":
        info = cpu_dispatch_info()
        cpu_fields = {"cpu_model": info["cpu"], "cpu_isa": info["isa"], "cpu_matmul_mode": info["mode"],
                      "cpu_matmul_cache": info["cache_file"]}
        print(f"CPU: {info['cpu']}, fourbit ISA class {info['isa']}, {info['threads']} threads, "
              f"FOURBIT_CPU_MATMUL={info['mode']}", file=sys.stderr, flush=True)
    rows = []
    shapes = [s for s in LLAMA_8B_SHAPES if s[0] in args.shapes]
    for name, N, K in shapes:
        for M in args.ms:
            for mode in args.modes:
                row = bench_row(name, N, K, M, mode, args, device, timer, bnb)
                rows.append(row)
                print(f"{name} M={M} {mode}: " + ", ".join(
                    f"{k} {v:.3f} ms" for k, v in row["ms"].items() if v is not None)
                    + (f" (fourbit path {row['fourbit_path']})" if "fourbit_path" in row else ""),
                    file=sys.stderr, flush=True)
    return finish_run(args, argv, device, timer, load, markdown(rows), rows, benchmark="matmul_4bit",
                      bitsandbytes=bnb_version, dtype=str(DTYPE), format="nf4, nested, blocksize 64", **cpu_fields)


if __name__ == "__main__":
    sys.exit(main())
