"""4-bit matmul: fourbit vs bitsandbytes vs torch bf16, side by side in one run.

What is measured, on the Llama-3.1-8B projection weights (N x K = out x in features)

    q_proj 4096x4096, kv_proj 1024x4096, up_proj 14336x4096, down_proj 4096x14336

with nested (double-quantized) NF4, blocksize 64, bf16 activations, for M in
{1, 8, 32, 128, 512, 4096} activation rows:

- ``fwd``: Y = X @ W^T. fourbit ``matmul_4bit``; bitsandbytes ``matmul_4bit`` (its own
  quantization of the same weight); torch ``linear`` with the bf16 weight; and
  "deq+linear": fourbit's dequantize into a fresh bf16 weight, then torch ``linear``
  (the unfused floor).
- ``fwd+bwd``: the same forward plus the input gradient dX = dY @ W (X requires grad,
  the weight is frozen), i.e. what a training step pays per linear layer.

On CUDA the fourbit kernels can also be timed one by one (``--algos``), which is how the
dispatch thresholds in python/csrc/gemm_ops_cuda.cpp and cuda/gemm_4bit.cu are tuned.

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
benchmarks/results/matmul_<device>.json).

Run:
    python benchmarks/bench_matmul.py                         # cuda if available, else cpu
    python benchmarks/bench_matmul.py --device cpu --ms 1 8 32 128 512 --reps 3
    python benchmarks/bench_matmul.py --device cuda --algos    # also each fourbit kernel
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
DEFAULT_MS = (1, 8, 32, 128, 512, 4096)
# fourbit kernels that --algos times on CUDA, forward only ("gemv" has no gradient kernel).
CUDA_ALGOS = ("gemv", "tensor_core", "dequant_cublas")
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
    p.add_argument("--algos", action="store_true", help="CUDA: also time each fourbit kernel (forward)")
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
    return torch.ops.fourbit.gemm_4bit(X, *F._weight_args(q, qs)[:5], None, *F._weight_args(q, qs)[5:], algo)


def with_backward(forward: Callable[[torch.Tensor], torch.Tensor], X: torch.Tensor, dY: torch.Tensor):
    """One training-step linear: forward, then the input gradient only."""
    def run():
        x = X.detach().requires_grad_()
        y = forward(x)
        (dx,) = torch.autograd.grad(y, x, dY)
        return dx
    return run


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
    if args.algos and device.type == "cuda" and mode == "fwd":
        for algo in CUDA_ALGOS:
            forwards[f"fourbit[{algo}]"] = lambda x, a=algo: gemm_algo(x, q, qs, a)

    row = {"shape": name, "N": N, "K": K, "M": M, "mode": mode, "ms": {}, "ratio_vs_bf16": {}}
    with torch.no_grad():
        ref = forwards["deq+linear"](X).float()
        got = forwards["fourbit"](X).float()
    rel = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item() if ref.numel() else 0.0
    row["fourbit_rel_error_vs_deq_linear"] = rel
    if rel > MAX_REL_ERROR:
        print(f"WARNING {name} M={M}: fourbit differs from deq+linear by {rel:.3g} (relative)", file=sys.stderr)
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
