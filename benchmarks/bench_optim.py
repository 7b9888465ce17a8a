"""AdamW step time: fourbit (32-bit, 8-bit, paged) vs bitsandbytes vs torch, in one run.

Workloads (fp32 parameters and gradients, gradients fixed across steps):

    lora_42M    448 LoRA tensors, r=16 A/B pairs of the 7 projections of 32 Llama-3.1-8B
                layers (q,o: 4096x4096; k,v: 1024x4096; gate,up: 14336x4096; down:
                4096x14336): 41.9M parameters in one parameter group
    single_42M  one tensor of 41,943,040 parameters
    lora_1B / single_1B   the same at about 1.07B parameters (r=408, one 1,073,741,824
                tensor): CUDA only; on the CPU the big size is 168M (r=64, 4 x 42M) to keep
                the run short, and the output says so

Variants: fourbit AdamW / AdamW8bit / PagedAdamW32bit / PagedAdamW8bit, bitsandbytes
AdamW / AdamW8bit / PagedAdamW / PagedAdamW8bit, torch.optim.AdamW(fused=True) (the
reference of the ratio column) and torch.optim.AdamW with its default implementation
(foreach on CUDA, single-tensor on the CPU). On CUDA, the paged variants are timed a second
time with their states evicted to the host before every step (fourbit: evict_states();
bitsandbytes: prefetch_tensor(to_cpu=True)): the price of a step after memory pressure.

Timing: CUDA events around one step, median of --reps after --warmup steps; CPU:
time.perf_counter around one step, median of --reps. A variant that cannot run (e.g.
bitsandbytes missing or failing on the device) is recorded as unavailable with the error.

Run:
    python benchmarks/bench_optim.py --device cuda --json gpu_out/bench_optim.json
    python benchmarks/bench_optim.py --device cpu --threads 2 --json benchmarks/results/optim_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import fourbit
import fourbit.optim

# Llama-3.1-8B projections: (out_features, in_features).
LLAMA_8B_PROJ = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096),
                 (4096, 14336)]
LAYERS = 32


def lora_shapes(rank: int):
    shapes = []
    for _ in range(LAYERS):
        for out_f, in_f in LLAMA_8B_PROJ:
            shapes += [(rank, in_f), (out_f, rank)]
    return shapes


def workloads(device: str):
    big_rank, big_single, big_label = (408, 1 << 30, "1B") if device == "cuda" else (64, 4 * 41_943_040, "168M")
    return [
        ("lora_42M", lora_shapes(16)),
        ("single_42M", [(41_943_040,)]),
        (f"lora_{big_label}", lora_shapes(big_rank)),
        (f"single_{big_label}", [(big_single,)]),
    ]


def variants(bnb):
    v = [
        ("torch_adamw_fused", lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True), False),
        ("torch_adamw_default", lambda ps: torch.optim.AdamW(ps, lr=1e-4), False),
        ("fourbit_adamw32", lambda ps: fourbit.optim.AdamW(ps, lr=1e-4), False),
        ("fourbit_adamw8", lambda ps: fourbit.optim.AdamW8bit(ps, lr=1e-4), False),
        ("fourbit_paged_adamw32", lambda ps: fourbit.optim.PagedAdamW32bit(ps, lr=1e-4), True),
        ("fourbit_paged_adamw8", lambda ps: fourbit.optim.PagedAdamW8bit(ps, lr=1e-4), True),
    ]
    if bnb is not None:
        v += [
            ("bnb_adamw32", lambda ps: bnb.optim.AdamW(ps, lr=1e-4), False),
            ("bnb_adamw8", lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-4), False),
            ("bnb_paged_adamw32", lambda ps: bnb.optim.PagedAdamW(ps, lr=1e-4), True),
            ("bnb_paged_adamw8", lambda ps: bnb.optim.PagedAdamW8bit(ps, lr=1e-4), True),
        ]
    return v


def evict(opt, bnb):
    """Push paged states to the host (the state after memory pressure)."""
    if isinstance(opt, fourbit.optim.adamw._AdamWBase):
        opt.evict_states()
        return
    import bitsandbytes.functional as bF
    for st in opt.state.values():
        for k in ("state1", "state2"):
            t = st.get(k)
            if t is not None and getattr(t, "is_paged", False):
                bF.prefetch_tensor(t, to_cpu=True)


def time_steps(opt, device, reps, warmup, before=None):
    for _ in range(warmup):
        if before:
            before()
        opt.step()
    times = []
    for _ in range(reps):
        if before:
            before()
        if device == "cuda":
            torch.cuda.synchronize()
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            opt.step()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        else:
            t0 = time.perf_counter()
            opt.step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None, help="output JSON (default benchmarks/results/optim_<device>.json)")
    ap.add_argument("--reps", type=int, default=None, help="timed steps per variant (default 20 cuda, 5 cpu)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5 cuda, 2 cpu)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (torch and OpenMP)")
    ap.add_argument("--workloads", default=None, help="comma-separated subset of the workload names")
    ap.add_argument("--no-bnb", action="store_true", help="leave bitsandbytes out")
    args = ap.parse_args(argv)
    dev = args.device
    reps = args.reps or (20 if dev == "cuda" else 5)
    warmup = args.warmup or (5 if dev == "cuda" else 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    bnb, bnb_note = None, ""
    if not args.no_bnb:
        try:
            import bitsandbytes as bnb  # noqa: F811
        except Exception as e:  # noqa: BLE001
            bnb_note = f"bitsandbytes unavailable: {type(e).__name__}: {e}"
            print(bnb_note, file=sys.stderr)
    device_name = torch.cuda.get_device_name() if dev == "cuda" else (platform.processor() or platform.machine())
    if dev == "cpu":
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    device_name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    meta = {
        "device": dev, "device_name": device_name,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "torch": torch.__version__, "fourbit": fourbit.__version__,
        "bitsandbytes": getattr(bnb, "__version__", None), "threads": torch.get_num_threads(),
        "reps": reps, "warmup": warmup, "note": bnb_note,
    }
    if dev == "cpu":
        meta["note"] = (meta["note"] + " " if meta["note"] else "") + (
            "CPU run: the big size is 168M parameters, not 1B; bitsandbytes' paged optimizers fall back "
            "to unpaged states on the CPU; eviction rows are CUDA only.")
    selected = args.workloads.split(",") if args.workloads else None
    records = []
    for wname, shapes in workloads(dev):
        if selected and wname not in selected:
            continue
        numel = sum(torch.Size(s).numel() for s in shapes)
        g = torch.Generator().manual_seed(0)
        base_grads = [torch.randn(s, generator=g) * 1e-3 for s in shapes]
        fused_ms = None
        for vname, make, paged in variants(bnb):
            rec = {"workload": wname, "params": numel, "tensors": len(shapes), "variant": vname}
            params = opt = None
            try:
                params = [torch.nn.Parameter(torch.randn(s, device=dev) * 0.02) for s in shapes]
                for p, gr in zip(params, base_grads):
                    p.grad = gr.to(dev)
                opt = make(params)
                rec["ms"] = time_steps(opt, dev, reps, warmup)
                if vname == "torch_adamw_fused":
                    fused_ms = rec["ms"]
                if paged and dev == "cuda":
                    ev = {"workload": wname, "params": numel, "tensors": len(shapes),
                          "variant": vname + "_evicted"}
                    ev["ms"] = time_steps(opt, dev, max(3, reps // 4), 1, before=lambda: evict(opt, bnb))
                    records.append(rec)
                    rec = ev
            except Exception as e:  # noqa: BLE001
                rec["ms"] = None
                rec["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            records.append(rec)
            del params, opt
            gc.collect()
            if dev == "cuda":
                torch.cuda.empty_cache()
        for r in records:
            if r["workload"] == wname and r.get("ms") and fused_ms:
                r["ratio_vs_torch_fused"] = r["ms"] / fused_ms
        print(f"done {wname}", file=sys.stderr)

    out = Path(args.json or f"benchmarks/results/optim_{dev}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "records": records}, indent=1))

    print(f"## AdamW step time, {dev} ({device_name}), {meta['date']}\n")
    print(f"`{meta['command']}` - torch {meta['torch']}, bitsandbytes {meta['bitsandbytes']}, "
          f"{meta['threads']} threads, median of {reps} steps. ratio = time / torch fused AdamW time "
          f"(< 1: faster).")
    if meta["note"]:
        print(f"\n{meta['note']}")
    names = [w for w, _ in workloads(dev) if not selected or w in selected]
    print("\n| variant | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for vname in dict.fromkeys(r["variant"] for r in records):
        cells = []
        for w in names:
            r = next((r for r in records if r["workload"] == w and r["variant"] == vname), None)
            if r is None:
                cells.append("-")
            elif r.get("ms") is None:
                cells.append("unavailable")
            else:
                ratio = r.get("ratio_vs_torch_fused")
                cells.append(f"{r['ms']:.2f} ms" + (f" ({ratio:.2f}x)" if ratio else ""))
        print(f"| {vname} | " + " | ".join(cells) + " |")
    errors = [r for r in records if r.get("error")]
    for r in errors:
        print(f"\n- {r['variant']} on {r['workload']}: {r['error']}")


if __name__ == "__main__":
    main()
