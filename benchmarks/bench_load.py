"""A QLoRA training step on the CPU, on a quiet machine and with other processes loading it:
does fourbit's throughput degrade gracefully when it shares the CPU?

The step: a stack of ``--layers`` fourbit ``LoraLinear4bit`` layers (NF4, nested, rank 16,
MiniLM-like shapes: 384 -> 1536 -> 384, fp32), forward on ``--rows`` tokens, backward, and an
``AdamW`` step on the adapters: the kernels of the main job (examples/finetune_minilm.py):
gemm_4bit / lora_4bit forward and backward (fourbit's threads) and the adapter products
and optimizer (fourbit's and torch's threads).

For each thread count in ``--threads`` (torch.set_num_threads, which fourbit's parallel
loops follow), the median seconds per step over ``--steps`` steps after one warm-up step,
first with no added load, then with ``--busy`` load processes (``--load spin``: a pure-Python
busy loop each; ``--load torch``: another torch job each, the case where two OpenMP pools
compete). The machine's own 1-minute load average is recorded before each run, since
"quiet" is only as quiet as the machine is. Run it under each OpenMP wait setting to compare
(libgomp reads them when it loads, so they go in the environment):

    python benchmarks/bench_load.py --busy 2 --load torch --json benchmarks/results/load_cpu.json
    GOMP_SPINCOUNT=1000 python benchmarks/bench_load.py --busy 2 --load torch
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

import fourbit
from fourbit.nn import LinearNF4, LoraLinear4bit


# The load processes: a pure-Python spin (one busy core each), or another torch job (a matmul
# loop on torch's default threads, whose idle OpenMP workers spin as a second training job's do).
LOADS = {
    "spin": "while True: pass",
    "torch": "import torch\na = torch.randn(256, 256)\nwhile True: a @ a",
}


def build(layers: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    mods = []
    for i in range(layers):
        n_in, n_out = (384, 1536) if i % 2 == 0 else (1536, 384)
        base = LinearNF4(n_in, n_out)
        base.load_state_dict(torch.nn.Linear(n_in, n_out).state_dict())
        mods.append(LoraLinear4bit(base.quantize(), r=16, lora_alpha=32, init_lora_weights=False))
    return torch.nn.Sequential(*mods)


def time_steps(model, opt, x, steps: int) -> list[float]:
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model(x).float().pow(2).mean().backward()
        opt.step()
        if i:  # the first step warms up
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    p.add_argument("--busy", type=int, default=os.cpu_count() or 1, help="load processes for the loaded runs")
    p.add_argument("--load", choices=sorted(LOADS), default="spin",
                   help="what each load process runs: 'spin', a pure-Python busy loop; 'torch', another "
                        "torch job (small matmuls on all cores, OpenMP's default waiting)")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    model = build(args.layers)
    x = torch.randn(args.rows, 384)
    opt = fourbit.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    rows = []
    for busy in (0, args.busy):
        # The load runs with OpenMP's defaults whatever this process was given.
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
        hogs = [subprocess.Popen([sys.executable, "-c", LOADS[args.load]], env=env) for _ in range(busy)]
        try:
            time.sleep(1.0 if busy else 0.0)
            for threads in args.threads:
                torch.set_num_threads(threads)
                load = os.getloadavg()[0]
                t = time_steps(model, opt, x, args.steps)
                rows.append({"threads": threads, "busy_processes": busy, "load": args.load,
                             "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                             "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
                             "loadavg_1min_before": round(load, 2),
                             "median_s_per_step": statistics.median(t), "min_s": min(t), "max_s": max(t)})
                r = rows[-1]
                print(f"threads={threads} busy={busy} load={load:.2f}: median {r['median_s_per_step']:.3f} s/step "
                      f"(min {r['min_s']:.3f}, max {r['max_s']:.3f})", flush=True)
        finally:
            for h in hogs:
                h.kill()
                h.wait()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
